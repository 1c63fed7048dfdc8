"""RTN and `quantize_model` on a tiny random LLaMA (built here, with the MiniLM tokenizer): which modules are
quantized at which spec, weights written back as the dequantized codes, both methods end to end on lm
windows (finite perplexity; GPTQ closer to the float model than RTN), and the bad inputs."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import transformers

from qanalyze.data import encode, load_task
from qanalyze.engine.lm_eval import compare_lm, evaluate_lm, reference_logits
from qanalyze.errors import ConfigError
from qanalyze.plan.uniform import uniform_plan
from qanalyze.ptq.calibrate import InputStats, sequential_calibration
from qanalyze.ptq.gptq import GPTQConfig
from qanalyze.ptq.quantize import PTQ_METHODS, get_ptq_method, linear_modules, module_specs, quantize_model
from qanalyze.ptq.rtn import rtn_quantize
from qanalyze.quant.columns import ColumnSpec, quantize_columns

WIKITEXT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "wikitext-2"


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return transformers.AutoTokenizer.from_pretrained(str(minilm_dir), local_files_only=True)


@pytest.fixture(scope="module")
def llama():
    """A tiny random LLaMA causal LM (grouped-query attention, tied embeddings, hidden 32, 2 layers)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=True, initializer_range=0.2)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def windows(tmp_path_factory, tokenizer):
    """Calibration (valid.txt) and evaluation (test.txt) windows of 32 tokens of WikiText-2."""
    folder = tmp_path_factory.mktemp("text")
    for name, size in (("valid.txt", 6000), ("test.txt", 4000)):
        (folder / name).write_text((WIKITEXT / name).read_text(encoding="utf-8")[:size], encoding="utf-8")
    data = load_task("lm", str(folder), seq_len=32, max_train_examples=16, max_eval_examples=8)
    return encode(data.train, tokenizer), encode(data.dev, tokenizer)


def test_rtn_is_the_column_quantizer():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    spec = ColumnSpec(3, 32, False)
    found, expected = rtn_quantize(w, spec), quantize_columns(w, spec)
    assert torch.equal(found.q, expected.q) and torch.equal(found.scale, expected.scale)
    assert set(PTQ_METHODS) == {"rtn", "gptq"}
    with pytest.raises(ConfigError, match="unknown PTQ method 'awq'; known: rtn, gptq"):
        get_ptq_method("awq")


def test_specs_cover_every_linear_but_the_head(llama):
    specs = module_specs(llama, 4, group_size=32, symmetric=False,
                         overrides={"model.layers.0.mlp.down_proj": {"bits": 8, "group_size": None}})
    names = set(linear_modules(llama))
    assert set(specs) == names and len(names) == 14 and "lm_head" not in names
    assert specs["model.layers.1.self_attn.q_proj"] == ColumnSpec(4, 32, False)
    assert specs["model.layers.0.mlp.down_proj"] == ColumnSpec(8, None, True)
    plan = uniform_plan(llama, 3)
    plan.modules["model.layers.1.mlp.up_proj"]["column_group"] = "row"
    plan.modules["model.layers.1.mlp.gate_proj"]["column_group"] = "g16p"
    from_plan = module_specs(llama, plan, group_size=32)
    assert from_plan["model.layers.1.mlp.gate_proj"] == ColumnSpec(3, 16, True, partial_last=True)
    assert set(from_plan) == names
    assert from_plan["model.layers.1.mlp.up_proj"] == ColumnSpec(3, None, True)
    assert from_plan["model.layers.0.self_attn.v_proj"] == ColumnSpec(3, 32, True)
    with pytest.raises(ConfigError, match=r"group size 128 does not divide the 32 input columns of model\.layers\.0"):
        module_specs(llama, 4, group_size=128)
    with pytest.raises(ConfigError, match="override for lm_head, which is not a linear module"):
        module_specs(llama, 4, group_size=32, overrides={"lm_head": ColumnSpec(4)})
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.mlp\.up_proj: column-group weights take 2 to 8 bits"):
        module_specs(llama, 4, group_size=32, overrides={"model.layers.0.mlp.up_proj": {"bits": 12}})


def test_rtn_writes_the_dequantized_codes_and_leaves_the_rest(llama):
    model = copy.deepcopy(llama)
    record = quantize_model(model, 3, "rtn", group_size=32)
    for name, module in linear_modules(model).items():
        original = dict(llama.named_modules())[name].weight
        expected = quantize_columns(original, ColumnSpec(3, 32)).dequantize()
        assert torch.equal(module.weight, expected), name
        assert torch.equal(record.modules[name].quantized.dequantize(), module.weight)
    assert torch.equal(model.lm_head.weight, llama.lm_head.weight)
    assert torch.equal(model.model.norm.weight, llama.model.norm.weight)
    assert record.calibration_windows == 0 and record.modules["model.layers.0.mlp.up_proj"].output_error is None
    assert record.storage_bits == sum(o.quantized.storage_bits for o in record.modules.values())
    assert set(record.state_dict()) == {f"{n}.{k}" for n in record.modules for k in ("qweight", "scales")}
    assert record.to_dict()["modules"]["model.layers.0.mlp.up_proj"]["bits"] == 3


def test_calibration_sees_the_partly_quantized_model(llama, windows):
    model = copy.deepcopy(llama)
    calib, _ = windows
    seen: list[tuple[int, list[str]]] = []
    targets = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"]

    def zero_layer(index: int, found: dict[str, tuple[torch.nn.Module, InputStats]]) -> None:
        seen.append((index, sorted(found)))
        for module, stats in found.values():
            assert stats.rows == calib.input_ids.numel()
            module.weight.data.zero_()

    sequential_calibration(model, calib, targets, zero_layer, batch_size=5)
    assert seen == [(0, [targets[0]]), (1, sorted(targets[1:]))]
    # layer 1's inputs come from layer 0 with its down projection zeroed: capture them with a hook to compare
    captured = []
    handle = model.model.layers[1].self_attn.q_proj.register_forward_hook(lambda m, a, o: captured.append(a[0]))
    with torch.no_grad():
        model(input_ids=calib.input_ids[:2], use_cache=False)
    handle.remove()
    rows = captured[0].reshape(-1, 32).double()

    def check(index: int, found: dict[str, tuple[torch.nn.Module, InputStats]]) -> None:
        if index == 1:
            _, stats = found["model.layers.1.self_attn.q_proj"]
            torch.testing.assert_close(stats.xtx, rows.T @ rows, rtol=1e-5, atol=1e-6)

    first_two = type(calib)(calib.input_ids[:2], calib.text_tokens, calib.indices[:2], calib.where)
    sequential_calibration(model, first_two, targets[1:], check)
    with pytest.raises(ConfigError, match="inside decoder layers only, not lm_head"):
        sequential_calibration(model, calib, ["lm_head"], zero_layer)


def test_both_methods_end_to_end_gptq_closer_to_the_float_model(llama, windows):
    calib, test = windows
    fp_ppl, _, _ = evaluate_lm(llama, test)
    reference = reference_logits(llama, calib)
    results = {}
    for method in ("rtn", "gptq"):
        model = copy.deepcopy(llama)
        record = quantize_model(model, 3, method, calib, group_size=32, symmetric=False, batch_size=8)
        ppl, _, _ = evaluate_lm(model, test)
        assert math.isfinite(ppl)
        results[method] = (ppl, compare_lm(model, calib, reference).kl, record)
    gptq_record = results["gptq"][2]
    assert gptq_record.calibration_windows == len(calib)
    assert all(o.output_error is not None and o.details["dead_columns"] == 0 for o in gptq_record.modules.values())
    # on the calibration windows GPTQ moves the model's predictions less than RTN does
    assert results["gptq"][1] < results["rtn"][1]
    assert results["gptq"][0] <= results["rtn"][0]  # perplexity on test windows (deterministic: seeded model)
    assert math.isfinite(fp_ppl)


def test_gptq_needs_windows_and_its_own_config(llama):
    with pytest.raises(ConfigError, match="method gptq needs calibration windows"):
        quantize_model(copy.deepcopy(llama), 4, "gptq", group_size=32)
    with pytest.raises(ConfigError, match="method rtn takes a RTNConfig, not GPTQConfig"):
        quantize_model(copy.deepcopy(llama), 4, "rtn", group_size=32, config=GPTQConfig())


def test_gptq_act_order_keeps_groups_contiguous_in_storage(llama, windows):
    calib, test = windows
    model = copy.deepcopy(llama)
    record = quantize_model(model, 4, "gptq", calib, group_size=32, config=GPTQConfig(act_order=True),
                            batch_size=8)
    outcome = record.modules["model.layers.1.mlp.down_proj"]
    assert outcome.quantized.scale.shape == (32, 2)  # 64 input columns: two groups of 32, in column order
    assert torch.equal(outcome.quantized.dequantize(), model.model.layers[1].mlp.down_proj.weight)
    assert record.config["act_order"] is True and math.isfinite(evaluate_lm(model, test)[0])
