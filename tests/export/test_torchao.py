"""torchao: the recipe is torchao's own FqnToConfig JSON, rebuilt by torchao and equal to what the snippet builds,
and quantize_ applies it; a run's checkpoint, reloaded by transformers' from_pretrained into torchao tensors,
dequantizes to the very weights qanalyze evaluated and gives the same perplexity."""

from __future__ import annotations

import pytest
import torch
from torchao.quantization import Int8Tensor, IntxUnpackedToInt8Tensor, quantize_

from qanalyze.engine.column_checkpoint import load_column_run
from qanalyze.errors import ConfigError
from qanalyze.export.registry import get_exporter
from qanalyze.export.run import export
from qanalyze.export.torchao import rebuild_config
from qanalyze.models import load_model


def test_recipe_json_and_snippet_build_the_same_config(tmp_path, mixed_plan, plan_variant, export_llama_dir):
    # torchao's 8 bits are per row: nothing as precise as 8-bit g64 (the mixed plan's down_proj) exists
    with pytest.raises(ConfigError, match=r"torchao cannot store model\.layers\.1\.mlp\.down_proj at 8-bit g64"):
        export(mixed_plan, "torchao", tmp_path / "refused", snap="up")
    assert not (tmp_path / "refused").exists()
    plan = plan_variant("model.layers.1.mlp.down_proj", weight_bits=3)
    record = export(plan, "torchao", tmp_path / "ao", snap="up")
    assert record.snapped == [{"module": "model.layers.1.mlp.down_proj", "planned": "3-bit g64 asym",
                               "stored": "4-bit g64 asym"}]
    config = rebuild_config(tmp_path / "ao" / "fqn_to_config.json")
    scope: dict = {}
    exec((tmp_path / "ao" / "fqn_to_config.py").read_text(), scope)
    assert scope["CONFIG"] == config
    model = load_model(str(export_llama_dir)).model
    quantize_(model, config, filter_fn=None)
    assert isinstance(model.model.layers[1].mlp.up_proj.weight, Int8Tensor)  # 8-bit symmetric rows
    q = model.model.layers[0].self_attn.q_proj.weight
    assert isinstance(q, IntxUnpackedToInt8Tensor) and q.block_size == (1, 32)
    assert not isinstance(model.model.layers[1].mlp.gate_proj.weight, IntxUnpackedToInt8Tensor)


@pytest.mark.parametrize("run", ["sym_run", "asym_run"])
def test_checkpoint_reloads_the_evaluated_weights(tmp_path, run, request, perplexity):
    run = request.getfixturevalue(run)
    export(run, "torchao", tmp_path / "ao")
    model = get_exporter("torchao").load(tmp_path / "ao")
    reference, tokenizer, _, _ = load_column_run(run)
    for name, module in reference.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            weight = model.get_submodule(name).weight
            assert isinstance(weight, IntxUnpackedToInt8Tensor) and torch.equal(weight.dequantize(), module.weight)
    assert perplexity(model, tokenizer) == perplexity(reference, tokenizer)
