"""Figures derived from the raw per-batch measurements of an analysis: Ω, traces, average traces,
predicted loss change, and how well each predictor ranks the measured loss change."""

from __future__ import annotations

import math
import statistics
from typing import Any

from qanalyze.records import SensitivityReport


def _combine(estimates: list[dict[str, Any]]) -> tuple[float, float]:
    values = [e["value"] for e in estimates]
    mean = statistics.fmean(values)
    stderr = math.sqrt(sum(e["stderr"] ** 2 for e in estimates)) / len(estimates)
    return mean, stderr


def summarise(report: SensitivityReport) -> None:
    """Derived figures: Ω over batches, trace over batches, average trace, predicted damage."""
    for block in report.blocks.values():
        values = [e["value"] for e in block["per_batch"]]
        block["eigenvalues"] = values
        block["omega"] = abs(statistics.fmean(values)) + (statistics.pstdev(values) if len(values) > 1 else 0.0)
    for entry in report.modules.values():
        hessian = entry["hessian"]
        if hessian.get("eig_per_batch"):
            values = [e["value"] for e in hessian["eig_per_batch"]]
            hessian["eigenvalues"] = values
            hessian["omega"] = abs(statistics.fmean(values)) + (statistics.pstdev(values) if len(values) > 1 else 0.0)
            hessian["eig_converged"] = all(e["converged"] for e in hessian["eig_per_batch"])
        if hessian.get("trace_per_batch"):
            trace, stderr = _combine(hessian["trace_per_batch"])
            hessian["trace"], hessian["trace_stderr"] = trace, stderr
            hessian["trace_probes"] = sum(e["iterations"] for e in hessian["trace_per_batch"])
            hessian["trace_converged"] = all(e["converged"] for e in hessian["trace_per_batch"])
            hessian["avg_trace"] = trace / entry["shape"][0] / math.prod(entry["shape"][1:])
        errors = entry.get("weight_error", {})
        predicted: dict[str, dict[str, float]] = {}
        for bits, by_group in errors.items():
            reference = by_group.get("channel", next(iter(by_group.values()), None))
            if reference is None:
                continue
            if "avg_trace" in hessian:
                predicted.setdefault("trace", {})[bits] = hessian["avg_trace"] * reference
            if "omega" in hessian:
                predicted.setdefault("eig", {})[bits] = hessian["omega"] * reference
        if predicted:
            entry.setdefault("delta_loss", {}).update(predicted)
    report.model_level["predictor_spearman"] = predictor_agreement(report)


PREDICTORS = ("trace", "eig", "fisher")
"""The predicted loss changes a sensitivity report can hold beside the measured one."""


def predictor_agreement(report: SensitivityReport) -> dict[str, dict[str, float]]:
    """Spearman rank correlation, per bit-width, between each predicted Δloss and the measured one.

    Answers which Hessian metric orders the modules the way quantizing them actually does; empty
    without ``--measure-delta-loss``. Attention key weights stay in: only the key *bias* has a
    vanishing Hessian, and biases are not analyzed.
    """
    from scipy.stats import spearmanr

    result: dict[str, dict[str, float]] = {}
    entries = [e["delta_loss"] for e in report.modules.values() if "measured" in e.get("delta_loss", {})]
    if len(entries) < 3:
        return result
    for bits in entries[0]["measured"]:
        measured = [e["measured"][bits] for e in entries]
        for predictor in PREDICTORS:
            predicted = [e.get(predictor, {}).get(bits) for e in entries]
            if None not in predicted:
                rho = spearmanr(predicted, measured).statistic
                result.setdefault(bits, {})[predictor] = float(rho)
    return result
