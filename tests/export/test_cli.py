"""qanalyze export on the command line: what it prints, and every refusal (an unknown format, an entry the
format cannot store without --snap up, a run whose codes no layout of the format holds, a run of a training
mode, an existing --out) exits 2 with one line naming the module or the limit, and leaves nothing behind."""

from __future__ import annotations

import json

from cli_helpers import assert_one_line_error, run_cli

from qanalyze import train
from qanalyze.engine.train import TrainConfig


def _nothing_left(folder):
    return [path.name for path in folder.iterdir() if path.name.startswith(".")]


def test_snap_up_is_printed_and_recorded(capfd, tmp_path, plan_variant):
    plan = plan_variant("model.layers.1.mlp.down_proj", weight_bits=3)
    code, _, err = run_cli(capfd, "export", plan, "--format", "gptq", "--out", tmp_path / "plain")
    assert code == 0 and "13 modules (13 exact, 0 snapped)" in err  # gptq stores 3 bits
    code, out, err = run_cli(capfd, "export", plan, "--format", "compressed-tensors", "--out", tmp_path / "ct")
    assert_one_line_error(code, err, "compressed-tensors cannot store model.layers.1.mlp.down_proj at 3-bit g64",
                          "pass --snap up")
    assert not (tmp_path / "ct").exists() and not _nothing_left(tmp_path)
    code, out, err = run_cli(capfd, "export", plan, "--format", "compressed-tensors", "--out", tmp_path / "ct",
                             "--snap", "up")
    assert code == 0 and out.strip() == str(tmp_path / "ct")
    assert "snapped model.layers.1.mlp.down_proj: 3-bit g64 asym -> 4-bit g64 asym" in err
    record = json.loads((tmp_path / "ct" / "export.json").read_text())
    assert record["exact"] == 12 and record["snapped"][0]["stored"] == "4-bit g64 asym"


def test_refusals_exit_2_with_one_line(capfd, tmp_path, mixed_run):
    code, _, err = run_cli(capfd, "export", mixed_run, "--format", "onnx", "--out", tmp_path / "x")
    assert_one_line_error(code, err,
                          "'onnx' is not one of 'compressed-tensors', 'gptq', 'llama-cpp', 'torchao'")
    code, _, err = run_cli(capfd, "export", mixed_run, "--format", "torchao", "--out", tmp_path / "x",
                           "--snap", "up")
    assert_one_line_error(code, err, "torchao cannot store model.layers.1.mlp.down_proj at 8-bit g64",
                          "its codes are fixed")
    code, _, err = run_cli(capfd, "export", mixed_run, "--format", "torchao", "--out", tmp_path / "x",
                           "--gptq-checkpoint-format", "gptq_v2")
    assert_one_line_error(code, err, "--gptq-checkpoint-format is not a setting of --format torchao")
    code, _, err = run_cli(capfd, "export", tmp_path / "missing", "--format", "gptq", "--out", tmp_path / "x")
    assert_one_line_error(code, err, "does not exist")
    assert not (tmp_path / "x").exists() and not _nothing_left(tmp_path)


def test_an_existing_out_needs_overwrite(capfd, tmp_path, sym_run):
    (tmp_path / "ct").mkdir()
    (tmp_path / "ct" / "old.txt").write_text("keep me")
    code, _, err = run_cli(capfd, "export", sym_run, "--format", "compressed-tensors", "--out", tmp_path / "ct")
    assert_one_line_error(code, err, "exists; pass --overwrite")
    assert (tmp_path / "ct" / "old.txt").read_text() == "keep me"
    code, _, _ = run_cli(capfd, "export", sym_run, "--format", "compressed-tensors", "--out", tmp_path / "ct",
                         "--overwrite", "-q")
    assert code == 0 and not (tmp_path / "ct" / "old.txt").exists()
    assert (tmp_path / "ct" / "model.safetensors").is_file()


def test_a_run_of_a_training_mode_is_refused(capfd, tmp_path, export_llama_dir, export_lm_data):
    train(str(export_llama_dir), export_lm_data, TrainConfig(max_steps=1, batch_size=2), tmp_path / "fp32")
    code, _, err = run_cli(capfd, "export", tmp_path / "fp32", "--format", "gptq", "--out", tmp_path / "x")
    assert_one_line_error(code, err, "is a fp32 run", "rtn and gptq runs")
