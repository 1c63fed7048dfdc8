"""Ctrl-C and kill -9 in the middle of training, with real signals in real processes: a resumed run ends
with the same weights, losses and metrics as one that was never interrupted, for every training method
and at every point where a run can be stopped."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

DRIVER = Path(__file__).parents[1] / "cli_driver.py"
TIMED = {"metrics.json", "log.csv", "evals.csv"}  # the files of a run that hold timings
METHODS = {
    "fp32": ["finetune"],
    "qat": ["train", "--mode", "qat", "--plan", "uniform:4"],
    "int": ["train", "--mode", "int", "--plan", "uniform:8"],
    "int4": ["train", "--mode", "int4", "--plan", "uniform:4"],
    "qdylora": ["train", "--mode", "qdylora", "--base", "nf4", "--lora-rank", "4"],
}
FINETUNE_POINTS = ["after-checkpoint:1", "after-optimizer:3", "final-eval", "final-save"]
# One thread: float sums are bit-identical only between runs with the same thread count.
ENV = {**os.environ, "QANALYZE_THREADS": "1"}


def _args(method: str, model: Path, data: Path, out: Path) -> list[str]:
    command = METHODS[method]
    return [command[0], str(model), *command[1:], "--task", "sst2", "--data", str(data), "--out", str(out),
            "--max-train-examples", "24", "--max-eval-examples", "8", "--max-length", "16", "--batch-size", "4",
            "--max-steps", "4", "--save-every", "2", "--quiet"]


def _drive(plan: list[dict], folder: Path) -> list[dict]:
    (folder / "plan.json").write_text(json.dumps(plan))
    done = subprocess.run([sys.executable, str(DRIVER), str(folder / "plan.json"), str(folder / "results.json")],
                          capture_output=True, text=True, timeout=280, env=ENV)
    results = json.loads((folder / "results.json").read_text()) if (folder / "results.json").exists() else []
    return [*results, {"code": done.returncode, "stderr": done.stderr}][:len(plan)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_bert_dir, glue_dir) -> dict:
    """In one process: an uninterrupted run of every method, then each interruption followed by --resume."""
    root = tmp_path_factory.mktemp("interrupts")
    plan = [{"point": "none", "args": _args(m, tiny_bert_dir, glue_dir, root / "uninterrupted" / m)} for m in METHODS]
    scenarios = [("fp32", point) for point in FINETUNE_POINTS] + [(m, "after-optimizer:1") for m in METHODS
                                                                  if m != "fp32"]
    for method, point in scenarios:
        args = _args(method, tiny_bert_dir, glue_dir, root / f"{method}-{point.replace(':', '')}")
        plan += [{"point": point, "args": args}, {"point": "none", "args": [*args, "--resume"]}]
    analysis = ["analyze", str(root / "uninterrupted" / "fp32"), "--task", "sst2", "--data", str(glue_dir),
                "--batches", "1", "--batch-size", "4", "--max-length", "16", "--trace-probes", "2", "--quiet",
                "--out", str(root / "s.json")]
    plan += [{"point": "analysis-unit:2", "args": analysis}, {"point": "none", "args": [*analysis, "--resume"]}]
    for name, point in (("sweep", "none"), ("sweep-interrupted", "after-optimizer:3")):
        sweep = ["sweep", str(root / "uninterrupted" / "fp32"), "--task", "sst2", "--data", str(glue_dir),
                 "--sensitivity", str(root / "s.json"), "--budgets", "4", "--plans", "hessian", "--modes", "qat",
                 "--integer-bits", "none",
                 "--max-train-examples", "24", "--max-eval-examples", "8", "--max-length", "16", "--batch-size", "4",
                 "--max-steps", "4", "--save-every", "2", "--quiet", "--out", str(root / name)]
        plan.append({"point": point, "args": sweep})
    plan.append({"point": "none", "args": sweep})
    # kill -9 ends its process, so it gets one of its own; its resume runs with the rest
    killed_args = _args("fp32", tiny_bert_dir, glue_dir, root / "killed")
    (root / "kill").mkdir()
    killed = _drive([{"point": "kill:3", "args": killed_args}], root / "kill")
    plan.append({"point": "none", "args": [*killed_args, "--resume"]})
    results = _drive(plan, root)
    uninterrupted = dict(zip(METHODS, results))
    interrupted = {scenario: results[len(METHODS) + 2 * i: len(METHODS) + 2 * i + 2]
                   for i, scenario in enumerate(scenarios)}
    return {"root": root, "uninterrupted": uninterrupted, "interrupted": interrupted, "analysis": results[-6:-4],
            "sweep": results[-4:-1], "killed": [killed[0], results[-1]]}


def _log(run: Path) -> list[dict[str, str]]:
    with open(run / "log.csv", newline="") as handle:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]


def _assert_same_run(run: Path, reference: Path) -> None:
    names = {p.name for p in reference.iterdir() if p.is_file()}
    assert {p.name for p in run.iterdir()} == names  # the checkpoint is gone too
    for name in names - TIMED:
        if name.endswith(".safetensors"):
            got, want = load_file(run / name), load_file(reference / name)
            assert got.keys() == want.keys()
            for key in want:
                assert got[key].equal(want[key]), (name, key)
        else:
            assert (run / name).read_bytes() == (reference / name).read_bytes(), name
    assert _log(run) == _log(reference)
    got, want = (json.loads((folder / "metrics.json").read_text()) for folder in (run, reference))
    assert got["metrics"] == want["metrics"]
    assert [row["loss"] for row in got["eval_history"]] == [row["loss"] for row in want["eval_history"]]


def _check(runs: dict, method: str, point: str) -> str:
    assert runs["uninterrupted"][method]["code"] == 0, runs["uninterrupted"][method]["stderr"]
    stopped, resumed = runs["interrupted"][(method, point)]
    assert stopped["code"] == 130, stopped["stderr"]
    lines = stopped["stderr"].strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stopped["stderr"], stopped["stderr"]
    assert "continue with the same command and --resume" in lines[0], lines[0]
    assert resumed["code"] == 0, resumed["stderr"]
    root = runs["root"]
    _assert_same_run(root / f"{method}-{point.replace(':', '')}", root / "uninterrupted" / method)
    return lines[0]


@pytest.mark.parametrize("point", FINETUNE_POINTS)
def test_ctrl_c_then_resume_gives_the_uninterrupted_finetune(runs, point):
    message = _check(runs, "fp32", point)
    if point.startswith("final"):
        assert "during the final evaluation; the trained model is saved" in message


@pytest.mark.parametrize("method", [m for m in METHODS if m != "fp32"])
def test_ctrl_c_inside_a_step_then_resume_gives_the_uninterrupted_run_of_every_method(runs, method):
    message = _check(runs, method, "after-optimizer:1")
    assert message.startswith("error: interrupted at step 1; checkpoint saved in"), message


def test_kill_9_inside_a_step_resumes_from_the_last_checkpoint(runs):
    killed, resumed = runs["killed"]
    assert killed["code"] == -9
    assert resumed["code"] == 0, resumed["stderr"]
    _assert_same_run(runs["root"] / "killed", runs["root"] / "uninterrupted" / "fp32")


def test_ctrl_c_in_an_analysis_says_how_to_resume_and_the_resume_finishes_it(runs):
    stopped, resumed = runs["analysis"]
    assert stopped["code"] == 130, stopped["stderr"]
    lines = stopped["stderr"].strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stopped["stderr"], stopped["stderr"]
    assert "the finished work is kept in" in lines[0] and "s.json.partial" in lines[0], lines[0]
    assert "continue with the same command and --resume" in lines[0], lines[0]
    assert resumed["code"] == 0, resumed["stderr"]
    record = json.loads((runs["root"] / "s.json").read_text())
    assert record["complete"] and len(record["modules"]) == 22
    assert not (runs["root"] / "s.json.partial").exists()


def test_a_sweep_run_again_after_ctrl_c_gives_the_uninterrupted_sweep(runs):
    straight, stopped, again = runs["sweep"]
    assert straight["code"] == 0, straight["stderr"]
    assert stopped["code"] == 130, stopped["stderr"]
    lines = stopped["stderr"].strip().splitlines()
    assert len(lines) == 1 and "run the same command again to continue" in lines[0], stopped["stderr"]
    assert again["code"] == 0, again["stderr"]
    root = runs["root"]
    rows = [json.loads((root / name / "sweep.json").read_text())["rows"] for name in ("sweep", "sweep-interrupted")]
    assert [row["status"] for row in rows[1]] == ["resumed"]
    assert [row["metrics"] for row in rows[0]] == [row["metrics"] for row in rows[1]]
    run = rows[0][0]["run"]
    _assert_same_run(root / "sweep-interrupted" / run, root / "sweep" / run)
