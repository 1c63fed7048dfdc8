"""QDyLoRA: the config, the dynamic-rank adapter against plain LoRA, gradients, the rank sampler, and
apply_qdylora on a tiny random BERT built here (training reduces the loss)."""

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from qanalyze.engine.functions import TensorSpec, quantize_weight
from qanalyze.engine.lora import (
    DyLoRALinear,
    LoRAConfig,
    RankSampler,
    adapters,
    apply_qdylora,
    set_rank,
    trainable_parameters,
)
from qanalyze.errors import ConfigError
from qanalyze.plan.uniform import uniform_plan
from qanalyze.quant.nf4 import NF4Tensor, nf4_quantize

TARGETS = {f"bert.encoder.layer.{i}.attention.self.{kind}" for i in range(2) for kind in ("query", "value")}


def _generator(seed):
    return torch.Generator().manual_seed(seed)


def _linear(in_features=16, out_features=12, seed=0, dtype=torch.float64):
    linear = nn.Linear(in_features, out_features, dtype=dtype)
    generator = _generator(seed)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator, dtype=dtype))
        linear.bias.copy_(torch.randn(linear.bias.shape, generator=generator, dtype=dtype))
    return linear


def _adapter(config, seed=0, dtype=torch.float64, packed=None):
    """A DyLoRALinear with a random (non-zero) B, so every factor carries gradient."""
    linear = _linear(seed=seed, dtype=dtype)
    module = DyLoRALinear(linear, config, _generator(seed + 1), packed=packed)
    with torch.no_grad():
        module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=_generator(seed + 2), dtype=dtype))
    return linear, module


def _bert(seed=0):
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # nn.Dropout has no generator
    # transformers initialises from the global random state; fork it so this test leaves it alone, and
    # overwrite every weight from an explicit generator so the model depends on `seed` only
    with torch.random.fork_rng():
        model = BertForSequenceClassification(config)
    generator = _generator(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "LayerNorm" in name:
                parameter.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model.eval()


def _batch(seed=0, size=16):
    generator = _generator(seed)
    return {"input_ids": torch.randint(1, 100, (size, 12), generator=generator),
            "attention_mask": torch.ones(size, 12, dtype=torch.long),
            "labels": torch.randint(0, 2, (size,), generator=generator)}


# ---------------------------------------------------------------------------------------------------------------------
# config


@pytest.mark.parametrize(("changes", "message"), [
    ({"rank": 0}, "rank"), ({"rank": True}, "rank"), ({"rank": 2.0}, "rank"),
    ({"alpha": 0}, "alpha"), ({"alpha": float("inf")}, "alpha"),
    ({"targets": "query"}, "targets"), ({"targets": ()}, "targets"), ({"targets": ["query"]}, "targets"),
    ({"targets": ("query(",)}, "regex"), ({"update": "some"}, "update"), ({"base": "int4"}, "base"),
    ({"double_quant": True}, "double_quant"), ({"base": "nf4", "nf4_block_size": 0}, "nf4_block_size"),
    ({"dropout": 1.0}, "dropout"), ({"dropout": -0.1}, "dropout"), ({"head": ("",)}, "head"),
])
def test_config_refuses_bad_settings(changes, message):
    with pytest.raises(ConfigError, match=message):
        LoRAConfig(**changes)


def test_config_defaults():
    config = LoRAConfig()
    assert (config.rank, config.alpha, config.targets, config.update, config.base, config.dropout) == (
        16, 16.0, ("query", "value"), "frozen", "plan", 0.0)
    assert LoRAConfig(base="nf4", double_quant=True).double_quant


# ---------------------------------------------------------------------------------------------------------------------
# the adapter


@pytest.mark.parametrize("update", ["frozen", "all"])
def test_truncated_adapter_is_exactly_a_plain_lora_of_that_rank(update):
    config = LoRAConfig(rank=6, alpha=12.0, update=update)
    linear, module = _adapter(config)
    x = torch.randn(5, 16, generator=_generator(9), dtype=torch.float64)
    assert torch.equal(module.weight, linear.weight) and torch.equal(module.bias, linear.bias)
    for b in range(1, 7):
        module.rank = b
        a, bm = module.lora_A[:b].detach(), module.lora_B[:, :b].detach()
        plain = nn.functional.linear(x, linear.weight, linear.bias) + (12.0 / b) * ((x @ a.t()) @ bm.t())
        # float64 with a different order of the same products: equal to rounding, not bit for bit
        assert torch.allclose(module(x), plain, rtol=0, atol=1e-12)
        exported = module.truncated(b)
        assert exported.rank == b and exported.scaling == 12.0 / b
        assert torch.equal(exported.A, a) and torch.equal(exported.B, bm)
        merged = nn.functional.linear(x, linear.weight + exported.delta(), linear.bias)
        assert torch.allclose(merged, plain, rtol=0, atol=1e-12)


def test_a_new_adapter_starts_equal_to_its_base_and_is_seeded_by_its_generator():
    linear = _linear()
    first = DyLoRALinear(linear, LoRAConfig(rank=4), _generator(5))
    again = DyLoRALinear(linear, LoRAConfig(rank=4), _generator(5))
    other = DyLoRALinear(linear, LoRAConfig(rank=4), _generator(6))
    x = torch.randn(3, 16, generator=_generator(1), dtype=torch.float64)
    assert torch.equal(first(x), linear(x))
    assert torch.equal(first.lora_A, again.lora_A) and not torch.equal(first.lora_A, other.lora_A)
    assert first.lora_A.abs().max() <= 1 / 16**0.5  # Kaiming uniform with a = sqrt(5): bound 1 / sqrt(in)
    assert set(dict(first.named_parameters())) == {"lora_A", "lora_B"}
    assert set(dict(first.named_buffers())) == {"weight", "bias"}


@pytest.mark.parametrize("update", ["frozen", "all"])
def test_gradients_reach_only_what_the_update_mode_allows(update):
    _, module = _adapter(LoRAConfig(rank=6, update=update))
    module.rank = 3
    x = torch.randn(5, 16, generator=_generator(3), dtype=torch.float64)
    module(x).square().sum().backward()
    rows = module.lora_A.grad.abs().sum(dim=1) != 0
    columns = module.lora_B.grad.abs().sum(dim=0) != 0
    expected = [False, False, True, False, False, False] if update == "frozen" else [True] * 3 + [False] * 3
    assert rows.tolist() == expected and columns.tolist() == expected
    assert module.weight.grad is None and module.bias.grad is None
    assert not module.weight.requires_grad and not module.bias.requires_grad


def test_rank_is_validated():
    _, module = _adapter(LoRAConfig(rank=4))
    for bad in (0, 5, True, 2.0):
        with pytest.raises(ConfigError, match="from 1 to 4"):
            module.rank = bad
        with pytest.raises(ConfigError, match="from 1 to 4"):
            module.truncated(bad)
    assert module.rank == 4 and module.scaling == 16.0 / 4


def test_dropout_draws_from_the_module_generator():
    config = LoRAConfig(rank=4, dropout=0.5)
    x = torch.randn(8, 16, generator=_generator(4), dtype=torch.float64)
    outputs = []
    for _ in range(2):
        _, module = _adapter(config)
        module.train()
        outputs.append(module(x))
    assert torch.equal(outputs[0], outputs[1])
    module.eval()
    assert not torch.equal(module(x), outputs[0])


def test_quantized_bases_are_frozen_dequantized_values_and_can_be_packed():
    linear = _linear(dtype=torch.float32)
    spec = TensorSpec(weight_bits=4, activation_bits=16, gradient_bits=16, rows_per_group=1, quantizer="symmetric")
    quantized = quantize_weight(linear.weight, spec)
    module = DyLoRALinear(linear, LoRAConfig(rank=2), _generator(0), packed=quantized)
    assert torch.equal(module.weight, quantized.dequantize()) and module.packed_base() is quantized
    nf4 = nf4_quantize(linear.weight, 64)
    module = DyLoRALinear(linear, LoRAConfig(rank=2, base="nf4"), _generator(0), packed=nf4)
    assert torch.equal(module.weight, nf4.dequantize()) and isinstance(module.packed_base(), NF4Tensor)
    assert DyLoRALinear(linear, LoRAConfig(rank=2), _generator(0)).packed_base() is None
    with pytest.raises(ConfigError, match="shape"):
        DyLoRALinear(_linear(16, 8, dtype=torch.float32), LoRAConfig(rank=2), _generator(0), packed=nf4)


# ---------------------------------------------------------------------------------------------------------------------
# rank sampler


def test_rank_sampler_is_deterministic_covers_every_rank_and_sets_every_adapter():
    modules = {f"m{i}": _adapter(LoRAConfig(rank=5), seed=i)[1] for i in range(3)}
    first, second = RankSampler(modules, _generator(7)), RankSampler(modules, _generator(7))
    draws = [first.step() for _ in range(200)]
    assert draws == [second.draw() for _ in range(200)]
    assert set(draws) == {1, 2, 3, 4, 5}
    assert all(module.rank == draws[-1] for module in modules.values())
    set_rank(modules, 2)
    assert all(module.rank == 2 for module in modules.values())


def test_rank_sampler_refuses_mixed_ranks_and_no_adapters():
    modules = {"a": _adapter(LoRAConfig(rank=4))[1], "b": _adapter(LoRAConfig(rank=8))[1]}
    with pytest.raises(ConfigError, match="different maximum ranks"):
        RankSampler(modules, _generator(0))
    with pytest.raises(ConfigError, match="no DyLoRA adapters"):
        RankSampler(nn.Linear(2, 2), _generator(0))
    with pytest.raises(ConfigError, match="no DyLoRA adapters"):
        set_rank(nn.Linear(2, 2), 1)


# ---------------------------------------------------------------------------------------------------------------------
# apply_qdylora


def _loss(model, batch):
    return model(**batch).loss


def test_apply_qdylora_swaps_query_and_value_freezes_the_rest_and_trains():
    model = _bert()
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    plan = uniform_plan(model, 4)
    built = apply_qdylora(model, plan, LoRAConfig(rank=4), seed=1)
    assert set(built) == set(adapters(model)) == TARGETS
    assert all(isinstance(model.get_submodule(name), DyLoRALinear) for name in TARGETS)
    assert type(model.bert.encoder.layer[0].attention.self.key) is nn.Linear

    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{f}" for n in TARGETS for f in "AB"} | {"classifier.weight", "classifier.bias"}
    # the adapted bases and the other planned modules hold quantized values; the head stays float
    query = "bert.encoder.layer.0.attention.self.query"
    spec = TensorSpec(weight_bits=4, activation_bits=16, gradient_bits=16, quantizer="symmetric")
    assert torch.equal(built[query].weight, quantize_weight(original[f"{query}.weight"], spec).dequantize())
    assert built[query].packed_base().bits == 4
    key = "bert.encoder.layer.1.attention.self.key.weight"
    assert torch.equal(dict(model.named_parameters())[key], quantize_weight(original[key], spec).dequantize())
    assert torch.equal(model.classifier.weight, original["classifier.weight"])

    batch = _batch()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    sampler = RankSampler(built, _generator(11))
    with torch.no_grad():
        set_rank(model, 4)
        before = _loss(model, batch).item()
    for _ in range(15):
        sampler.step()
        optimizer.zero_grad()
        _loss(model, batch).backward()
        for name, parameter in model.named_parameters():
            assert (parameter.grad is not None) == (name in trainable)
        optimizer.step()
    with torch.no_grad():
        set_rank(model, 4)
        after = _loss(model, batch).item()
    assert after < before
    # the adapters moved, the frozen weights did not
    assert torch.equal(dict(model.named_parameters())[key], quantize_weight(original[key], spec).dequantize())
    assert built[query].lora_B.abs().sum() > 0


def test_apply_qdylora_with_an_nf4_base_and_no_plan():
    model = _bert()
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    config = LoRAConfig(rank=2, base="nf4", double_quant=True)
    built = apply_qdylora(model, None, config, seed=0)
    assert set(built) == TARGETS
    value = "bert.encoder.layer.1.attention.self.value"
    expected = nf4_quantize(original[f"{value}.weight"], 64, double_quant=True).dequantize()
    assert torch.equal(built[value].weight, expected) and built[value].packed_base().double_quant
    # an NF4 base is the whole frozen base in NF4 (QLoRA), not only the modules with adapters
    key = "bert.encoder.layer.1.attention.self.key.weight"
    expected_key = nf4_quantize(original[key], 64, double_quant=True).dequantize()
    assert torch.equal(dict(model.named_parameters())[key], expected_key)
    assert not dict(model.named_parameters())[key].requires_grad
    # the task head trains in float and is never quantized
    assert torch.equal(dict(model.named_parameters())["classifier.weight"], original["classifier.weight"])
    # adapter generators are seeded from the seed and the position: the same seed builds the same adapters
    again = apply_qdylora(_bert(), None, config, seed=0)
    assert all(torch.equal(built[name].lora_A, again[name].lora_A) for name in TARGETS)


def test_trainable_parameters_count_the_adapters_cut_at_a_rank_and_the_head():
    model = _bert()
    apply_qdylora(model, None, LoRAConfig(rank=4, base="nf4"), seed=0)
    head = sum(p.numel() for name, p in model.named_parameters() if name.startswith("classifier."))
    # four 32 x 32 adapters (query and value of two layers): rank x (32 + 32) each
    assert [trainable_parameters(model, r) for r in (1, 2, 4)] == [head + 4 * r * 64 for r in (1, 2, 4)]
    assert trainable_parameters(model, 8) == trainable_parameters(model, 4)  # cut at the largest rank


def test_apply_qdylora_names_the_patterns_when_nothing_matches():
    with pytest.raises(ConfigError, match="nothing_here, c_attn"):
        apply_qdylora(_bert(), None, LoRAConfig(targets=("nothing_here", "c_attn")))
