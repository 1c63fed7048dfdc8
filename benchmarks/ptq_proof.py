"""Issue 23's proof: did the Hessian (Fisher) plan buy accuracy after post-training quantization, against the best
uniform plan of equal or larger size?

Reads the ``sweep.json`` of PTQ sweeps (``qanalyze sweep --modes gptq[,rtn] --plans hessian,best-uniform,rule-mix``)
and prints, per budget and mode, the mixed plan against

- the best uniform configuration whose bytes are at most the mixed plan's (the sweep's ``best`` row), and
- the best uniform configuration of equal or larger size than the mixed plan (the target's comparison),
- llama.cpp's rule mix,

as the ratio of the two plans' gaps to FP32 for a language model (target: at most 0.8 at 3 and 3.5 bits, i.e. a
gap at least 20 % smaller) or as the paired bootstrap difference of the task metric for GLUE (significant when
its 95 % interval excludes zero). ``--markdown`` writes the tables for reports/.

    .venv/bin/qanalyze analyze smollm2-135m --task lm --data ../shared/data/wikitext-2 --batches 32 --batch-size 1 \\
        --out runs/proof/sensitivity.json
    .venv/bin/qanalyze sweep smollm2-135m --task lm --data ../shared/data/wikitext-2 --budgets 3,3.5 \\
        --plans hessian,best-uniform,rule-mix --modes gptq --sensitivity runs/proof/sensitivity.json \\
        --max-eval-windows 24 --calib-windows 32 --out runs/proof/sweep
    .venv/bin/python benchmarks/ptq_proof.py runs/proof/sweep --targets 3bit,3.5bit
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

TARGET_GAP_RATIO = 0.8
"""The mixed plan's gap to FP32 must be at most this fraction of the best uniform plan's (20 % smaller)."""


def _lower_is_better(metric: str) -> bool:
    return metric in ("perplexity", "kl", "loss")


def _best(rows: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    rows = [r for r in rows if r.get("value") is not None]
    if not rows:
        return None
    return (min if _lower_is_better(metric) else max)(rows, key=lambda r: r["value"])


def _bpw(row: dict[str, Any]) -> float:
    return float(row.get("weight_bits_mean_all_scales") or float("nan"))


def compare(sweep: dict[str, Any], targets: set[str], pool: list[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """One comparison per (budget, mode) of the sweep; ``pool`` adds uniform rows (run on the same model, data
    and windows) to every budget's. "Under" is the best uniform row whose bytes are at most the mixed plan's;
    "above" the nearest one at or above them (the smallest uniform configuration of equal or larger size)."""
    fp32 = sweep["fp32"]["metrics"]
    out = []
    for hessian in (r for r in sweep["rows"] if r["plan"] == "hessian"):
        metric = hessian["metric"]
        peers = [r for r in sweep["rows"] if r["budget"] == hessian["budget"] and r["mode"] == hessian["mode"]]
        uniform = list({r.get("layout") or r["run"]: r for r in [
            *(r for r in peers if r["plan"] == "best-uniform"),
            *(r for r in pool if r["mode"] == hessian["mode"])] if r.get("value") is not None}.values())
        under = _best([r for r in uniform if r["weight_bytes"] <= hessian["weight_bytes"]], metric)
        larger = [r for r in uniform if r["weight_bytes"] >= hessian["weight_bytes"]]
        above = min(larger, key=lambda r: r["weight_bytes"]) if larger else None
        rule = next((r for r in peers if r["plan"] == "rule-mix"), None)
        row: dict[str, Any] = {"budget": hessian["budget"], "mode": hessian["mode"], "metric": metric,
                               "fp32": fp32.get(metric), "hessian": hessian, "under": under, "above": above,
                               "rule": rule, "target": hessian["budget"] in targets}
        if _lower_is_better(metric) and fp32.get(metric) is not None:
            gap = hessian["value"] - fp32[metric]
            for key, other in (("under", under), ("above", above), ("rule", rule)):
                if other is not None and other.get("value") is not None and other["value"] > fp32[metric]:
                    row[f"gap_ratio_{key}"] = gap / (other["value"] - fp32[metric])
            if row["target"] and "gap_ratio_above" in row:
                row["met"] = row["gap_ratio_above"] <= TARGET_GAP_RATIO
        else:
            for key in ("vs_best_uniform", "vs_uniform_at_or_above"):
                paired = (hessian.get(key) or {}).get("paired")
                if paired:
                    row[key] = paired
        out.append(row)
    return out


def _describe(row: dict[str, Any] | None, metric: str) -> str:
    if row is None or row.get("value") is None:
        return "-"
    layout = row.get("layout") or row["plan"]
    kl = (row.get("metrics") or {}).get("kl")
    interval = (row.get("intervals") or {}).get(metric)
    extra = f", KL {kl:.4g}" if kl is not None else ""
    extra += f", 95 % [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else ""
    return f"{layout}: {row['value']:.4f} at {_bpw(row):.3f} bpw{extra}"


def _paired(paired: dict[str, Any] | None) -> str:
    if not paired:
        return "-"
    return (f"{paired['difference'] * 100:+.2f} pt [{paired['low'] * 100:+.2f}, {paired['high'] * 100:+.2f}]"
            + (" significant" if paired["significant"] else " not significant"))


def render(rows: list[dict[str, Any]]) -> str:
    """The comparisons as a Markdown table."""
    lines = ["| budget | mode | FP32 | mixed plan | best uniform, bytes <= mixed | best uniform, bytes >= mixed | "
             "rule mix | gap ratio (lm; target <= 0.8) or paired difference (GLUE) vs uniform >= | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        metric = row["metric"]
        ratio = row.get("gap_ratio_above")
        shown = "-" if ratio is None else f"{ratio:.3f}"
        if "met" in row:
            verdict = "**met**" if row["met"] else "**missed**"
        elif ratio is not None:
            verdict = "Hessian ahead" if ratio < 1 else "uniform ahead"
        else:
            # GLUE: the paired bootstrap against the uniform plan at or above the mixed plan's bytes, then under
            shown = _paired(row.get("vs_uniform_at_or_above"))
            verdict = f"vs bytes <= mixed: {_paired(row.get('vs_best_uniform'))}"
        lines.append(f"| {row['budget']} | {row['mode']} | {row['fp32']:.4f} | {_describe(row['hessian'], metric)} | "
                     f"{_describe(row['under'], metric)} | {_describe(row['above'], metric)} | "
                     f"{_describe(row['rule'], metric)} | {shown} | {verdict} |")
    return "\n".join(lines)


def _uniform_rows(folder: Path, sweep: dict[str, Any]) -> list[dict[str, Any]]:
    """The uniform rows of another sweep, or one quantize run as a row; refused unless the FP32 reference and
    data are the sweep's own."""
    if (folder / "sweep.json").is_file():
        other = json.loads((folder / "sweep.json").read_text())
        if other["fp32"]["metrics"] != sweep["fp32"]["metrics"] or other["data"] != sweep["data"]:
            raise SystemExit(f"{folder}: another FP32 reference or data than the sweep's")
        return [{**row, "run": f"{folder.name}/{row['run']}"} for row in other["rows"] if row["plan"] == "best-uniform"]
    record = json.loads((folder / "metrics.json").read_text())
    plan = json.loads((folder / "plan.json").read_text())
    if record["data"] != sweep["data"]:
        raise SystemExit(f"{folder}: other data than the sweep's")
    metric = next(iter(sweep["fp32"]["metrics"]))
    return [{"plan": "best-uniform", "layout": plan["budget"]["text"], "mode": record["mode"], "run": folder.name,
             "metric": metric, "value": record["metrics"][metric], "metrics": record["metrics"],
             "weight_bytes": plan["totals"]["weight_bytes"],
             "weight_bits_mean_all_scales": plan["totals"]["weight_bits_mean_all_scales"]}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweeps", nargs="+", help="sweep folders (their sweep.json)")
    parser.add_argument("--targets", default="3bit,3.5bit", help="budgets the 20 %% target applies to")
    parser.add_argument("--markdown", default=None, help="also write the tables to this file")
    parser.add_argument("--uniform-from", action="append", default=[],
                        help="a sweep or run folder whose uniform rows (or run) join every budget's pool; it must "
                             "share the FP32 reference (same model, data and windows)")
    args = parser.parse_args()
    targets = set(args.targets.split(","))
    parts = []
    for folder in args.sweeps:
        sweep = json.loads((Path(folder) / "sweep.json").read_text())
        pool = [row for extra in args.uniform_from for row in _uniform_rows(Path(extra), sweep)]
        rows = compare(sweep, targets, pool)
        parts.append(f"### {folder}\n\n{render(rows)}\n")
        for row in rows:
            ratio = row.get("gap_ratio_above")
            if ratio is not None:
                print(f"{folder} {row['budget']} {row['mode']}: gap ratio mixed/uniform(>=) {ratio:.3f} "
                      f"(target <= {TARGET_GAP_RATIO} at {', '.join(sorted(targets))})"
                      + (f": {'met' if row['met'] else 'MISSED'}" if "met" in row else ""))
    text = "\n".join(parts)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)


if __name__ == "__main__":
    main()
