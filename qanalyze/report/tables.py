"""Records -> pandas tables: every number a report figure shows, in the order it shows them. Pure."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import pandas as pd

from qanalyze.metrics import LOWER_IS_BETTER, better, display_scale
from qanalyze.plan.entries import QuantizedEntry
from qanalyze.records import BitPlan, RunRecord, SensitivityReport, SweepRecord
from qanalyze.sensitivity.summary import PREDICTORS
from qanalyze.sweep.table import sweep_table

PREFIXES = ("bert.encoder.", "bert.", "distilbert.transformer.", "distilbert.", "roberta.encoder.", "roberta.",
            "transformer.", "model.")
"""Leading parts of module names that every module of a model shares and a reader does not need."""

BASELINE_PLANS = ("uniform", "random", "reversed", "rule-mix", "best-uniform")
"""Plan kinds a Hessian plan is compared with (of ``best-uniform``'s rows, the one the sweep marked best)."""


def short_name(name: str) -> str:
    """``bert.encoder.layer.0.attention.self.query`` -> ``layer.0.attention.self.query``."""
    for prefix in PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def sensitivity_table(report: SensitivityReport) -> pd.DataFrame:
    """Per module, by depth: Ω (|mean| + std of the top eigenvalue over batches), its mean and spread,
    and the average trace with its standard error."""
    rows = []
    for name, entry in report.modules.items():
        hessian = entry.get("hessian", {})
        eigenvalues = hessian.get("eigenvalues") or []
        params = math.prod(entry["shape"])
        stderr = hessian.get("trace_stderr")
        rows.append({
            "module": short_name(name), "kind": entry["kind"], "block": entry.get("block"), "params": params,
            "omega": hessian.get("omega"),
            "eig_mean": sum(eigenvalues) / len(eigenvalues) if eigenvalues else None,
            "eig_std": pd.Series(eigenvalues).std(ddof=0) if len(eigenvalues) > 1 else (0.0 if eigenvalues else None),
            "avg_trace": hessian.get("avg_trace"),
            "avg_trace_stderr": stderr / params if isinstance(stderr, (int, float)) else None,
            "trace": hessian.get("trace"), "trace_stderr": stderr,
        })
    return pd.DataFrame(rows)


def layer_type_table(report: SensitivityReport, *, bits: int = 4) -> pd.DataFrame:
    """Layer x module type: each module's predicted damage at ``bits`` (average trace times its weight error
    with one scale per output row, HAWQ-V2), the view of a decoder's sensitivity LLM users read. Modules
    outside the repeated layers (embeddings, the head) are left out; empty when no module has both."""
    rows = []
    for name, entry in report.modules.items():
        block, trace = entry.get("block"), (entry.get("hessian") or {}).get("avg_trace")
        error = (entry.get("weight_error") or {}).get(str(bits), {})
        error = error.get("channel", error.get("tensor")) if isinstance(error, dict) else None
        if block is None or not isinstance(trace, int | float) or not isinstance(error, int | float):
            continue
        kind = re.sub(r"^.*?\.\d+\.", "", name)  # the name after the layer index: self_attn.q_proj
        rows.append({"layer": int(block), "type": kind, "damage": max(float(trace), 0.0) * float(error)})
    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame(rows).pivot_table(index="layer", columns="type", values="damage", aggfunc="sum", sort=False)
    return frame.sort_index()


def _bits_columns(frame: pd.DataFrame) -> pd.DataFrame:
    frame.columns = [int(c) for c in frame.columns]
    return frame.reindex(sorted(frame.columns), axis=1)


def error_table(report: SensitivityReport, kind: str, *, group: str = "channel") -> pd.DataFrame:
    """Module x bits quantization error: ``weight`` (‖Q(W) − W‖², at ``group``, else per tensor),
    ``activation`` (E‖Q(X) − X‖²) or ``gradient`` (relative error of the weight gradient)."""
    readers = {
        "weight": lambda e: {b: v.get(group, v.get("tensor")) for b, v in e.get("weight_error", {}).items()},
        "activation": lambda e: dict(e.get("activation_error", {})),
        "gradient": lambda e: {b: v.get("weight_grad") for b, v in e.get("gradient_error", {}).items()},
    }
    rows = {short_name(name): readers[kind](entry) for name, entry in report.modules.items()}
    rows = {name: values for name, values in rows.items() if values}
    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame.from_dict(rows, orient="index").astype(float)
    frame.index.name = "module"
    return _bits_columns(frame)


def plan_table(plan: BitPlan) -> pd.DataFrame:
    """Per module: weight bits, group layout and range rule, activation and gradient bits, predicted damage; float
    ones too."""
    rows = []
    for name, entry in plan.entries.items():
        if not isinstance(entry, QuantizedEntry):
            rows.append({"module": short_name(name), "float": True})
            continue
        rows.append({"module": short_name(name), "float": False, "weight_bits": entry.weight_bits,
                     "group": entry.group, "groups": entry.groups, "weight_range": entry.weight_range,
                     "activation_bits": entry.activation_bits, "gradient_bits": entry.gradient_bits,
                     "predicted_damage": entry.predicted_damage})
    columns = ["module", "float", "weight_bits", "group", "groups", "weight_range", "activation_bits",
               "gradient_bits", "predicted_damage"]
    return pd.DataFrame(rows, columns=columns)


def plan_totals(plan: BitPlan) -> pd.DataFrame:
    """The plan's budget and achieved totals as (quantity, value) rows."""
    ranges = sorted({entry.weight_range for entry in plan.entries.values() if isinstance(entry, QuantizedEntry)})
    rows = [("budget", plan.budget.get("text")), ("objective", plan.objective),
            ("plan", plan.baseline or "hessian"), ("weight_range", ", ".join(ranges) or "-")]
    rows += [(key, value) for key, value in plan.totals.items()]
    return pd.DataFrame(rows, columns=["quantity", "value"])


def predictor_table(report: SensitivityReport) -> pd.DataFrame:
    """Per module and bit-width: the measured loss change of quantizing it alone and each prediction."""
    rows = []
    for name, entry in report.modules.items():
        delta = entry.get("delta_loss") or {}
        for bits, measured in (delta.get("measured") or {}).items():
            row: dict[str, Any] = {"module": short_name(name), "bits": int(bits), "measured": measured}
            for predictor in PREDICTORS:
                row[predictor] = (delta.get(predictor) or {}).get(bits)
            rows.append(row)
    return pd.DataFrame(rows, columns=["module", "bits", "measured", *PREDICTORS])


def spearman_table(predictions: pd.DataFrame) -> pd.DataFrame:
    """Spearman rank correlation of each predictor with the measured loss change, per bit-width."""
    rows = []
    for bits, group in predictions.groupby("bits"):
        row: dict[str, Any] = {"bits": bits, "modules": len(group)}
        for predictor in PREDICTORS:
            pair = group[[predictor, "measured"]].dropna()
            row[predictor] = pair[predictor].corr(pair["measured"], method="spearman") if len(pair) >= 3 else None
        rows.append(row)
    return pd.DataFrame(rows, columns=["bits", "modules", *PREDICTORS])


REFERENCE_LABELS = {"int": "integer {bits}-bit", "int4": "int4 training ({bits}-bit)"}
"""How a sweep's uniform reference runs (plan ``int8``, ``int4``, ...) are named, by mode."""


def _label(plan: Any, mode: Any) -> str:
    match = re.fullmatch(r"int(\d+)", str(plan))
    if match and mode in REFERENCE_LABELS:
        return REFERENCE_LABELS[mode].format(bits=match.group(1))
    return str(plan)


def results_table(sweep: SweepRecord) -> pd.DataFrame:
    """The sweep's rows (FP32 first) with weight megabytes, metric in points (`sweep_table`)."""
    frame = sweep_table(sweep)
    frame.insert(frame.columns.get_loc("weight_bytes") + 1, "weight_mb", frame["weight_bytes"].astype(float) / 1e6)
    frame.insert(frame.columns.get_loc("plan") + 1, "label",
                 [_label(p, m) for p, m in zip(frame["plan"], frame["mode"], strict=True)])
    return frame


def plan_modes(results: pd.DataFrame) -> list[str]:
    """The modes that trained a budget's plans, in the order the rows give them (the sweep's first mode first)."""
    return list(dict.fromkeys(results.loc[results["budget"].notna(), "mode"]))


def rank_table(sweep: SweepRecord | None, runs: Mapping[str, RunRecord]) -> pd.DataFrame:
    """Every qdylora run's metric at each evaluated rank, with the parameters it trains there, in points and
    against FP32 (the sweep's reference, or the first FP32 run on the same dev data)."""
    rows = []
    if sweep is not None:
        reference = sweep.fp32.get("metrics", {})
        for row in sweep.rows:
            label = f"{row['budget']} {row['plan']}" if row.get("budget") else str(row["plan"])
            rows += _ranks(label, row["run"], row.get("rank_metrics") or {}, row.get("rank_parameters") or {},
                           row.get("metric"), reference)
    fp32 = next((r for r in runs.values() if r.mode == "fp32"), None)
    for path, record in runs.items():
        if not record.rank_metrics:
            continue
        same_data = fp32 is not None and fp32.data.get("dev_hash") == record.data.get("dev_hash")
        metric = next(iter(record.metrics), None)
        budget = (record.settings.get("plan") or {}).get("budget")
        label = f"{budget} plan" if budget else f"{(record.settings.get('lora') or {}).get('base', 'plan')} base"
        rows += _ranks(label, path, record.rank_metrics, record.rank_parameters, metric,
                       fp32.metrics if same_data else {})
    return pd.DataFrame(rows, columns=["label", "run", "rank", "trainable_parameters", "metric", "value",
                                       "delta_pts"])


def _ranks(label: str, run: str, metrics: Mapping[str, Mapping[str, float]], parameters: Mapping[str, int],
           metric: str | None, reference: Mapping[str, float]) -> list[dict[str, Any]]:
    rows = []
    for rank in sorted(metrics, key=int):
        value = metrics[rank].get(metric) if metric else None
        scale = display_scale(metric)
        delta = None if value is None or reference.get(metric) is None else scale * (value - reference[metric])
        rows.append({"label": label, "run": run, "rank": int(rank), "trainable_parameters": parameters.get(rank),
                     "metric": metric, "value": None if value is None else scale * value, "delta_pts": delta})
    return rows


def runs_table(runs: Mapping[str, RunRecord], metric: str | None = None) -> pd.DataFrame:
    """Single runs (no sweep) in the columns of `results_table`: FP32 runs first, quantized runs with
    their plan's budget and bytes; ``delta_pts`` against the first FP32 run on the same data."""
    ordered = sorted(runs.items(), key=lambda item: item[1].mode != "fp32")
    metric = metric or next((next(iter(r.metrics), None) for _, r in ordered), None)
    reference = next((r for _, r in ordered if r.mode == "fp32"), None)
    rows = []
    for path, record in ordered:
        plan = record.settings.get("plan") or {}
        totals = plan.get("totals") or {}
        value = record.metrics.get(metric)
        same_data = reference is not None and reference.data.get("dev_hash") == record.data.get("dev_hash")
        scale = display_scale(metric)
        delta = (scale * (value - reference.metrics[metric]) if same_data and value is not None
                 and reference.metrics.get(metric) is not None else None)
        rows.append({"budget": plan.get("budget"), "plan": "fp32" if record.mode == "fp32" else "run",
                     "label": f"{record.mode} {plan.get('budget') or ''}".strip(), "mode": record.mode,
                     "metric": metric, "value": None if value is None else scale * value, "delta_pts": delta,
                     "weight_bits_mean": totals.get("weight_bits_mean"), "weight_bytes": totals.get("weight_bytes"),
                     "weight_mb": totals["weight_bytes"] / 1e6 if totals.get("weight_bytes") else None,
                     "compression": totals.get("compression"), "train_seconds": record.timings.get("train_seconds"),
                     "run": path})
    return pd.DataFrame(rows)


def _copies(results: pd.DataFrame) -> pd.Series:
    """True for a sweep row that reuses another row's run (its plan came out identical); single runs have none."""
    if "status" not in results:
        return pd.Series(False, index=results.index)
    return results["status"].astype(str).str.startswith("same as")


def verdict_table(results: pd.DataFrame) -> pd.DataFrame:
    """Per budget and training mode: the Hessian plan's metric against the best baseline of equal cost (lower is
    better for a perplexity, `qanalyze.metrics.better`), and who wins; ``identical_plans`` when every baseline
    came out as the Hessian plan itself (nothing to compare)."""
    rows = []
    planned = results[results["budget"].notna()]
    for (budget, mode), group in planned.groupby(["budget", "mode"], sort=False):
        # of the best-uniform rows only the one the sweep marked best (bytes at most the Hessian plan's)
        marked = group["best"].fillna(False).astype(bool) if "best" in group else False
        kept = group[(group["plan"] != "best-uniform") | marked]
        by_plan = dict(zip(kept["plan"], kept["value"]))
        hessian = by_plan.get("hessian")
        baselines = {p: v for p, v in by_plan.items() if p in BASELINE_PLANS and v is not None and not pd.isna(v)}
        if hessian is None or pd.isna(hessian) or not baselines:
            continue
        metric = group["metric"].iloc[0] if "metric" in group else None
        best = next(iter(baselines))
        for plan, value in baselines.items():
            if better(metric, value, baselines[best]):
                best = plan
        margin = hessian - baselines[best]
        copies = _copies(group)[group["plan"].isin(list(baselines))]
        rows.append({"budget": budget, "mode": mode, "metric": metric, "hessian": hessian, "best_baseline": best,
                     "best_baseline_value": baselines[best], "margin_pts": margin,
                     "delta_vs_fp32_pts": group.loc[group["plan"] == "hessian", "delta_pts"].iloc[0],
                     "hessian_ahead": better(metric, hessian, baselines[best]), "identical_plans": bool(copies.all())})
    return pd.DataFrame(rows, columns=["budget", "mode", "metric", "hessian", "best_baseline", "best_baseline_value",
                                       "margin_pts", "delta_vs_fp32_pts", "hessian_ahead", "identical_plans"])


def damage_agreement(results: pd.DataFrame, mode: str | None = None) -> dict[str, Any]:
    """Across every plan trained in ``mode`` (default: the first plan mode): does a larger predicted damage go
    with a larger measured loss of metric?"""
    modes = plan_modes(results)
    mode = mode or (modes[0] if modes else None)
    copies = _copies(results)  # one trained run counted once
    planned = results[results["predicted_damage"].notna() & results["value"].notna() & (results["mode"] == mode)
                      & ~copies]
    if len(planned) < 3 or planned["predicted_damage"].nunique() < 2 or planned["delta_pts"].nunique() < 2:
        return {"mode": mode, "plans": len(planned), "spearman": None}  # a rank correlation needs 2 values a side
    # the loss of metric: a drop of a rate, a rise of a perplexity
    sign = 1.0 if planned["metric"].iloc[0] in LOWER_IS_BETTER else -1.0
    rho = planned["predicted_damage"].astype(float).corr(sign * planned["delta_pts"].astype(float), method="spearman")
    return {"mode": mode, "plans": len(planned), "spearman": None if pd.isna(rho) else float(rho)}


def provenance_table(records: Mapping[str, Any], sources: Mapping[str, str]) -> pd.DataFrame:
    """One row per record: its file, when and with what versions it was made, and what it was made from."""
    rows = []
    for slot, record in records.items():
        if record is None:
            continue
        model = getattr(record, "model", {}) or {}
        data = getattr(record, "data", None) or getattr(record, "sensitivity", {}).get("data", {}) or {}
        versions = getattr(record, "versions", {}) or {}
        rows.append({
            "record": slot, "file": sources.get(slot, ""), "created": getattr(record, "created", None),
            "qanalyze": versions.get("qanalyze"), "torch": versions.get("torch"),
            "transformers": versions.get("transformers"),
            "model": model.get("source") or model.get("architecture"),
            "weights_hash": (model.get("weights_hash") or "")[:12] or None,
            "fingerprint": (model.get("fingerprint") or "")[:12] or None,
            "task": data.get("task"), "examples": data.get("examples") or data.get("train_examples"),
            "data_hash": (data.get("hash") or "")[:12] or None,
        })
    return pd.DataFrame(rows)


def settings_table(records: Mapping[str, Any]) -> pd.DataFrame:
    """Every setting that changes the numbers, per record, flattened to (record, setting, value) rows."""
    rows = []
    for slot, record in records.items():
        if record is None:
            continue
        for key, value in _flatten(getattr(record, "settings", {}) or {}):
            rows.append({"record": slot, "setting": key, "value": str(value)})
    return pd.DataFrame(rows, columns=["record", "setting", "value"])


def _flatten(settings: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for key, value in settings.items():
        if isinstance(value, Mapping):
            items += _flatten(value, f"{prefix}{key}.")
        else:
            items.append((prefix + key, value))
    return items
