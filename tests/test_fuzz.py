"""Hostile input, as a new user would type it: broken model folders, data files, budgets, plans,
sensitivity files, options and paths, run through the real CLI in a subprocess. Each must exit 2 with
one line on stderr that says what is wrong, print no traceback and create, change or remove no file.
`reports/RELIABILITY.md` lists the table and its result."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qanalyze.cli import main

DRIVER = Path(__file__).with_name("cli_driver.py")
SMALL = ["--max-train-examples", "16", "--max-eval-examples", "8", "--max-length", "16", "--batch-size", "4",
         "--quiet"]


def _edit_json(source: Path, target: Path, change) -> None:
    data = json.loads(source.read_text())
    change(data)
    target.write_text(json.dumps(data))


def _broken_models(x: Path, model: Path) -> None:
    (x / "empty_model").mkdir()
    (x / "config_only").mkdir()
    shutil.copy(model / "config.json", x / "config_only")
    (x / "bad_config").mkdir()
    (x / "bad_config" / "config.json").write_text("{oops")
    (x / "unknown_type").mkdir()
    (x / "unknown_type" / "config.json").write_text('{"model_type": "nonsense"}')
    shutil.copytree(model, x / "truncated_weights")
    weights = x / "truncated_weights" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    (x / "no_tokenizer").mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model / name, x / "no_tokenizer")


def _broken_data(x: Path, glue: Path) -> None:
    header = (glue / "SST-2" / "train.tsv").read_text().splitlines()[0]
    rows = {"empty_data": "", "header_only": header + "\n", "bad_label": header + "\na fine film\tmaybe\n",
            "wrong_columns": "text\tscore\nsome text\t1\n"}
    for name, text in rows.items():
        (x / name / "SST-2").mkdir(parents=True)
        (x / name / "SST-2" / "train.tsv").write_text(text)
        shutil.copy(glue / "SST-2" / "dev.tsv", x / name / "SST-2")
    (x / "binary_data" / "SST-2").mkdir(parents=True)
    (x / "binary_data" / "SST-2" / "train.tsv").write_bytes(bytes(range(256)) * 4)
    shutil.copy(glue / "SST-2" / "dev.tsv", x / "binary_data" / "SST-2")
    (x / "no_sst2").mkdir()


def _broken_plans(x: Path, plan: Path, sensitivity: Path) -> None:
    text = plan.read_text()
    (x / "plan_not_json.json").write_text("plan: 4 bits")
    (x / "plan_truncated.json").write_text(text[: len(text) // 2])
    first = next(iter(json.loads(text)["modules"]))
    _edit_json(plan, x / "plan_deleted_entry.json", lambda d: d["modules"].pop(first))
    _edit_json(plan, x / "plan_extra_entry.json", lambda d: d["modules"].update({"no.such.module": {"float": True}}))
    _edit_json(plan, x / "plan_1bit.json", lambda d: d["modules"][first].update({"weight_bits": 1}))
    _edit_json(plan, x / "plan_99bit.json", lambda d: d["modules"][first].update({"weight_bits": 99}))
    _edit_json(plan, x / "plan_string_bits.json", lambda d: d["modules"][first].update({"weight_bits": "4"}))
    _edit_json(plan, x / "plan_other_shape.json", lambda d: d["model"]["modules"].update({first: [7, 7]}))
    shutil.copy(sensitivity, x / "sensitivity_as_plan.json")


def _broken_sensitivity(x: Path, sensitivity: Path, plan: Path) -> None:
    text = sensitivity.read_text()
    (x / "s_truncated.json").write_text(text[: len(text) // 3])
    (x / "s_not_json.json").write_bytes(b"\x00\x01binary")
    _edit_json(sensitivity, x / "s_no_modules.json", lambda d: d.update({"modules": {}}))
    _edit_json(sensitivity, x / "s_unfinished.json", lambda d: d.update({"complete": False}))
    first = next(iter(json.loads(text)["modules"]))

    def nan_trace(d):
        d["modules"][first]["hessian"]["avg_trace"] = float("nan")

    def negative(d):
        for entry in d["modules"].values():
            entry["hessian"]["avg_trace"] = -abs(entry["hessian"].get("avg_trace") or 1.0)

    _edit_json(sensitivity, x / "s_nan_trace.json", nan_trace)
    _edit_json(sensitivity, x / "s_negative.json", negative)
    _edit_json(sensitivity, x / "s_other_weights.json", lambda d: d["model"].update({"weights_hash": "0" * 64}))
    _edit_json(sensitivity, x / "s_subset.json", lambda d: d["modules"].pop(first))
    shutil.copy(plan, x / "plan_as_sensitivity.json")


def _broken_runs(x: Path, run: Path) -> None:
    shutil.copytree(run, x / "corrupt_run")
    (x / "corrupt_run" / "metrics.json").write_text('{"schema": "qanalyze/run/v1", "task":')
    (x / "page.html").write_text("<html></html>")
    (x / "a_file").write_text("not a folder")
    (x / "not_a_run").mkdir()
    (x / "not_a_run" / "notes.txt").write_text("mine")
    (x / "existing.html").write_text("keep me")


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, tiny_bert_dir, glue_dir) -> dict[str, Path]:
    """A finished tiny run, its sensitivity file and plan, and broken copies of everything."""
    root = tmp_path_factory.mktemp("fuzz")
    good = root / "tree" / "good"
    run, sensitivity, plan = good / "run", good / "s.json", good / "plan.json"
    assert main(["finetune", str(tiny_bert_dir), "--task", "sst2", "--data", str(glue_dir), "--max-steps", "2",
                 "--out", str(run), *SMALL]) == 0
    assert main(["analyze", str(run), "--task", "sst2", "--data", str(glue_dir), "--batches", "1", "--batch-size", "4",
                 "--max-length", "16", "--trace-probes", "2", "--quiet", "--out", str(sensitivity)]) == 0
    assert main(["plan", str(run), "--budget", "4bit", "--sensitivity", str(sensitivity), "--quiet",
                 "--out", str(plan)]) == 0
    x = root / "tree" / "x"
    x.mkdir()
    _broken_models(x, tiny_bert_dir)
    _broken_data(x, glue_dir)
    _broken_plans(x, plan, sensitivity)
    _broken_sensitivity(x, sensitivity, plan)
    _broken_runs(x, run)
    return {"root": root, "x": x, "run": run, "s": sensitivity, "plan": plan, "model": tiny_bert_dir,
            "glue": glue_dir}


def _finetune(model="{model}", data="{glue}", *extra):
    return ["finetune", model, "--task", "sst2", "--data", data, "--max-steps", "1", *SMALL, "--out", "{x}/new",
            *extra]


def _train(plan, *extra):
    return ["train", "{run}", "--plan", plan, "--task", "sst2", "--data", "{glue}", "--max-steps", "1", *SMALL,
            "--out", "{x}/new", *extra]


def _plan(budget="4bit", sensitivity="{s}", *extra):
    return ["plan", "{run}", "--budget", budget, "--sensitivity", sensitivity, "--quiet", "--out", "{x}/p.json",
            *extra]


def _analyze(*extra):
    return ["analyze", "{run}", "--task", "sst2", "--data", "{glue}", "--batches", "1", "--batch-size", "4",
            "--max-length", "16",
            "--quiet", "--out", "{x}/s.json", *extra]


# (case, arguments, a fragment the one error line must hold)
CASES = [
    # broken model folders
    ("model-missing", _finetune("{x}/nope"), "not found"),
    ("model-empty-folder", _finetune("{x}/empty_model"), "empty_model"),
    ("model-config-only", _finetune("{x}/config_only"), "config_only"),
    ("model-bad-config-json", _finetune("{x}/bad_config"), "bad_config"),
    ("model-unknown-type", _finetune("{x}/unknown_type"), "nonsense"),
    ("model-truncated-weights", _finetune("{x}/truncated_weights"), "truncated_weights"),
    ("model-no-tokenizer", _finetune("{x}/no_tokenizer"), "tokenizer"),
    ("model-is-a-file", _finetune("{x}/a_file"), "a_file"),
    ("model-hub-id-not-reachable", _finetune("no-such-org/no-such-model"), "cannot fetch hub model"),
    # data
    ("data-missing", _finetune(data="{x}/nodata"), "nodata"),
    ("data-no-task-folder", _finetune(data="{x}/no_sst2"), "SST-2"),
    ("data-empty-file", _finetune(data="{x}/empty_data"), "train.tsv"),
    ("data-header-only", _finetune(data="{x}/header_only"), "train.tsv"),
    ("data-bad-label", _finetune(data="{x}/bad_label"), "label"),
    ("data-wrong-columns", _finetune(data="{x}/wrong_columns"), "train.tsv"),
    ("data-binary", _finetune(data="{x}/binary_data"), "train.tsv"),
    ("data-is-a-file", _finetune(data="{x}/a_file"), "a_file"),
    ("task-unknown", ["finetune", "{model}", "--task", "nope", "--data", "{glue}", "--out", "{x}/new"], "nope"),
    # budgets
    *[(f"budget-{b or 'empty'}", _plan(b), "budget") for b in
      ("abc", "0bit", "-3bit", "1bit", "33bit", "nanbit", "infbit", "1e400bit", "0MB", "0x", "", "4 bits?")],
    ("budget-unreachable-ratio", _plan("100x"), "100x"),
    ("budget-unreachable-bytes", _plan("1KB"), "1KB"),
    # plans
    ("plan-missing", _train("{x}/noplan.json"), "noplan.json"),
    ("plan-not-json", _train("{x}/plan_not_json.json"), "not valid JSON"),
    ("plan-truncated", _train("{x}/plan_truncated.json"), "truncated"),
    ("plan-deleted-entry", _train("{x}/plan_deleted_entry.json"), "no entry for module"),
    ("plan-extra-entry", _train("{x}/plan_extra_entry.json"), "no.such.module"),
    ("plan-1-bit", _train("{x}/plan_1bit.json"), "bits"),
    ("plan-99-bits", _train("{x}/plan_99bit.json"), "bits"),
    ("plan-string-bits", _train("{x}/plan_string_bits.json"), "bits"),
    ("plan-other-architecture", _train("{x}/plan_other_shape.json"), "architecture"),
    ("plan-is-a-sensitivity-file", _train("{x}/sensitivity_as_plan.json"), "schema"),
    ("plan-uniform-1", _train("uniform:1"), "from 2 to 16, not 1"),
    ("plan-uniform-17", _train("uniform:17"), "from 2 to 16, not 17"),
    ("plan-uniform-abc", _train("uniform:abc"), "uniform:abc"),
    ("plan-uniform-bad-layout", _train("uniform:4:zzz"), "zzz"),
    # sensitivity files
    ("sensitivity-missing", _plan(sensitivity="{x}/nos.json"), "nos.json"),
    ("sensitivity-truncated", _plan(sensitivity="{x}/s_truncated.json"), "truncated"),
    ("sensitivity-binary", _plan(sensitivity="{x}/s_not_json.json"), "s_not_json.json"),
    ("sensitivity-no-modules", _plan(sensitivity="{x}/s_no_modules.json"), "holds no modules"),
    ("sensitivity-unfinished", _plan(sensitivity="{x}/s_unfinished.json"), "unfinished analysis"),
    ("sensitivity-nan-trace", _plan(sensitivity="{x}/s_nan_trace.json"), "nan"),
    ("sensitivity-negative-traces", _plan(sensitivity="{x}/s_negative.json"), "zero or negative"),
    ("sensitivity-other-weights", _plan(sensitivity="{x}/s_other_weights.json"), "other weights"),
    ("sensitivity-subset", _plan(sensitivity="{x}/s_subset.json"), "--modules"),
    ("sensitivity-is-a-plan", _plan(sensitivity="{x}/plan_as_sensitivity.json"), "schema"),
    # options
    ("epochs-0", _finetune("{model}", "{glue}", "--epochs", "0"), "epochs"),
    ("batch-size-negative", _finetune("{model}", "{glue}", "--batch-size", "-1"), "batch-size"),
    ("lr-0", _finetune("{model}", "{glue}", "--lr", "0"), "lr"),
    ("lr-nan", _finetune("{model}", "{glue}", "--lr", "nan"), "lr"),
    ("max-length-0", _finetune("{model}", "{glue}", "--max-length", "0"), "max-length"),
    ("max-length-beyond-positions", _finetune("{model}", "{glue}", "--max-length", "100000"), "position"),
    ("device-unknown", _finetune("{model}", "{glue}", "--device", "tpu"), "tpu"),
    ("warmup-ratio-1", _finetune("{model}", "{glue}", "--warmup-ratio", "1"), "warmup-ratio"),
    ("save-every-0", _finetune("{model}", "{glue}", "--save-every", "0"), "save-every"),
    ("max-train-examples-0", _finetune("{model}", "{glue}", "--max-train-examples", "0"), "max-train-examples"),
    ("mode-unknown", _train("uniform:4", "--mode", "nope"), "nope"),
    ("threads-0", ["--threads", "0", *_finetune()], "threads"),
    ("threads-abc", ["--threads", "abc", *_finetune()], "threads"),
    ("seed-abc", _finetune("{model}", "{glue}", "--seed", "abc"), "seed"),
    ("metrics-unknown", _analyze("--metrics", "foo"), "foo"),
    ("analysis-bits-1", _analyze("--bits", "1"), "bits"),
    ("eig-tol-negative", _analyze("--eig-tol", "-1"), "eig-tol"),
    ("trace-tol-0", _analyze("--trace-tol", "0"), "trace-tol"),
    ("modules-match-nothing", _analyze("--modules", "nomatch"), "nomatch"),
    ("batches-0", _analyze("--batches", "0"), "batches"),
    ("eval-batch-size-0", ["evaluate", "{run}", "--batch-size", "0", "--out", "{x}/e.json"], "batch-size"),
    ("ranks-on-a-float-run", ["evaluate", "{run}", "--ranks", "1,2", "--out", "{x}/e.json"], "qdylora"),
    # paths
    ("out-is-a-file", _finetune("{model}", "{glue}", "--out", "{x}/a_file"), "a_file"),
    ("out-under-a-file", _finetune("{model}", "{glue}", "--out", "{x}/a_file/sub"), "a_file"),
    ("out-not-a-run", _finetune("{model}", "{glue}", "--out", "{x}/not_a_run"), "not a qanalyze run"),
    ("out-finished-run", _finetune("{model}", "{glue}", "--out", "{run}"), "--overwrite"),
    ("resume-nothing", _finetune("{model}", "{glue}", "--resume"), "nothing to resume"),
    ("resume-and-overwrite", _finetune("{model}", "{glue}", "--resume", "--overwrite"), "contradict"),
    ("report-over-its-input", ["report", "{s}", "--out", "{s}"], "would replace the input"),
    ("evaluate-over-the-run-record", ["evaluate", "{run}", "--out", "{run}/metrics.json"], "would replace"),
    ("report-over-an-existing-file", ["report", "{s}", "--out", "{x}/existing.html"], "--overwrite"),
    ("report-input-missing", ["report", "{x}/nothing.json", "--out", "{x}/r.html"], "not found"),
    ("report-corrupt-run-record", ["report", "{x}/corrupt_run", "--out", "{x}/r.html"], "corrupt or truncated"),
    ("report-truncated-sensitivity", ["report", "{x}/s_truncated.json", "--out", "{x}/r.html"], "truncated"),
    ("report-an-html-page", ["report", "{x}/page.html", "--out", "{x}/r.html"], "holds no"),
    ("evaluate-another-task", ["evaluate", "{run}", "--task", "rte", "--out", "{x}/e.json"], "trained on sst2"),
    ("evaluate-a-folder-without-task", ["evaluate", "{x}/not_a_run", "--out", "{x}/e.json"], "--task"),
    ("plan-over-its-sensitivity", ["plan", "{run}", "--budget", "4bit", "--sensitivity", "{s}", "--out", "{s}"],
     "would replace the input"),
    ("analyze-out-is-a-folder", _analyze("--out", "{x}/not_a_run"), "directory"),
]


@pytest.fixture(scope="module")
def results(sandbox) -> dict[str, dict]:
    """Every case, run by the real CLI in one subprocess (importing torch once), watching the sandbox."""
    names = {k: str(v) for k, v in sandbox.items()}
    plan = [{"args": [arg.format(**names) for arg in args]} for _, args, _ in CASES]
    (sandbox["root"] / "cases.json").write_text(json.dumps(plan))
    out = sandbox["root"] / "results.json"
    done = subprocess.run([sys.executable, str(DRIVER), str(sandbox["root"] / "cases.json"), str(out),
                           str(sandbox["root"] / "tree")], capture_output=True, text=True, timeout=280,
                          env={**os.environ, "QANALYZE_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    return dict(zip([case for case, _, _ in CASES], json.loads(out.read_text())))


def test_the_table_is_large_and_has_no_duplicates():
    assert len(CASES) >= 60
    assert len({case for case, _, _ in CASES}) == len(CASES)
    assert len({json.dumps(args) for _, args, _ in CASES}) == len(CASES)


@pytest.mark.parametrize(("case", "fragment"), [(case, fragment) for case, _, fragment in CASES])
def test_hostile_input_is_one_line_exit_2_and_touches_nothing(results, case, fragment):
    result = results[case]
    lines = [line for line in result["stderr"].splitlines() if line.strip()]
    assert result["code"] == 2, result["stderr"]
    assert "Traceback" not in result["stderr"]
    assert len(lines) == 1, result["stderr"]
    assert lines[0].startswith("error: "), lines[0]
    assert fragment in lines[0], lines[0]
    assert result["touched"] == [], result["touched"]
