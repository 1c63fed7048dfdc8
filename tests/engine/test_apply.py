"""apply_plan on tiny random models built here: swapping, refusals, and what the swapped model computes."""

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2ForSequenceClassification

from qanalyze.engine.apply import MODES, apply_plan, quantized_weights, swapped_modules
from qanalyze.engine.modules import IntEmbedding, IntLayerNorm, IntLinear, QATLinear
from qanalyze.errors import ConfigError
from qanalyze.plan.uniform import resolve_plan, uniform_plan


def _bert(seed=0, layers=2):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2)
    return BertForSequenceClassification(config).eval()


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1, 100, (3, 10), generator=g),
            "attention_mask": torch.ones(3, 10, dtype=torch.long), "labels": torch.tensor([0, 1, 1])}


def test_int_mode_swaps_every_planned_module_and_keeps_the_head_float():
    model = _bert()
    plan = uniform_plan(model, 8, kinds=tuple(MODES["int"].builders))
    applied = apply_plan(model, plan, "int", seed=3)
    swapped = swapped_modules(model)
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, IntLinear)
    assert isinstance(model.bert.embeddings.word_embeddings, IntEmbedding)
    assert isinstance(model.bert.encoder.layer[1].output.LayerNorm, IntLayerNorm)
    assert type(model.classifier) is torch.nn.Linear and type(model.bert.pooler.dense) is torch.nn.Linear
    assert set(swapped) == set(applied.specs) == {n for n, m in plan.modules.items() if not m.get("float")}
    # the parameters are the same objects: optimizer and state dict see the model unchanged
    names = set(dict(model.named_parameters()))
    assert "bert.encoder.layer.0.attention.self.query.weight" in names
    codes = quantized_weights(model)
    assert all(q.bits == 8 for q in codes.values())


def test_uniform_16_bit_int_model_computes_the_float_model_closely():
    reference = _bert(seed=1)
    model = _bert(seed=1)
    apply_plan(model, uniform_plan(model, 16, kinds=("linear", "embedding", "layernorm")), "int")
    batch = _batch()
    with torch.no_grad():
        a, b = reference(**batch).logits, model(**batch).logits
    assert float((a - b).abs().max()) < 2e-3
    model8 = _bert(seed=1)
    apply_plan(model8, uniform_plan(model8, 4), "int")
    with torch.no_grad():
        c = model8(**batch).logits
    assert float((a - c).abs().max()) > float((a - b).abs().max())  # fewer bits, more error


def test_gpt2_conv1d_is_swapped_with_its_transposed_weight():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=4, n_positions=32, num_labels=2,
                        pad_token_id=0)
    reference = GPT2ForSequenceClassification(config).eval()
    model = GPT2ForSequenceClassification(config).eval()
    model.load_state_dict(reference.state_dict())
    apply_plan(model, uniform_plan(model, 16), "int")
    assert isinstance(model.transformer.h[0].attn.c_attn, IntLinear)
    ids = torch.randint(1, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert float((reference(input_ids=ids).logits - model(input_ids=ids).logits).abs().max()) < 5e-3


def test_qat_mode_refuses_a_planned_layer_norm_by_name():
    model = _bert()
    plan = uniform_plan(model, 8, kinds=("linear", "embedding", "layernorm"))
    with pytest.raises(ConfigError, match=r"qat cannot quantize bert\.embeddings\.LayerNorm .*Q8BERT"):
        apply_plan(model, plan, "qat")
    apply_plan(model, uniform_plan(model, 8), "qat")
    assert isinstance(model.bert.encoder.layer[0].intermediate.dense, QATLinear)


def test_int4_refuses_a_plan_with_other_bits_instead_of_running_it_at_4():
    model = _bert()
    with pytest.raises(ConfigError, match=r"int4 trains weights and activations at 4 bits, but the plan gives "
                                          r"bert\.embeddings\.word_embeddings weight 8, activation 8 bits"):
        apply_plan(model, uniform_plan(model, 8), "int4")
    assert not swapped_modules(model)  # refused before anything was swapped
    applied = apply_plan(model, uniform_plan(model, 4), "int4")
    assert len(applied.specs) == len(swapped_modules(model)) > 0


def test_a_plan_for_another_architecture_is_refused_by_module_name():
    plan = uniform_plan(_bert(layers=2), 8)
    with pytest.raises(ConfigError, match=r"layer\.2"):
        apply_plan(_bert(layers=3), plan, "int")


def test_unknown_mode_and_bad_uniform_specs():
    model = _bert()
    with pytest.raises(ConfigError, match="unknown mode 'int5'; known: int, qat, ptq-dynamic"):
        apply_plan(model, uniform_plan(model, 8), "int5")
    with pytest.raises(ConfigError, match="uniform:N"):
        resolve_plan("uniform:x", model)
    with pytest.raises(ConfigError, match="2 to 16"):
        resolve_plan("uniform:17", model)
    with pytest.raises(ConfigError, match="not found"):
        resolve_plan("no-such-plan.json", model)


def test_training_updates_the_float_master_weights_through_integer_gradients():
    model = _bert()
    apply_plan(model, uniform_plan(model, 8), "int")
    model.train()
    loss = model(**_batch()).loss
    loss.backward()
    query = model.bert.encoder.layer[0].attention.self.query
    assert query.weight.grad is not None and float(query.weight.grad.abs().sum()) > 0
    assert model.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def test_channel_layout_gives_per_row_weight_scales_and_per_token_inputs():
    model = _bert()
    plan = resolve_plan("uniform:8:channel", model)
    query = plan.modules["bert.encoder.layer.0.attention.self.query"]
    assert (query["group"], query["groups"], query["activation_group"]) == ("channel", 32, "token")
    tensor_plan = uniform_plan(model, 8)
    # one float16 scale per weight row instead of one per tensor
    extra_scales = sum(m["groups"] - 1 for m in plan.modules.values() if not m.get("float"))
    assert plan.totals["weight_bytes"] - tensor_plan.totals["weight_bytes"] == extra_scales * 16 // 8
    applied = apply_plan(model, plan, "int")
    spec = applied.specs["bert.encoder.layer.0.attention.self.query"]
    assert spec.per_token and spec.rows_per_group == 1
    assert "input per token" in repr(model.bert.encoder.layer[0].attention.self.query)
    scales = quantized_weights(model)["bert.encoder.layer.0.attention.self.query"].scale
    assert scales.numel() == 32


def test_rowwise_layout_gives_linear_output_gradients_row_scales_and_only_int_runs_it():
    model = _bert()
    plan = resolve_plan("uniform:8:rowwise", model, kinds=("linear", "embedding", "layernorm"))
    query = plan.modules["bert.encoder.layer.0.attention.self.query"]
    assert (query["group"], query["activation_group"], query["gradient_group"]) == ("channel", "token", "row")
    applied = apply_plan(model, plan, "int")
    kinds = {name: spec.gradient_group for name, spec in applied.specs.items()}
    assert kinds["bert.encoder.layer.0.attention.self.query"] == "row"
    assert kinds["bert.embeddings.word_embeddings"] == "tensor"  # an integer scatter-add needs one scale
    assert kinds["bert.embeddings.LayerNorm"] == "tensor"
    loss = model(**_batch()).loss
    loss.backward()
    grad = model.bert.encoder.layer[0].attention.self.query.weight.grad
    assert torch.isfinite(loss) and grad is not None and bool(grad.abs().sum() > 0)
    other = _bert()
    with pytest.raises(ConfigError, match=r"mode qat cannot quantize the output gradient of .* per row"):
        apply_plan(other, _rowwise_tensor_inputs(other), "qat")
    bad = _rowwise_tensor_inputs(other)
    bad.modules["bert.encoder.layer.0.attention.self.query"]["gradient_group"] = "token"
    with pytest.raises(ConfigError, match="gradient_group 'token' is not one of tensor, row"):
        apply_plan(other, bad, "int")
    assert not swapped_modules(other)


def _rowwise_tensor_inputs(model):
    """A uniform 8-bit plan with row-scaled output gradients but one scale per input (what qat could run, but
    for the gradients)."""
    plan = uniform_plan(model, 8)
    for entry in plan.modules.values():
        if entry.get("activation_group"):
            entry["gradient_group"] = "row"
    return plan


def test_per_token_inputs_follow_outlier_tokens_better_than_one_scale():
    reference = _bert(seed=2)
    batch = _batch()
    with torch.no_grad():
        # one loud token in the residual stream, as BERT has: one scale per tensor flattens the others
        reference.bert.embeddings.word_embeddings.weight[batch["input_ids"][0, 0]] *= 50
        expected = reference(**batch).logits
    errors = {}
    for layout in ("tensor", "channel"):
        model = _bert(seed=2)
        model.load_state_dict(reference.state_dict())
        apply_plan(model, uniform_plan(model, 8, layout=layout), "int")
        with torch.no_grad():
            errors[layout] = float((model(**batch).logits - expected).abs().max())
    assert errors["channel"] < errors["tensor"] / 2


def test_modes_that_keep_one_activation_scale_refuse_per_token_inputs():
    model = _bert()
    with pytest.raises(ConfigError, match=r"mode int4 cannot quantize the input of bert\.encoder\.layer\.0\."
                                          r"attention\.self\.query per token: it runs activation_group tensor"):
        apply_plan(model, uniform_plan(model, 4, layout="channel"), "int4")
    plan = uniform_plan(model, 8, layout="channel")
    plan.modules["bert.encoder.layer.0.attention.self.query"]["activation_group"] = "head"
    with pytest.raises(ConfigError, match="activation_group 'head' is not one of tensor, token"):
        apply_plan(model, plan, "int")
    with pytest.raises(ConfigError, match="uniform:8:channel"):
        resolve_plan("uniform:8:rows", model)
    # uniform:N:row is the weight-only plan of the post-training methods (one column group per row)
    assert resolve_plan("uniform:8:row", model).settings["layout"] == "row"
    assert not swapped_modules(model)


def _clipped_plan(model, bits, layout="channel", kinds=("linear", "embedding")):
    plan = resolve_plan(f"uniform:{bits}:{layout}", model, kinds=kinds)
    for entry in plan.modules.values():
        if not entry.get("float"):
            entry["weight_range"] = "mse"
            entry.pop("activation_group", None)  # one input scale per tensor: every mode runs it
    return plan


@pytest.mark.parametrize("mode", ["qat", "ptq-dynamic", "int"])
def test_mse_weight_range_clips_every_group_and_every_path_uses_the_clipped_codes(mode):
    from qanalyze.engine.functions import quantize_weight, weight_clip

    kinds = ("linear", "embedding", "layernorm") if mode == "int" else ("linear", "embedding")
    model = _bert()
    applied = apply_plan(model, _clipped_plan(model, 3, kinds=kinds), mode)
    name = "bert.encoder.layer.0.intermediate.dense"
    module = model.get_submodule(name)
    assert applied.specs[name].weight_range == "mse" and "mse-clipped" in repr(module)
    if mode == "int":  # a layer norm's gain keeps the max rule
        assert applied.specs["bert.embeddings.LayerNorm"].weight_range == "max"
        assert model.bert.embeddings.LayerNorm.clip_ratio is None
    # one ratio per weight row, found once from the starting weight and kept (and saved) as a buffer
    ratio = module.clip_ratio
    assert ratio.shape == (64, 1, 1) and bool((ratio < 1).any()) and bool((ratio <= 1).all())
    assert torch.equal(ratio, weight_clip(module.weight, applied.specs[name]))
    assert f"{name}.clip_ratio" in model.state_dict()
    clipped = quantize_weight(module.weight, applied.specs[name], ratio)
    plain = quantize_weight(module.weight, applied.specs[name])
    error = (clipped.dequantize() - module.weight).square().sum()
    gain = 0.9 if mode == "int" else 0.8  # power-of-two steps (int) leave the search fewer distinct ranges
    assert float(error) < gain * float((plain.dequantize() - module.weight).square().sum())
    assert torch.equal(quantized_weights(model)[name].q, clipped.q)  # evaluation / packed checkpoint
    # training forward: the same codes reach the product
    model.train()
    seen = {}
    if mode == "qat":
        handle = module.register_forward_hook(lambda m, args, out: seen.update(x=args[0]))
        out = model(**_batch())
        handle.remove()
        expected = torch.nn.functional.linear(module._input(seen["x"]), clipped.dequantize(), module.bias)
        assert torch.allclose(module(seen["x"]), expected, atol=1e-6)
    else:
        assert module._weight_for_forward() is module.quantized_weight()
        out = model(**_batch())
    out.loss.backward()
    assert float(module.weight.grad.abs().sum()) > 0


def test_int4_ignores_the_weight_range_and_max_plans_keep_no_ratios():
    model = _bert()
    applied = apply_plan(model, _clipped_plan(model, 4, layout="tensor"), "int4")
    assert all(spec.weight_range == "max" for spec in applied.specs.values())
    model = _bert()
    apply_plan(model, uniform_plan(model, 4), "qat")
    assert model.bert.encoder.layer[0].attention.self.query.clip_ratio is None
    assert not any(key.endswith("clip_ratio") for key in model.state_dict())


def test_qat_per_token_inputs_take_each_tokens_own_scale_and_no_ema_range():
    from qanalyze.engine.functions import get_quantizer

    model = _bert()
    applied = apply_plan(model, uniform_plan(model, 8, layout="channel"), "qat")
    name = "bert.encoder.layer.0.intermediate.dense"
    module = model.get_submodule(name)
    assert applied.specs[name].per_token and applied.specs[name].rows_per_group == 1
    x = torch.randn(2, 5, module.weight.shape[1], generator=torch.Generator().manual_seed(3))
    x[0, 1] *= 100  # one loud token
    x.requires_grad_(True)
    module.train()
    out = module(x)
    rows = get_quantizer("symmetric")(x.detach().reshape(-1, x.shape[-1]), 8, 1, "nearest", None)
    weight = get_quantizer("symmetric")(module.weight.detach(), 8, 1, "nearest", None)
    expected = torch.nn.functional.linear(rows.dequantize().reshape(x.shape), weight.dequantize(), module.bias)
    assert torch.allclose(out, expected, atol=1e-5)
    # a quiet token keeps its own resolution beside the loud one
    quiet = (rows.dequantize().reshape(x.shape) - x.detach())[0, 0].abs().max()
    assert float(quiet) <= float(x.detach()[0, 0].abs().max()) / 254 * 1.01
    assert float(module.activation_range) == 0.0  # no EMA range is kept for per-token inputs
    out.sum().backward()  # straight through: the input gradient is the float one of the fake-quantized product
    assert torch.allclose(x.grad, module.weight.detach().new_ones(out.shape) @ weight.dequantize(), atol=1e-4)


def test_integer_modes_refuse_column_group_plans_that_qat_runs(tiny_llama_dir):
    from qanalyze.engine.apply import validate_plan
    from qanalyze.models import load_model
    from qanalyze.plan.uniform import column_uniform_plan

    model = load_model(str(tiny_llama_dir)).model
    plan = column_uniform_plan(model, 4, 32)
    for mode in ("int", "ptq-dynamic", "int4"):
        with pytest.raises(ConfigError, match=r"cannot run model\.layers\.0\.self_attn\.q_proj in column groups "
                                              r"\(g32\)"):
            validate_plan(model, plan, mode)
    assert validate_plan(model, plan, "qat")["model.layers.0.self_attn.q_proj"].column_group == "g32"
