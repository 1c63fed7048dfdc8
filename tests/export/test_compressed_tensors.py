"""compressed-tensors: the recipe is a quantization_config the package validates and applies to exactly the
planned modules; a run's checkpoint, decompressed by compressed-tensors itself, holds the very weights qanalyze
evaluated (asymmetric zero points included), and a symmetric one also loads with transformers' from_pretrained."""

from __future__ import annotations

import json

import torch
from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
from transformers import AutoModelForCausalLM

from qanalyze.engine.column_checkpoint import load_column_run
from qanalyze.export.registry import get_exporter
from qanalyze.export.run import export
from qanalyze.models import load_model


def _same_weights(model, run):
    reference, *_ = load_column_run(run)
    for name, module in reference.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert torch.equal(model.get_submodule(name).weight, module.weight), name
    return reference


def test_recipe_targets_each_planned_module_with_its_layout(tmp_path, plan_variant, export_llama_dir):
    plan = plan_variant("model.layers.1.mlp.down_proj", weight_bits=3)  # vLLM runs no 3-bit pack-quantized
    record = export(plan, "compressed-tensors", tmp_path / "ct", snap="up")
    assert record.snapped == [{"module": "model.layers.1.mlp.down_proj", "planned": "3-bit g64 asym",
                               "stored": "4-bit g64 asym"}]
    config = json.loads((tmp_path / "ct" / "quantization_config.json").read_text())
    assert config["format"] == "pack-quantized" and "model.layers.1.mlp.gate_proj" in config["ignore"]
    model = load_model(str(export_llama_dir)).model
    apply_quantization_config(model, QuantizationConfig.model_validate(config))
    weights = {name: module.quantization_scheme.weights for name, module in model.named_modules()
               if getattr(module, "quantization_scheme", None) is not None}
    assert len(weights) == 13 and "model.layers.1.mlp.gate_proj" not in weights
    assert (weights["model.layers.0.self_attn.q_proj"].num_bits, weights["model.layers.0.self_attn.q_proj"].group_size,
            weights["model.layers.0.self_attn.q_proj"].symmetric) == (4, 32, False)
    down = weights["model.layers.1.mlp.down_proj"]
    assert (down.num_bits, down.group_size) == (4, 64)
    up = weights["model.layers.1.mlp.up_proj"]
    assert (up.num_bits, up.strategy, up.symmetric) == (8, "channel", True)


def test_checkpoint_decompresses_to_the_evaluated_weights(tmp_path, mixed_run, perplexity):
    record = export(mixed_run, "compressed-tensors", tmp_path / "ct")
    assert record.kind == "checkpoint" and record.exact == record.modules == 13
    model = get_exporter("compressed-tensors").load(tmp_path / "ct")
    reference = _same_weights(model, mixed_run)
    _, tokenizer, _, _ = load_column_run(mixed_run)
    assert perplexity(model, tokenizer) == perplexity(reference, tokenizer)


def test_symmetric_checkpoint_loads_with_from_pretrained(tmp_path, sym_run):
    export(sym_run, "compressed-tensors", tmp_path / "ct")
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct"), dtype=torch.float32).eval()
    reference, *_ = load_column_run(sym_run)
    tokens = torch.arange(1000, 1032).reshape(1, -1)
    with torch.no_grad():
        assert torch.allclose(model(tokens).logits, reference(tokens).logits, atol=1e-5)
