"""Fixture records for the report: a sensitivity file drawn at random for a tiny BERT's real module
list, plans made from it by the real planner, and a sweep record over those plans. No training."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from qanalyze.models import architecture_fingerprint, inventory
from qanalyze.plan.budget import parse_budget
from qanalyze.plan.make import PlanConfig, make_plan
from qanalyze.records import SensitivityReport, SweepRecord

BITS = (2, 3, 4, 5, 6, 8, 12, 16)
GROUPS = ("tensor", "channel")
MEASURED_BITS = ("2", "4", "8")


def _entry(info, rng: np.random.Generator, depth: int) -> dict:
    params = math.prod(info.shape)
    curvature = float(10 ** rng.uniform(-2, 1)) / (1 + depth)
    eigenvalues = [float(curvature * params ** 0.5 * rng.uniform(0.8, 1.2)) for _ in range(4)]
    spread = {"tensor": 1.0, "channel": float(rng.uniform(0.1, 0.5))}
    weight_error = {str(b): {g: float(params * 4.0 ** -b * f) for g, f in spread.items()} for b in BITS}
    entry = {
        "kind": info.kind, "block": info.block, "stage": info.stage, "shape": list(info.shape), "params": params,
        "group_rows": {"tensor": info.shape[0], "channel": 1},
        "hessian": {"eigenvalues": eigenvalues, "omega": abs(float(np.mean(eigenvalues))) + float(np.std(eigenvalues)),
                    "avg_trace": curvature, "trace": curvature * params, "trace_stderr": 0.1 * curvature * params},
        "weight_error": weight_error,
    }
    if info.kind == "linear":
        entry["activation_error"] = {str(b): float(4.0 ** -b * rng.uniform(1, 3)) for b in BITS}
        entry["activation_weighted_error"] = {str(b): float(curvature * 4.0 ** -b) for b in BITS}
        entry["gradient_error"] = {str(b): {"weight_grad": float(2.0 ** -b * rng.uniform(1, 2)),
                                            "input_grad": float(2.0 ** -b * rng.uniform(1, 2))}
                                   for b in (4, 6, 8, 16)}
    if info.kind != "layernorm":
        measured = {b: float(curvature * weight_error[b]["channel"] * rng.uniform(0.5, 2.0)) for b in MEASURED_BITS}
        entry["delta_loss"] = {
            "measured": measured,
            "trace": {b: curvature * weight_error[b]["channel"] for b in MEASURED_BITS},
            "eig": {b: entry["hessian"]["omega"] * weight_error[b]["channel"] for b in MEASURED_BITS},
            "fisher": {b: 0.5 * measured[b] * float(rng.uniform(0.9, 1.1)) for b in MEASURED_BITS},
        }
    return entry


def fixture_sensitivity() -> SensitivityReport:
    """A complete sensitivity record for a 2-layer tiny BERT, every number drawn from a seeded generator."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=2))
    infos = inventory(model)
    rng = np.random.default_rng(0)
    modules = {info.name: _entry(info, rng, depth) for depth, info in enumerate(infos)}
    nodes = sorted([*rng.normal(0, 1, 12).tolist(), 25.0])
    weights = rng.dirichlet(np.ones(13)).tolist()
    blocks = {str(b): {"modules": [n for n, e in modules.items() if e["block"] == b],
                       "eigenvalues": [3.0 - b, 3.2 - b], "omega": 3.2 - b} for b in (0, 1)}
    return SensitivityReport(
        model={"source": "tiny-bert", "fingerprint": architecture_fingerprint(infos),
               "architecture": "BertForSequenceClassification", "weights_hash": "ab" * 32},
        data={"task": "sst2", "examples": 64, "hash": "cd" * 32}, settings={"batches": 4, "seed": 0},
        modules=modules, blocks=blocks, model_level={"density": {"nodes": [nodes], "weights": [weights]}},
        complete=True)


def write_sweep_folder(folder: Path, *, hessian_wins: bool = True) -> Path:
    """A sweep folder as `qanalyze sweep` leaves it: sensitivity.json, plans/ and sweep.json with made-up
    metrics (the Hessian plan ahead of its baselines, or not)."""
    sensitivity = fixture_sensitivity()
    sensitivity.save(folder / "sensitivity.json")
    config = PlanConfig(bits=BITS, groups=GROUPS)
    rows = []
    for budget, loss in (("3bit", 2.0), ("4bit", 0.8), ("8bit", 0.1)):
        for offset, kind in enumerate(("hessian", "uniform", "random", "reversed")):
            plan = make_plan(sensitivity, parse_budget(budget), config, sensitivity_path=folder / "sensitivity.json",
                             baseline=None if kind == "hessian" else kind)
            stem = f"plan-{budget}" + ("" if kind == "hessian" else f".{kind}")
            (folder / "plans").mkdir(exist_ok=True)
            plan.save(folder / "plans" / f"{stem}.json")
            penalty = offset * loss if hessian_wins else (3 - offset) * loss
            value = 0.85 - (loss + penalty) / 100
            rows.append({"budget": budget, "plan": kind, "mode": "qat", "run": f"runs/{budget}-{kind}-qat",
                         "plan_file": f"plans/{stem}.json", **{k: plan.totals.get(k) for k in (
                             "weight_bits_mean", "weight_bytes", "compression", "predicted_damage",
                             "activation_bits_mean", "gradient_bits_mean")},
                         "metrics": {"accuracy": value}, "metric": "accuracy", "value": value,
                         "delta_pts": 100 * (value - 0.85), "status": "trained", "train_seconds": 60.0})
    # qdylora on the 4-bit plans: one run each, evaluated at every rank (the curve rises to rank 4, then flattens)
    for row in [r for r in rows if r["budget"] == "4bit" and r["plan"] in ("hessian", "uniform")]:
        shift = 0.0 if row["plan"] == "hessian" else 0.01
        curve = {str(r): {"accuracy": 0.80 + 0.01 * min(r, 4) - shift} for r in (1, 2, 4, 8)}
        rows.append({**row, "mode": "qdylora", "run": f"runs/4bit-{row['plan']}-qdylora", "rank_metrics": curve,
                     "rank_parameters": {r: 64 * int(r) + 66 for r in curve}, "metrics": curve["8"],
                     "value": curve["8"]["accuracy"], "delta_pts": 100 * (curve["8"]["accuracy"] - 0.85)})
    for bits, value, mode in ((8, 0.83, "int"), (16, 0.85, "int"), (4, 0.835, "int4")):
        rows.append({"budget": None, "plan": f"int{bits}" if mode == "int" else mode, "mode": mode,
                     "run": f"runs/uniform{bits}-{mode}", "plan_file": f"plans/uniform-{bits}.{mode}.json",
                     "weight_bits_mean": bits, "weight_bytes": int(rows[0]["weight_bytes"] * bits / 3),
                     "compression": 32 / bits, "metrics": {"accuracy": value}, "metric": "accuracy", "value": value,
                     "delta_pts": 100 * (value - 0.85), "status": "trained", "train_seconds": 90.0})
    fp32_bytes = int(rows[0]["weight_bytes"] * 32 / 3)
    SweepRecord(model=sensitivity.model, data={"task": "sst2", "train_examples": 2000, "hash": "cd" * 32},
                settings={"budgets": ["3bit", "4bit", "8bit"], "modes": ["qat", "qdylora", "int4"],
                          "train": {"lr": 2e-5, "epochs": 1}},
                sensitivity={"path": str(folder / "sensitivity.json")},
                fp32={"metrics": {"accuracy": 0.85}, "examples": 872, "weight_bytes": fp32_bytes},
                rows=rows, complete=True).save(folder / "sweep.json")
    return folder


@pytest.fixture(scope="session")
def sweep_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fixture sweep folder in which the Hessian plan wins at every budget."""
    return write_sweep_folder(tmp_path_factory.mktemp("sweep"))
