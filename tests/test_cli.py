"""The command line: real commands, real exit codes, one-line errors and no partial output."""

import csv
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from cli_helpers import assert_one_line_error, run_cli

from qanalyze.cli import main

ROOT = Path(__file__).resolve().parents[1]




def test_help_lists_every_command():
    result = subprocess.run([sys.executable, str(ROOT / "cli.py"), "--help"], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0
    for command in ("finetune", "evaluate", "analyze", "plan", "train", "sweep", "report"):
        assert command in result.stdout


def _finetune_args(model, data, out, *extra):
    return ["finetune", model, "--task", "sst2", "--data", data, "--out", out, "--max-train-examples", "32",
            "--max-eval-examples", "16", "--max-length", "24", "--epochs", "1", "--batch-size", "16",
            "--quiet", *extra]


def test_missing_model_path(capfd, tmp_path, glue_dir):
    code, _, err = run_cli(capfd, *_finetune_args(str(tmp_path / "nope"), glue_dir, tmp_path / "out"))
    assert_one_line_error(code, err, "model path not found", "nope")
    assert not (tmp_path / "out").exists()


def test_folder_without_config(capfd, tmp_path, glue_dir):
    (tmp_path / "model").mkdir()
    code, _, err = run_cli(capfd, *_finetune_args(tmp_path / "model", glue_dir, tmp_path / "out"))
    assert_one_line_error(code, err, "config.json")
    assert not (tmp_path / "out").exists()


def test_unknown_task_lists_known_ones(capfd, tmp_path, glue_dir):
    code, _, err = run_cli(capfd, "finetune", "minilm-l6", "--task", "sst5", "--data", glue_dir,
                           "--out", tmp_path / "out")
    assert_one_line_error(code, err, "sst5", "sst2", "mrpc", "stsb")
    assert not (tmp_path / "out").exists()


def test_data_folder_without_tsv_files(capfd, tmp_path, tiny_bert_dir):
    (tmp_path / "data").mkdir()
    code, _, err = run_cli(capfd, *_finetune_args(tiny_bert_dir, tmp_path / "data", tmp_path / "out"))
    assert_one_line_error(code, err, "train.tsv")
    assert not (tmp_path / "out").exists()


def test_tsv_missing_a_column_names_it(capfd, tmp_path, tiny_bert_dir):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.tsv", "dev.tsv"):
        (data / name).write_text("text\tlabel\na fine film\t1\n")
    code, _, err = run_cli(capfd, *_finetune_args(tiny_bert_dir, data, tmp_path / "out"))
    assert_one_line_error(code, err, "sentence")
    assert not (tmp_path / "out").exists()


def test_label_outside_the_label_set(capfd, tmp_path, tiny_bert_dir):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.tsv").write_text("sentence\tlabel\na fine film\t1\na dull one\t0\n")
    (data / "dev.tsv").write_text("sentence\tlabel\nso so\t2\n")
    code, _, err = run_cli(capfd, *_finetune_args(tiny_bert_dir, data, tmp_path / "out"))
    assert_one_line_error(code, err, "'2'", "dev.tsv")
    assert not (tmp_path / "out").exists()


def test_output_directory_that_is_not_a_run(capfd, tmp_path, tiny_bert_dir, glue_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    code, _, err = run_cli(capfd, *_finetune_args(tiny_bert_dir, glue_dir, out))
    assert_one_line_error(code, err, "not a qanalyze run", "--overwrite")
    assert (out / "thesis.tex").read_text() == "precious"


def test_finetune_then_evaluate_end_to_end(capfd, tmp_path, tiny_bert_dir, glue_dir):
    out = tmp_path / "run"
    code, stdout, err = run_cli(capfd, *_finetune_args(tiny_bert_dir, glue_dir, out))
    assert code == 0, err
    assert "sst2 dev (16 examples): accuracy" in stdout
    record = json.loads((out / "metrics.json").read_text())
    low, high = record["intervals"]["accuracy"]  # the 95 % bootstrap interval, printed beside the metric
    assert low <= record["metrics"]["accuracy"] <= high and f"[{low:.4f}, {high:.4f}]" in stdout
    assert (out / "predictions.json").is_file()
    assert record["schema"] == "qanalyze/run/v1" and record["settings"]["max_length"] == 24

    # A finished run is refused without --overwrite, and evaluate reuses its task, data and length.
    code, _, err = run_cli(capfd, *_finetune_args(tiny_bert_dir, glue_dir, out))
    assert_one_line_error(code, err, "is a qanalyze run")
    code, stdout, err = run_cli(capfd, "evaluate", out, "--max-eval-examples", "16", "--quiet")
    assert code == 0, err
    written = json.loads((out / "eval-sst2-dev.json").read_text())
    assert written["schema"] == "qanalyze/eval/v1"
    assert written["metrics"]["accuracy"] == pytest.approx(record["metrics"]["accuracy"])
    assert f"accuracy {record['metrics']['accuracy']:.4f}" in stdout


def _train_args(model, data, out, plan, *extra):
    return ["train", model, "--plan", plan, "--task", "sst2", "--data", data, "--out", out,
            "--max-train-examples", "32", "--max-eval-examples", "16", "--max-length", "24", "--epochs", "1",
            "--batch-size", "16", "--quiet", *extra]


def test_train_with_a_uniform_plan_then_evaluate_the_packed_run(capfd, tmp_path, tiny_bert_dir, glue_dir):
    out = tmp_path / "int8"
    code, _, err = run_cli(capfd, *_train_args(tiny_bert_dir, glue_dir, out, "uniform:8", "--mode", "int"))
    assert code == 0, err
    record = json.loads((out / "metrics.json").read_text())
    assert record["mode"] == "int" and record["plan"] == "uniform:8"
    assert (out / "weights.safetensors").is_file() and (out / "plan.json").is_file()
    code, _, err = run_cli(capfd, "evaluate", out, "--max-eval-examples", "16", "--quiet")
    assert code == 0, err
    written = json.loads((out / "eval-sst2-dev.json").read_text())
    assert written["metrics"]["accuracy"] == pytest.approx(record["metrics"]["accuracy"])


def test_train_refuses_bad_plans_with_one_line_and_no_run(capfd, tmp_path, tiny_bert_dir, glue_dir):
    out = tmp_path / "run"
    code, _, err = run_cli(capfd, *_train_args(tiny_bert_dir, glue_dir, out, "uniform:1"))
    assert_one_line_error(code, err, "2 to 16")
    code, _, err = run_cli(capfd, *_train_args(tiny_bert_dir, glue_dir, out, str(tmp_path / "none.json")))
    assert_one_line_error(code, err, "plan file", "not found")
    # a plan whose architecture differs: a plan made for a 3-layer model does not fit the 2-layer one
    from transformers import BertConfig, BertForSequenceClassification

    from qanalyze.plan.uniform import uniform_plan

    other = BertForSequenceClassification(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=3,
                                                     num_attention_heads=2, intermediate_size=64))
    uniform_plan(other, 8).save(tmp_path / "other.json")
    code, _, err = run_cli(capfd, *_train_args(tiny_bert_dir, glue_dir, out, tmp_path / "other.json"))
    assert_one_line_error(code, err, "another architecture")
    # a layer norm planned for a mode that keeps it in float
    from qanalyze.models import load_model

    tiny = load_model(str(tiny_bert_dir), num_labels=2).model
    uniform_plan(tiny, 8, kinds=("linear", "layernorm")).save(tmp_path / "ln.json")
    code, _, err = run_cli(capfd, *_train_args(tiny_bert_dir, glue_dir, out, tmp_path / "ln.json", "--mode", "qat"))
    assert_one_line_error(code, err, "cannot quantize", "LayerNorm")
    assert not out.exists()


def test_console_script_exit_code_for_bad_input(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "cli.py"), "evaluate", str(tmp_path / "missing"),
                             "--task", "sst2", "--data", str(tmp_path)], capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_analyze_writes_sensitivity_and_refuses_bad_input(capfd, tmp_path, tiny_bert_dir, glue_dir):
    out = tmp_path / "sensitivity.json"
    common = ["--task", "sst2", "--data", glue_dir, "--max-train-examples", "32", "--batch-size", "8",
              "--batches", "2", "--max-length", "24", "--bits", "2,4,8", "--gradient-bits", "4,8",
              "--trace-probes", "8", "--quiet"]
    code, _, err = run_cli(capfd, "analyze", tiny_bert_dir, *common, "--hvp-precision", "float32", "--out", out)
    assert code == 0, err
    record = json.loads(out.read_text())
    assert record["schema"] == "qanalyze/sensitivity/v1"
    assert "bert.encoder.layer.1.output.dense" in record["modules"]
    assert record["settings"]["hvp_precision"] == "float32"

    code, _, err = run_cli(capfd, "analyze", tiny_bert_dir, *common, "--out", out)
    assert_one_line_error(code, err, "exists", "--overwrite")
    code, _, err = run_cli(capfd, "analyze", tiny_bert_dir, *common, "--modules", "no_such", "--out",
                           tmp_path / "a.json")
    assert_one_line_error(code, err, "matches none")
    code, _, err = run_cli(capfd, "analyze", tiny_bert_dir, *common, "--batches", "40", "--out", tmp_path / "b.json")
    assert_one_line_error(code, err, "needs 320 training examples")
    code, _, err = run_cli(capfd, "analyze", "minilm-l6", *common, "--out", tmp_path / "c.json")
    assert_one_line_error(code, err, "no trained sst2 head", "qanalyze finetune")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sensitivity.json"]


def test_plan_and_sweep_from_a_sensitivity_file(capfd, tmp_path, tiny_bert_dir, glue_dir):
    sensitivity = tmp_path / "sensitivity.json"
    code, _, err = run_cli(capfd, "analyze", tiny_bert_dir, "--task", "sst2", "--data", glue_dir,
                           "--max-train-examples", "16", "--batch-size", "8", "--batches", "2", "--max-length", "24",
                           "--bits", "2,3,4,5,6,8,12,16", "--gradient-bits", "4,8", "--trace-probes", "4",
                           "--metrics", "trace,weights,activations,gradients", "--quiet", "--out", sensitivity)
    assert code == 0, err
    out = tmp_path / "plan-4bit.json"
    code, stdout, err = run_cli(capfd, "plan", tiny_bert_dir, "--budget", "4bit", "--sensitivity", sensitivity,
                                "--out", out, "--baselines", "--quiet")
    assert code == 0, err
    plan = json.loads(out.read_text())
    assert plan["schema"] == "qanalyze/plan/v1" and plan["totals"]["weight_bits_mean"] <= 4.0
    for name in ("uniform", "random", "reversed"):
        assert json.loads((tmp_path / f"plan-4bit.{name}.json").read_text())["baseline"] == name
    assert "hessian plan, mean weight bits" in stdout
    # in a fresh process, where highspy prints its banner from C++ on first use unless silenced
    fresh = subprocess.run([sys.executable, str(ROOT / "cli.py"), "plan", str(tiny_bert_dir), "--budget", "3bit",
                            "--sensitivity", str(sensitivity), "--out", str(tmp_path / "plan-3bit.json"), "--quiet"],
                           capture_output=True, text=True, check=False)
    assert fresh.returncode == 0 and fresh.stdout.startswith(str(tmp_path / "plan-3bit.json")), fresh.stdout
    code, stdout, _ = run_cli(capfd, "plan", "--show", out)
    assert code == 0

    for budget, fragment in (("4 bananas", "4bit"), ("0.1bit", "smallest reachable"), ("2x3", "4bit")):
        target = tmp_path / "bad.json"
        code, _, err = run_cli(capfd, "plan", tiny_bert_dir, "--budget", budget, "--sensitivity", sensitivity,
                               "--out", target, "--quiet")
        assert_one_line_error(code, err, fragment)
        assert not target.exists()
    code, _, err = run_cli(capfd, "plan", "minilm-l6", "--budget", "4bit", "--sensitivity", sensitivity,
                           "--out", tmp_path / "other.json", "--quiet")
    assert_one_line_error(code, err, "another architecture")
    assert not (tmp_path / "other.json").exists()

    sweep = ["sweep", tiny_bert_dir, "--task", "sst2", "--data", glue_dir, "--max-train-examples", "16",
             "--max-eval-examples", "16", "--max-length", "24", "--sensitivity", sensitivity, "--quiet"]
    code, stdout, err = run_cli(capfd, *sweep, "--budgets", "4,8", "--plans", "hessian,uniform", "--mode",
                                "ptq-dynamic", "--integer-bits", "none", "--out", tmp_path / "sweep")
    assert code == 0, err
    table = pd.read_csv(tmp_path / "sweep" / "sweep.csv")
    assert list(table["plan"]) == ["fp32", "hessian", "uniform", "hessian", "uniform"]
    assert list(table["budget"].fillna("")) == ["", "4bit", "4bit", "8bit", "8bit"]
    assert "hessian" in stdout and "delta_pts" in stdout
    for bad, fragment in ((["--budgets", "1"], "smallest reachable"), (["--plans", "best"], "unknown plan kind"),
                          (["--budgets", "4", "--resume"], "continues by itself"),
                          (["--budgets", "4", "--modes", "qat,int5"], "'int5' not among"),
                          (["--budgets", "4", "--modes", "qdylora", "--eval-ranks", "0"], "positive integers")):
        code, _, err = run_cli(capfd, *sweep, *bad, "--out", tmp_path / "bad-sweep")
        assert_one_line_error(code, err, fragment)
        assert not (tmp_path / "bad-sweep").exists()


def test_qdylora_train_then_evaluate_at_several_ranks(capfd, tmp_path, tiny_bert_dir, glue_dir):
    out = tmp_path / "qdylora"
    args = ["train", tiny_bert_dir, "--mode", "qdylora", "--base", "nf4", "--lora-rank", "4", "--eval-ranks", "1,4",
            "--task", "sst2", "--data", glue_dir, "--max-train-examples", "32", "--max-eval-examples", "16",
            "--max-length", "24", "--max-steps", "2", "--batch-size", "16", "--quiet", "--out", out]
    code, stdout, err = run_cli(capfd, *args)
    assert code == 0, err
    assert "dev at rank 1" in stdout and "dev at rank 4" in stdout
    record = json.loads((out / "metrics.json").read_text())
    code, stdout, err = run_cli(capfd, "evaluate", out, "--ranks", "1,4", "--max-eval-examples", "16", "--quiet")
    assert code == 0, err
    saved = json.loads((out / "eval-sst2-dev.json").read_text())
    assert saved["rank_metrics"] == record["rank_metrics"]
    code, _, err = run_cli(capfd, *args[:4], "--task", "sst2", "--data", glue_dir, "--out", tmp_path / "x")
    assert_one_line_error(code, err, "needs --plan")
    assert not (tmp_path / "x").exists()


def test_int4_lss_keep_fraction_reaches_the_run_and_bad_values_are_refused(capfd, tmp_path, tiny_bert_dir, glue_dir):
    out = tmp_path / "int4"
    args = _train_args(tiny_bert_dir, glue_dir, out, "uniform:4", "--mode", "int4", "--lss", "--lss-keep", "0.75",
                       "--lss-budget", "nonzero", "--hq-block", "8", "--max-steps", "2")
    code, _, err = run_cli(capfd, *args)
    assert code == 0, err
    options = json.loads((out / "metrics.json").read_text())["settings"]["mode_options"]
    assert options["lss"] is True and options["keep_fraction"] == 0.75 and options["budget"] == "nonzero"
    code, _, err = run_cli(capfd, *_train_args(tiny_bert_dir, glue_dir, tmp_path / "bad", "uniform:4", "--mode",
                                               "int4", "--lss-keep", "0"))
    assert code == 2 and "--lss-keep" in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()


def test_help_shows_each_methods_options_under_its_heading_and_the_sweeps_own_epochs(capfd):
    assert main(["train", "--help"]) == 0
    text = capfd.readouterr().out
    assert text.index("int4 options (--mode int4)") < text.index("--lss-keep")
    assert text.index("qdylora options (--mode qdylora)") < text.index("--lora-rank")
    assert main(["sweep", "--help"]) == 0
    text = " ".join(capfd.readouterr().out.split())
    assert "--epochs INTEGER RANGE [default: 1;" in text


def test_cli_defaults_are_the_library_defaults():
    import click

    from qanalyze.cli import build_cli
    from qanalyze.plan.make import PlanConfig
    from qanalyze.sensitivity.analyze import AnalyzeConfig

    commands = build_cli().commands
    analyze = {p.name: p.default for p in commands["analyze"].params if isinstance(p, click.Option)}
    config = AnalyzeConfig()
    assert analyze["batches"] == config.batches and analyze["batch_size"] == config.batch_size
    assert tuple(analyze["metrics"].split(",")) == config.metrics
    assert analyze["trace_probes"] == config.trace_max_probes and analyze["trace_tol"] == config.trace_rel_tol
    assert analyze["eig_tol"] == config.eig_tol and analyze["gradient_draws"] == config.gradient_draws
    assert analyze["trace_refine_params"] == config.trace_refine_params
    assert tuple(int(b) for b in analyze["gradient_bits"].split(",")) == config.gradient_bits
    plan = {p.name: p.default for p in commands["plan"].params if isinstance(p, click.Option)}
    defaults = PlanConfig()
    assert tuple(int(b) for b in plan["bit_list"].split(",")) == defaults.bits
    assert tuple(plan["group_sizes"].split(",")) == defaults.groups
    assert tuple(plan["keep_float"].split(",")) == defaults.keep_float
    assert plan["no_default_ties"] is not True and defaults.default_ties  # the flag turns default ties off
    assert (plan["objective"], plan["seq_len"], plan["grad_tol"]) == (defaults.objective, defaults.seq_len,
                                                                    defaults.grad_tol)


def test_an_unknown_qanalyze_kernel_is_refused_with_one_line(capfd, monkeypatch, tmp_path, tiny_bert_dir, glue_dir):
    monkeypatch.setenv("QANALYZE_KERNEL", "vnni")
    out = tmp_path / "run"
    code, _, err = run_cli(capfd, *_train_args(tiny_bert_dir, glue_dir, out, "uniform:8", "--mode", "int"))
    assert_one_line_error(code, err, "QANALYZE_KERNEL='vnni' is not a kernel", "known: auto, reference, float")
    assert not out.exists()  # refused before the run directory is made


def test_diverged_training_has_its_own_exit_code(capfd, tmp_path, tiny_bert_dir, glue_dir):
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    broken = tmp_path / "nan-model"
    model = BertForSequenceClassification.from_pretrained(str(tiny_bert_dir))
    with torch.no_grad():
        model.classifier.weight.fill_(float("nan"))
    model.save_pretrained(broken)
    AutoTokenizer.from_pretrained(str(tiny_bert_dir)).save_pretrained(broken)
    capfd.readouterr()
    code, _, err = run_cli(capfd, *_finetune_args(broken, glue_dir, tmp_path / "out"))
    assert code == 3, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: training diverged at step 1"), err
    assert "no checkpoint was saved yet (--save-every 100)" in lines[0]
    assert "the loss of every step is in" in lines[0]
    with open(tmp_path / "out" / "log.csv") as handle:  # what a diverged run keeps: the loss up to the bad step
        rows = list(csv.DictReader(handle))
    assert [row["step"] for row in rows] == ["1"] and rows[0]["loss"] == "nan"


def test_refusals_come_before_any_work_and_leave_nothing(capfd, tmp_path, tiny_bert_dir, glue_dir):
    # an analysis tolerance, a length beyond the model's positions, LoRA targets that match nothing, a device
    out = tmp_path / "sens.json"
    code, _, err = run_cli(capfd, "analyze", tiny_bert_dir, "--task", "sst2", "--data", glue_dir, "--out", out,
                           "--eig-tol", "-1", "--quiet")
    assert_one_line_error(code, err, "--eig-tol must be a positive finite number")
    assert list(tmp_path.iterdir()) == []
    args = _train_args(tiny_bert_dir, glue_dir, tmp_path / "long", "uniform:8", "--mode", "int")
    args[args.index("--max-length") + 1] = "3000"
    code, _, err = run_cli(capfd, *args)
    assert_one_line_error(code, err, "--max-length 3000 exceeds the model's position limit of 128 tokens")
    code, _, err = run_cli(capfd, *_train_args(tiny_bert_dir, glue_dir, tmp_path / "lora", "uniform:8", "--mode",
                                               "qdylora", "--lora-targets", "nomatch"))
    assert_one_line_error(code, err, "no nn.Linear module name matches the LoRA targets nomatch")
    code, _, err = run_cli(capfd, "evaluate", tiny_bert_dir, "--task", "sst2", "--data", glue_dir, "--device", "tpu",
                           "--max-eval-examples", "8", "--quiet")
    assert_one_line_error(code, err, "device must be auto, cpu or cuda[:N], got 'tpu'")
    assert list(tmp_path.iterdir()) == []


def test_no_output_replaces_an_input_or_an_existing_file(capfd, tmp_path, tiny_bert_dir, glue_dir):
    run = tmp_path / "run"
    code, _, err = run_cli(capfd, *_finetune_args(tiny_bert_dir, glue_dir, run))
    assert code == 0, err
    record = (run / "metrics.json").read_text()
    code, _, err = run_cli(capfd, "evaluate", run, "--out", run / "metrics.json", "--max-eval-examples", "8", "-q")
    assert_one_line_error(code, err, "would replace the input")
    assert (run / "metrics.json").read_text() == record
    kept = tmp_path / "kept.json"
    kept.write_text("mine")
    code, _, err = run_cli(capfd, "evaluate", run, "--out", kept, "--max-eval-examples", "8", "-q")
    assert_one_line_error(code, err, "exists; pass --overwrite")
    assert kept.read_text() == "mine"
    code, _, err = run_cli(capfd, "evaluate", run, "--out", kept, "--max-eval-examples", "8", "-q", "--overwrite")
    assert code == 0, err
    page = tmp_path / "page.html"
    code, _, err = run_cli(capfd, "report", run, "--out", run / "metrics.json", "--quiet")
    assert_one_line_error(code, err, "would replace the input")
    assert (run / "metrics.json").read_text() == record
    page.write_text("mine")
    code, _, err = run_cli(capfd, "report", run, "--out", page, "--quiet")
    assert_one_line_error(code, err, "exists; pass --overwrite")
    assert page.read_text() == "mine"


def test_resume_with_another_mode_names_the_mode_not_missing_tensors(capfd, tmp_path, tiny_bert_dir, glue_dir):
    from qanalyze import load_task, verbs
    from qanalyze.engine.train import TrainConfig, TrainingInterrupted

    out = tmp_path / "run"

    def stop(log):
        raise KeyboardInterrupt

    data = load_task("sst2", glue_dir, max_train_examples=32, max_eval_examples=16)
    with pytest.raises(TrainingInterrupted):
        verbs.train(str(tiny_bert_dir), data, TrainConfig(max_steps=2, batch_size=16, max_length=24), out, mode="qat",
                    plan="uniform:8", on_step=stop)
    code, _, err = run_cli(capfd, *_train_args(tiny_bert_dir, glue_dir, out, "uniform:8", "--mode", "int",
                                               "--resume"))
    assert_one_line_error(code, err, "with a different plan or mode (it was qat)")
    assert "missing" not in err


def _with_file_size_limit(limit):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_file_size_limit_in_the_middle_of_training_is_exit_2_and_leaves_no_half_checkpoint(tmp_path, tiny_bert_dir,
                                                                                           glue_dir):
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "qanalyze", *_finetune_args(tiny_bert_dir, glue_dir, out)],
                            capture_output=True, text=True, preexec_fn=_with_file_size_limit(200_000),
                            env={**os.environ, "QANALYZE_THREADS": "1"}, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert lines == ["error: cannot write or read: File too large"], result.stderr
    assert not any(path.name.startswith("checkpoint") for path in out.iterdir())


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders: nothing to refuse")
def test_a_read_only_output_folder_is_refused_before_any_work(capfd, tmp_path, tiny_bert_dir, glue_dir):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code, _, err = run_cli(capfd, *_finetune_args(tiny_bert_dir, glue_dir, locked / "run"))
        assert_one_line_error(code, err, "is not writable")
        code, _, err = run_cli(capfd, "report", tiny_bert_dir, "--out", locked / "r.html")
        assert_one_line_error(code, err, "is not writable")
    finally:
        locked.chmod(0o755)


def _without_times(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("created", "timings", "versions", "eval_history")}


def test_the_same_inputs_give_the_same_records_from_any_working_directory(capfd, tmp_path, tiny_bert_dir, glue_dir,
                                                                          monkeypatch):
    records = []
    for where in ("a", "b/c"):
        cwd = tmp_path / where
        cwd.mkdir(parents=True)
        monkeypatch.chdir(cwd)
        model, data = os.path.relpath(tiny_bert_dir, cwd), os.path.relpath(glue_dir, cwd)
        out = os.path.relpath(tmp_path / f"run-{where.replace('/', '-')}", cwd)
        code, _, err = run_cli(capfd, "finetune", model, "--task", "sst2", "--data", data, "--max-steps", "1",
                               "--max-train-examples", "8", "--max-eval-examples", "8", "--max-length", "16",
                               "--batch-size", "4", "--quiet", "--out", out)
        assert code == 0, err
        records.append(json.loads((cwd / out / "metrics.json").read_text()))
    assert _without_times(records[0]) == _without_times(records[1])
    assert records[0]["model"]["source"] == str(tiny_bert_dir.resolve())
    assert records[0]["data"]["source"] == str(Path(glue_dir).resolve())


def test_the_objective_choices_are_the_planners_and_auto_follows_the_task():
    from qanalyze.cli_options import OBJECTIVE_CHOICES
    from qanalyze.plan.costs import OBJECTIVES
    from qanalyze.plan.make import resolve_objective

    assert ["auto", *OBJECTIVES] == OBJECTIVE_CHOICES
    assert resolve_objective("auto", "lm") == "fisher" and resolve_objective("auto", "classification") == "trace"
    assert resolve_objective("eig", "lm") == "eig"


def test_quantize_then_evaluate_prints_perplexity_and_kl(tmp_path, capfd, tiny_llama_dir, wikitext_sample_dir):
    out = tmp_path / "gptq"
    common = ["--task", "lm", "--data", wikitext_sample_dir, "--seq-len", 32]
    code, stdout, err = run_cli(capfd, "quantize", tiny_llama_dir, "--plan", "uniform:4:g32", "--method", "gptq",
                                *common, "--calib-windows", 4, "--out", out, "-q")
    assert code == 0, err
    assert "perplexity" in stdout and " kl " in stdout and "top1_agreement" in stdout
    code, stdout, err = run_cli(capfd, "evaluate", out)
    assert code == 0, err
    assert "perplexity" in stdout and " kl " in stdout
    # bad input: one line, exit 2, nothing written
    cases = [
        (["--plan", "uniform:4:g128"], "group size 128 does not divide the 32 input columns of model.layers.0"),
        (["--plan", "uniform:4:g32", "--method", "rtn", "--damp", "0.1"], "--damp applies to --method gptq only"),
        (["--plan", "uniform:9:g32"], "column-group plans take bits from 2 to 8"),
        (["--plan", "uniform:4:g32", "--calib-windows", 0], "--calib-windows"),
    ]
    for extra, message in cases:
        code, _, err = run_cli(capfd, "quantize", tiny_llama_dir, *common, *extra, "--out", tmp_path / "bad", "-q")
        assert_one_line_error(code, err, message)
        assert not (tmp_path / "bad").exists()
    code, _, err = run_cli(capfd, "quantize", tiny_llama_dir, *common, "--plan", "uniform:4:g32", "--out", out)
    assert_one_line_error(code, err, "exists and is a qanalyze run; pass --overwrite")
    code, _, err = run_cli(capfd, "train", tiny_llama_dir, "--mode", "gptq", *common, "--out", tmp_path / "t")
    assert code == 2 and "'gptq' is not one of" in err


def test_analyze_pipeline_refuses_what_a_split_model_cannot_measure(capfd, tmp_path, tiny_llama_dir,
                                                                    wikitext_sample_dir):
    common = ["analyze", tiny_llama_dir, "--task", "lm", "--data", wikitext_sample_dir, "--seq-len", "32",
              "--batches", "2", "--batch-size", "1", "--pipeline", "--quiet"]
    code, _, err = run_cli(capfd, *common, "--resume", "--out", tmp_path / "a.json")
    assert_one_line_error(code, err, "--pipeline", "without --resume")
    code, _, err = run_cli(capfd, *common, "--metrics", "eig", "--out", tmp_path / "b.json")
    assert_one_line_error(code, err, "eig")
    code, _, err = run_cli(capfd, *common, "--device", "cuda", "--out", tmp_path / "c.json")
    assert_one_line_error(code, err, "--pipeline", "--device cuda")
    assert not list(tmp_path.iterdir())
