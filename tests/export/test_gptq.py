"""gptq: GPTQModel needs a CUDA build of torch (its wheel replaces torch 2.13.0+cpu), so the checkpoint is checked
by an independent unpacking: the shifts and masks of GPTQModel's TorchQuantLinear.dequantize_weight (its 3-bit
word-straddling fix-ups included), written here with numpy, rebuild every weight bit for bit as qanalyze
evaluated it; quantize_config's dynamic rules resolve, as GPTQModel reads them, to each module's layout."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import safetensors.numpy
import torch
from transformers import AutoModelForCausalLM

from qanalyze import quantize
from qanalyze.engine.column_checkpoint import load_column_run
from qanalyze.errors import ConfigError
from qanalyze.export.registry import get_exporter
from qanalyze.export.run import export

WF3 = np.array([[0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 0], [0, 1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31],
                [0, 2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 0]], dtype=np.uint32)


def gptqmodel_unpack(packed, bits):
    """Codes packed along axis 0 of an int32 array, unpacked as GPTQModel's torch kernel does."""
    words = packed.view(np.uint32)
    if bits in (2, 4, 8):
        shifts = np.arange(0, 32, bits, dtype=np.uint32)
        codes = (words[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)
        return codes.reshape(-1, words.shape[1]).astype(np.int64)
    assert bits == 3
    w = (words.reshape(-1, 3, 1, words.shape[1]) >> WF3[None, :, :, None]) & 0x7
    w[:, 0, 10] = (w[:, 0, 10] & 0x3) | ((w[:, 1, 0] << 2) & 0x4)
    w[:, 1, 11] = (w[:, 1, 11] & 0x1) | ((w[:, 2, 0] << 1) & 0x6)
    w = np.concatenate([w[:, 0, :11], w[:, 1, 1:12], w[:, 2, 1:11]], axis=1)
    return w.reshape(-1, words.shape[1]).astype(np.int64)


def gptqmodel_layout(config, name):
    """(bits, group_size, sym) of a module under quantize_config, or None when a -: rule excludes it."""
    for pattern, override in config["dynamic"].items():
        if pattern.startswith("-:") and re.match(pattern[2:], name):
            return None
        if pattern.startswith("+:") and re.match(pattern[2:], name):
            return override["bits"], override["group_size"], override["sym"]
    return config["bits"], config["group_size"], config["sym"]


def check_weights(folder, run):
    config = json.loads((folder / "quantize_config.json").read_text())
    tensors = safetensors.numpy.load_file(str(folder / "model.safetensors"))
    _, _, _, codes = load_column_run(run)
    reference, *_ = load_column_run(run)
    plus_one = 1 if config["checkpoint_format"] == "gptq" else 0
    for name, module in reference.named_modules():
        if not isinstance(module, torch.nn.Linear) or name == "lm_head":
            continue
        layout = gptqmodel_layout(config, name)
        if name not in codes:
            assert layout is None and f"{name}.weight" in tensors, name
            continue
        bits, group, sym = layout
        spec = codes[name].spec
        assert (bits, group, sym) == (spec.bits, spec.group_size or -1, spec.symmetric), name
        q = gptqmodel_unpack(tensors[f"{name}.qweight"], bits)
        zeros = gptqmodel_unpack(np.ascontiguousarray(tensors[f"{name}.qzeros"].T), bits).T + plus_one
        g_idx = tensors[f"{name}.g_idx"].astype(np.int64)
        scales = tensors[f"{name}.scales"].astype(np.float32)
        weight = (scales[g_idx] * (q - zeros[g_idx]).astype(np.float32)).T
        assert np.array_equal(weight, module.weight.detach().numpy()), name
    return config


def test_mixed_checkpoint_unpacks_bit_exactly_with_dynamic_overrides(tmp_path, mixed_run, perplexity):
    record = export(mixed_run, "gptq", tmp_path / "gptq")
    assert record.details["checkpoint_format"] == "gptq"
    config = check_weights(tmp_path / "gptq", mixed_run)
    assert (config["bits"], config["group_size"], config["sym"], config["desc_act"]) == (4, 32, False, False)
    assert len(config["dynamic"]) == 3  # 8-bit g64, 8-bit symmetric per row, the float gate_proj excluded
    hf = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert hf == config
    model = get_exporter("gptq").load(tmp_path / "gptq")
    reference, tokenizer, _, _ = load_column_run(mixed_run)
    assert perplexity(model, tokenizer) == perplexity(reference, tokenizer)


def test_three_bit_codes_straddle_words_as_gptq_packs_them(tmp_path, export_llama_dir, export_lm_data):
    quantize(str(export_llama_dir), export_lm_data, "uniform:3:g32", tmp_path / "rtn3", method="rtn")
    export(tmp_path / "rtn3", "gptq", tmp_path / "gptq")
    check_weights(tmp_path / "gptq", tmp_path / "rtn3")


def test_a_zero_point_of_zero_is_written_as_gptq_v2(tmp_path, export_llama_dir, export_lm_data):
    # one layer's weights all non-negative: every group's range starts at 0, so its zero point is 0,
    # which v1's "zero minus one" cannot store
    folder = tmp_path / "model"
    shutil.copytree(export_llama_dir, folder)
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.abs_()
    model.save_pretrained(folder)
    quantize(str(folder), export_lm_data, "uniform:4:g32", tmp_path / "rtn", method="rtn")
    record = export(tmp_path / "rtn", "gptq", tmp_path / "gptq")
    assert record.details["checkpoint_format"] == "gptq_v2"
    assert record.details["settings"] == {"checkpoint_format": "auto"}
    assert "model.layers.0.self_attn.q_proj" in record.details["why_v2"]
    check_weights(tmp_path / "gptq", tmp_path / "rtn")
    with pytest.raises(ConfigError, match=r"gptq v1 cannot store model\.layers\.0\.self_attn\.q_proj"):
        export(tmp_path / "rtn", "gptq", tmp_path / "v1", options={"checkpoint_format": "gptq"})
    assert not (tmp_path / "v1").exists()


def test_gptq_v2_is_chosen_for_gptqmodel(tmp_path, asym_run):
    record = export(asym_run, "gptq", tmp_path / "v2", options={"checkpoint_format": "gptq_v2"})
    assert record.details["checkpoint_format"] == "gptq_v2"
    assert json.loads((tmp_path / "v2" / "quantize_config.json").read_text())["checkpoint_format"] == "gptq_v2"
    check_weights(tmp_path / "v2", asym_run)
    with pytest.raises(ConfigError, match="must be one of auto, gptq, gptq_v2"):
        export(asym_run, "gptq", tmp_path / "bad", options={"checkpoint_format": "v3"})
    with pytest.raises(ConfigError, match="--format torchao has no setting checkpoint_format"):
        export(asym_run, "torchao", tmp_path / "bad", options={"checkpoint_format": "gptq"})


def test_recipe_excludes_float_layers_and_overrides_the_others(tmp_path, mixed_plan):
    export(mixed_plan, "gptq", tmp_path / "recipe")
    config = json.loads((tmp_path / "recipe" / "quantize_config.json").read_text())
    assert gptqmodel_layout(config, "model.layers.1.mlp.gate_proj") is None
    assert gptqmodel_layout(config, "model.layers.1.mlp.up_proj") == (8, -1, True)
    assert gptqmodel_layout(config, "model.layers.1.mlp.down_proj") == (8, 64, False)
    assert gptqmodel_layout(config, "model.layers.0.mlp.down_proj") == (4, 32, False)
    assert gptqmodel_layout(config, "model.layers.10.mlp.down_proj") == (4, 32, False)  # anchored: no prefix hits


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_matches_gptqmodel_unpacking(bits):
    from qanalyze.export.gptq_pack import pack_rows

    codes = np.random.default_rng(bits).integers(0, 2**bits, size=(96, 5))
    assert np.array_equal(gptqmodel_unpack(pack_rows(codes, bits), bits), codes)
