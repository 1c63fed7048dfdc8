"""llama.cpp: a plan's recipe is one anchored ``pattern=type`` per GGUF tensor (HF names mapped, column entries in
the GGML type that stores them, snapped ones recorded); a run's GGUF file, reloaded by transformers' GGUF loader,
holds exactly the weights qanalyze evaluated, in the planned GGML types, and gives the same logits; codes no
llama.cpp type holds are refused by name, through the CLI with exit 2 and nothing left behind."""

from __future__ import annotations

import json
import re

import pytest
import torch
from cli_helpers import assert_one_line_error, run_cli
from gguf import GGUFReader

from qanalyze import quantize
from qanalyze.engine.column_checkpoint import load_column_run
from qanalyze.errors import ConfigError
from qanalyze.export.registry import get_exporter
from qanalyze.export.run import export
from qanalyze.models import load_model
from qanalyze.plan.uniform import resolve_plan

LAYER = "model.layers.0."
TYPES = {"self_attn.q_proj": ("Q3_K", 3, "symmetric", 16), "self_attn.k_proj": ("Q2_K", 2, "asymmetric", 16),
         "self_attn.v_proj": ("Q6_K", 6, "symmetric", 16), "self_attn.o_proj": ("Q8_0", 8, "symmetric", 32)}
"""Layer 0 of the wide tiny LLaMA in a type each (the others: Q4_K, Q5_0 for down_proj's 320 columns, up_proj
float)."""


def _recipe(folder) -> dict[str, str]:
    lines = (folder / "tensor-types.txt").read_text().split()
    return dict(line.split("=") for line in lines)


def test_recipe_maps_names_and_types(tmp_path, mixed_plan, plan_variant):
    # 8-bit per row (layer 1's up_proj) is no GGML type: Q8_0's blocks of 32 are finer, so --snap up takes it
    with pytest.raises(ConfigError, match=r"llama-cpp cannot store model\.layers\.1\.mlp\.up_proj at 8-bit row "
                                          r"sym .*pass --snap up"):
        export(mixed_plan, "llama-cpp", tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    plan = plan_variant("model.layers.1.mlp.down_proj", weight_bits=3)
    record = export(plan, "llama-cpp", tmp_path / "lc", snap="up")
    assert record.snapped == [  # 3-bit asym: Q4_0 has a bit more, no minimum needed; Q3_K needs 256 columns
        {"module": "model.layers.1.mlp.up_proj", "planned": "8-bit row sym", "stored": "Q8_0"},
        {"module": "model.layers.1.mlp.down_proj", "planned": "3-bit g64 asym", "stored": "Q4_0"}]
    assert record.exact == 11  # 4-bit g32 asym is Q4_1
    types = _recipe(tmp_path / "lc")
    assert types[r"^blk\.0\.attn_q\.weight$"] == "q4_1" and types[r"^blk\.1\.ffn_up\.weight$"] == "q8_0"
    assert types[r"^blk\.1\.ffn_down\.weight$"] == "q4_0" and types[r"^blk\.1\.ffn_gate\.weight$"] == "f32"
    assert types[r"^token_embd\.weight$"] == "f32" and len(types) == 16
    # each pattern finds its own tensor and no other (blk.1 is not blk.10)
    for pattern in types:
        assert re.search(pattern, pattern[1:-1].replace("\\", "")) and not re.search(pattern, "blk.10.attn_q.weight")
    assert "llama-quantize --tensor-type-file" in (tmp_path / "lc" / "llama-quantize.sh").read_text()


@pytest.fixture(scope="module")
def ggml_run(tmp_path_factory, tiny_wide_llama_dir, export_lm_data):
    """An rtn run of uniform:Q4_K with layer 0's attention in Q3_K, Q2_K, Q6_K and Q8_0, and up_proj float."""
    plan = resolve_plan("uniform:Q4_K", load_model(str(tiny_wide_llama_dir)).model).to_dict()
    for module, (kind, bits, scheme, block) in TYPES.items():
        entry = plan["modules"][LAYER + module]
        rows, columns = plan["model"]["modules"][LAYER + module]
        entry.update(column_group=kind, weight_bits=bits, scheme=scheme, groups=rows * columns // block)
    plan["modules"][LAYER + "mlp.up_proj"] = {"float": True}
    folder = tmp_path_factory.mktemp("ggml-run")
    (folder / "plan.json").write_text(json.dumps(plan))
    quantize(str(tiny_wide_llama_dir), export_lm_data, str(folder / "plan.json"), folder / "rtn", method="rtn")
    return folder / "rtn"


def test_gguf_of_a_ggml_run_reloads_the_evaluated_weights(tmp_path, ggml_run, perplexity):
    record = export(ggml_run, "llama-cpp", tmp_path / "lc")
    assert record.modules == record.exact == 6 and record.details["tensor_types"] == {
        "F32": 5, "Q2_K": 1, "Q3_K": 1, "Q4_K": 1, "Q5_0": 1, "Q6_K": 1, "Q8_0": 1}
    stored = {tensor.name: tensor.tensor_type.name for tensor in GGUFReader(tmp_path / "lc" / "model.gguf").tensors}
    assert stored["blk.0.attn_k.weight"] == "Q2_K" and stored["blk.0.ffn_up.weight"] == "F32"
    assert "output.weight" not in stored  # tied embeddings
    model = get_exporter("llama-cpp").load(tmp_path / "lc")
    reference, tokenizer, _, _ = load_column_run(ggml_run)
    for name, module in reference.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert torch.equal(model.get_submodule(name).weight, module.weight), name
    ids = torch.arange(40).reshape(2, 20) * 7
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    assert perplexity(model, tokenizer) == pytest.approx(perplexity(reference, tokenizer), rel=1e-6)


def test_symmetric_column_codes_are_stored_as_q4_0(tmp_path, tiny_wide_llama_dir, export_lm_data):
    quantize(str(tiny_wide_llama_dir), export_lm_data, "uniform:4:g32:sym", tmp_path / "rtn", method="rtn")
    record = export(tmp_path / "rtn", "llama-cpp", tmp_path / "lc")
    assert record.details["tensor_types"] == {"F32": 4, "Q4_0": 7}
    model = get_exporter("llama-cpp").load(tmp_path / "lc")
    reference, _, _, _ = load_column_run(tmp_path / "rtn")
    for name, module in reference.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert torch.equal(model.get_submodule(name).weight, module.weight), name


def test_codes_no_type_holds_are_refused_through_the_cli(capfd, tmp_path, asym_run, ggml_run):
    code, _, err = run_cli(capfd, "export", asym_run, "--format", "llama-cpp", "--out", tmp_path / "x",
                           "--snap", "up")
    assert_one_line_error(code, err, "llama-cpp cannot store model.layers.0.self_attn.q_proj at 4-bit g64 asym",
                          "quantize with a plan made with --target gguf")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "old.txt").write_text("keep me")
    code, _, err = run_cli(capfd, "export", ggml_run, "--format", "llama-cpp", "--out", tmp_path / "x")
    assert_one_line_error(code, err, "exists; pass --overwrite")
    assert [path.name for path in tmp_path.iterdir()] == ["x"] and (tmp_path / "x" / "old.txt").is_file()
    code, _, err = run_cli(capfd, "export", ggml_run, "--format", "gguf", "--out", tmp_path / "y")
    assert_one_line_error(code, err, "'gguf' is not one of 'compressed-tensors', 'gptq', 'llama-cpp', 'torchao'")
