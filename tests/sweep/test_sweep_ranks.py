"""A sweep under ``torchrun --nproc-per-node 2`` (gloo, CPU) spreads its runs over the ranks and gives one process's
rows, and leaves finished runs that a continued sweep reuses; the assignment of runs to ranks and the one-process
view inside a run (`qanalyze.sweep.ranks`)."""

from __future__ import annotations

import json
import os

import pytest
from rank_helpers import torchrun

from qanalyze.cli import main
from qanalyze.data import load_task
from qanalyze.distributed import World, world
from qanalyze.models import load_model
from qanalyze.sensitivity.analyze import AnalyzeConfig, analyze
from qanalyze.sweep.ranks import alone, balance, spread

TIMINGS = ("seconds", "train_seconds", "step_seconds_median", "timings", "created")
"""What differs between two sweeps that computed the same numbers."""


def _flat(value: object, key: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        value = {k: v for k, v in value.items() if k not in TIMINGS}
    elif isinstance(value, list):
        value = dict(enumerate(value))
    else:
        return {key: value}
    return {name: v for k, item in value.items() for name, v in _flat(item, f"{key}.{k}").items()}


def _assert_same(mine: object, theirs: object) -> None:
    """The same structure and values, the floats within float rounding (the ranks run one thread each)."""
    a, b = _flat(mine), _flat(theirs)
    floats = sorted(k for k, v in a.items() if isinstance(v, float))
    assert {k: v for k, v in b.items() if k not in floats} == {k: v for k, v in a.items() if k not in floats}
    assert [b[k] for k in floats] == pytest.approx([a[k] for k in floats], rel=1e-5, abs=1e-7)


def test_the_most_expensive_runs_go_first_to_the_least_busy_rank():
    assert balance([1.0] * 5, 2) == [0, 1, 0, 1, 0]  # equal costs: run i on rank i mod N
    assert balance([1.0, 8.0, 0.0, 1.0, 1.0], 2) == [1, 0, 1, 1, 1]
    assert balance([1.0, 1.0, 1.0, 1.0], 2, pinned=1) == [0, 1, 0, 1]  # the pinned job counts in rank 0's work
    assert balance([2.0, 1.0], 4) == [0, 1]


def test_alone_is_one_process_and_spread_runs_every_job_here(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with alone():
        assert world() == World(0, 1) and os.environ["WORLD_SIZE"] == "1"
    assert os.environ["WORLD_SIZE"] == "2"
    monkeypatch.delenv("WORLD_SIZE")
    assert spread([lambda: 1, lambda: 2, lambda: 3], lambda: [1.0, 0.0, 2.0], pinned=1) == [1, 2, 3]


def test_a_sweep_on_two_ranks_gives_the_rows_of_one_process(tmp_path, tiny_bert_dir, glue_dir):
    sensitivity = tmp_path / "sensitivity.json"
    data = load_task("sst2", str(glue_dir), max_train_examples=16, max_eval_examples=16, seed=0)
    analyze(load_model(str(tiny_bert_dir), num_labels=2, eager_attention=True), data,
            AnalyzeConfig(batches=2, batch_size=8, max_length=24, trace_max_probes=2, trace_min_probes=2,
                          metrics=("trace", "weights")), sensitivity)
    # 2 bits: every baseline equals the Hessian plan (one run, shared); a batch of 5 examples cannot be split over 2
    # ranks, so the runs pass only if each trains whole on its rank
    args = ["sweep", str(tiny_bert_dir), "--task", "sst2", "--data", str(glue_dir), "--max-train-examples", "16",
            "--max-eval-examples", "16", "--max-length", "24", "--sensitivity", str(sensitivity), "--budgets", "2,4",
            "--plans", "hessian,uniform", "--integer-bits", "none", "--batch-size", "5"]
    assert main([*args, "--quiet", "--out", str(tmp_path / "one")]) == 0
    two = torchrun(*args, "--out", tmp_path / "two", timeout=120)
    assert two.returncode == 0, two.stderr  # torchrun exits 0 when both ranks do
    # rank 1 is quiet: one table (stdout), one closing line and no error (stderr, the console's)
    assert two.stdout.count("delta_pts") == 1 and two.stderr.count("sweep of 4 rows") == 1
    assert "error:" not in two.stderr
    one, both = (json.loads((tmp_path / name / "sweep.json").read_text()) for name in ("one", "two"))
    assert both["complete"] and len(both["rows"]) == 4
    assert [row["status"] for row in both["rows"]] == [row["status"] for row in one["rows"]] == [
        "trained", "same as runs/2bit-hessian-qat", "trained", "trained"]
    for mine, theirs in zip(one["rows"], both["rows"]):
        _assert_same(mine, theirs)
        assert not (tmp_path / "two" / theirs["run"] / "checkpoint").exists()
    _assert_same(one["fp32"], both["fp32"])
    # the ranks' run folders are finished runs: a sweep continued in one process (or on other ranks) reuses them
    assert main([*args, "--quiet", "--out", str(tmp_path / "two")]) == 0
    again = json.loads((tmp_path / "two" / "sweep.json").read_text())
    assert [row["status"] for row in again["rows"]] == ["reused", "same as runs/2bit-hessian-qat", "reused", "reused"]
