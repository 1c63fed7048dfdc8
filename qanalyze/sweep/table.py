"""A sweep record as a pandas table: one row per run, the columns people compare."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from qanalyze.metrics import display_scale
from qanalyze.records import SweepRecord, atomic_write_text

COLUMNS = ("budget", "plan", "layout", "best", "mode", "metric", "value", "delta_pts", "best_rank", "best_rank_value",
           "kl", "weight_bits_mean", "weight_bits_mean_all_scales", "weight_bytes", "compression", "predicted_damage",
           "activation_bits_mean",
           "gradient_bits_mean", "train_seconds", "status", "run")


def sweep_table(record: SweepRecord) -> pd.DataFrame:
    """Every row of ``record`` (FP32 first) with the columns of `COLUMNS`; metrics in points (x100; a
    perplexity as it is, `qanalyze.metrics.display_scale`). A qdylora row's ``value`` is its full rank's;
    ``best_rank`` and ``best_rank_value`` give the best evaluated rank."""
    fp32 = record.fp32
    metric = record.rows[0]["metric"] if record.rows else next(iter(fp32.get("metrics", {})), None)
    first = {"budget": None, "plan": "fp32", "mode": "fp32", "metric": metric,
             "value": fp32.get("metrics", {}).get(metric), "delta_pts": 0.0, "weight_bits_mean": 32.0,
             "weight_bytes": fp32.get("weight_bytes"), "compression": 1.0, "status": "reference",
             "run": record.model.get("source")}
    rows = [{**_with_best_rank(row), "kl": (row.get("metrics") or {}).get("kl")} for row in record.rows]
    frame = pd.DataFrame([first, *rows], columns=list(COLUMNS))
    scale = display_scale(metric)
    frame["value"] = frame["value"].astype(float) * scale
    frame["best_rank_value"] = frame["best_rank_value"].astype(float) * scale
    return frame


def _with_best_rank(row: dict) -> dict:
    """A qdylora row's best evaluated rank and its metric (``value`` is the metric at the full rank)."""
    ranks = {int(r): m.get(row.get("metric")) for r, m in (row.get("rank_metrics") or {}).items()}
    ranks = {r: v for r, v in ranks.items() if v is not None}
    if not ranks:
        return row
    best = max(sorted(ranks), key=ranks.get)  # the smallest rank among equals
    return {**row, "best_rank": best, "best_rank_value": ranks[best]}


def write_table(record: SweepRecord, path: str | Path) -> None:
    """Write `sweep_table` of ``record`` as CSV, atomically."""
    atomic_write_text(path, sweep_table(record).to_csv(index=False, float_format="%.6g"))
