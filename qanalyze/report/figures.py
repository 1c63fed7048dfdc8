"""Tables -> matplotlib figures. Pure: each function takes a table and returns a new `Figure`
(the object API, no pyplot state), which the caller renders to SVG or PNG."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import ScalarFormatter

from qanalyze.metrics import LOWER_IS_BETTER, display_unit

PLAN_STYLES = {
    "hessian": {"color": "#c0392b", "marker": "o", "label": "Hessian plan"},
    "uniform": {"color": "#2c3e50", "marker": "s", "label": "uniform"},
    "random": {"color": "#7f8c8d", "marker": "^", "label": "random (equal cost)"},
    "reversed": {"color": "#8e44ad", "marker": "v", "label": "reversed"},
    "rule-mix": {"color": "#16a085", "marker": "D", "label": "rule mix (llama.cpp Q4_K_M-style)"},
    "best-uniform": {"color": "#34495e", "marker": "P", "label": "uniform (bits x column layout)"},
}
"""How each plan kind is drawn in the Pareto chart."""

MODE_LINESTYLES = ("-", "--", ":", "-.")
"""Line style of each training mode in the Pareto chart, in the order the sweep lists its modes."""

WIDTH = 10.5  # inches: with the page's 1100-pixel column, figures are shown at their natural size


def _module_axis(ax: Any, labels: Sequence[str]) -> None:
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=90, fontsize=6)
    ax.set_xlim(-0.6, len(labels) - 0.4)


def _log_if_spread(ax: Any, values: pd.Series) -> None:
    positive = values[values > 0]
    if len(positive) and positive.max() / positive.min() > 100:
        ax.set_yscale("log")


def sensitivity_figure(table: pd.DataFrame) -> Figure:
    """Bars by depth: top eigenvalue Ω with the spread over batches, and average trace with its standard error."""
    fig = Figure(figsize=(WIDTH, 6.2), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    x = np.arange(len(table))
    omega = table["omega"].astype(float)
    top.bar(x, omega.fillna(0), yerr=table["eig_std"].astype(float).fillna(0), color="#c0392b", ecolor="#333",
            capsize=1.5, width=0.75)
    top.set_ylabel("Ω = |mean λmax| + std")
    top.set_title("Top Hessian eigenvalue per module (error bar: std over batches)", fontsize=10)
    _log_if_spread(top, omega)
    trace = table["avg_trace"].astype(float)
    bottom.bar(x, trace.fillna(0), yerr=table["avg_trace_stderr"].astype(float).fillna(0), color="#2980b9",
               ecolor="#333", capsize=1.5, width=0.75)
    bottom.set_ylabel("average trace tr(H)/n")
    bottom.set_title("Average Hessian trace per module (error bar: standard error)", fontsize=10)
    bottom.axhline(0, color="#333", linewidth=0.6)
    _module_axis(bottom, list(table["module"]))
    return fig


def density_figure(density: Mapping[str, Any], *, points: int = 600) -> Figure:
    """The eigenvalue density of the whole weight Hessian: SLQ Ritz nodes smoothed by Gaussians."""
    nodes = np.concatenate([np.asarray(n, dtype=float) for n in density["nodes"]])
    weights = np.concatenate([np.asarray(w, dtype=float) for w in density["weights"]]) / len(density["nodes"])
    span = max(nodes.max() - nodes.min(), 1e-12)
    grid = np.linspace(nodes.min() - 0.05 * span, nodes.max() + 0.05 * span, points)
    sigma = 0.01 * span
    curve = (weights[None, :] * np.exp(-((grid[:, None] - nodes[None, :]) ** 2) / (2 * sigma**2))).sum(1)
    curve /= sigma * math.sqrt(2 * math.pi)
    fig = Figure(figsize=(WIDTH, 3.4), layout="constrained")
    ax = fig.subplots()
    ax.semilogy(grid, np.maximum(curve, 1e-12), color="#2c3e50")
    ax.set_ylim(bottom=max(curve.max() * 1e-8, 1e-12))
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log)")
    ax.set_title("Eigenvalue density of the weight Hessian (stochastic Lanczos quadrature)", fontsize=10)
    return fig


def heatmap_figure(table: pd.DataFrame, *, title: str, colorbar: str, xlabel: str = "bits") -> Figure:
    """Rows x columns heatmap (module x bits, or layer x module type) on a log colour scale: quantization
    errors and sensitivities span orders of magnitude."""
    values = table.to_numpy(dtype=float)
    positive = values[np.isfinite(values) & (values > 0)]
    fig = Figure(figsize=(WIDTH, 1.8 + 0.16 * len(table)), layout="constrained")
    ax = fig.subplots()
    norm = LogNorm(vmin=positive.min(), vmax=positive.max()) if positive.size else None
    image = ax.imshow(np.where(values > 0, values, np.nan), aspect="auto", cmap="viridis", norm=norm,
                      interpolation="nearest")
    ax.set_xticks(range(table.shape[1]))
    names = [str(c) for c in table.columns]
    # module types are long words: slanted, they do not run into each other
    ax.set_xticklabels(names, fontsize=8, rotation=30 if max(map(len, names), default=0) > 4 else 0, ha="right"
                       if max(map(len, names), default=0) > 4 else "center")
    ax.set_yticks(range(len(table)))
    ax.set_yticklabels(list(table.index), fontsize=6)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label=colorbar, shrink=0.8)
    return fig


def plan_figure(table: pd.DataFrame) -> Figure:
    """The plan as a module x (W, A, G) heatmap of bits, annotated with the bits and W's group layout."""
    columns = (("weight_bits", "W"), ("activation_bits", "A"), ("gradient_bits", "G"))
    values = np.full((len(table), 3), np.nan)
    for row, (_, spec) in enumerate(table.iterrows()):
        if spec["float"]:
            continue
        for col, (key, _) in enumerate(columns):
            if pd.notna(spec[key]):
                values[row, col] = float(spec[key])
    fig = Figure(figsize=(WIDTH, 1.2 + 0.17 * len(table)), layout="constrained")
    ax = fig.subplots()
    ax.set_facecolor("#e3e3e3")
    image = ax.imshow(values, aspect="auto", cmap="RdYlGn", vmin=2, vmax=16, interpolation="nearest")
    for row, (_, spec) in enumerate(table.iterrows()):
        if spec["float"]:
            ax.text(1, row, "float", ha="center", va="center", fontsize=6, color="#555")
            continue
        for col, (key, _) in enumerate(columns):
            if pd.notna(spec[key]):
                text = f"{int(spec[key])}" + (f" / {spec['group']}" if key == "weight_bits" else "")
                ax.text(col, row, text, ha="center", va="center", fontsize=6)
    ax.set_xticks(range(3))
    ax.set_xticklabels(["weights (bits / group)", "activations", "gradients"], fontsize=8)
    ax.set_yticks(range(len(table)))
    ax.set_yticklabels(list(table["module"]), fontsize=6)
    ax.set_title("Bit-width plan per module (grey: kept in float)", fontsize=10)
    fig.colorbar(image, ax=ax, label="bits", shrink=0.6)
    return fig


def _plan_lines(ax: Any, results: pd.DataFrame, x: str, y: str, *, distinct_x: bool = False) -> None:
    """One line per plan kind and mode (`PLAN_STYLES`, `MODE_LINESTYLES`) of column ``y`` against ``x``;
    ``distinct_x`` keeps one point per x (a row several budgets share, such as one uniform plan)."""
    modes = list(dict.fromkeys(results.loc[results["plan"].isin(list(PLAN_STYLES)), "mode"]))
    for mode, linestyle in zip(modes, MODE_LINESTYLES, strict=False):
        for plan, style in PLAN_STYLES.items():
            rows = results[(results["plan"] == plan) & (results["mode"] == mode) & results[y].notna()]
            if len(rows):
                label = style["label"] if len(modes) == 1 else f"{style['label']} ({mode})"
                rows = rows.sort_values(x)
                if distinct_x:
                    rows = rows.drop_duplicates(x)
                ax.plot(rows[x], rows[y], linestyle=linestyle, linewidth=1.2, markersize=6,
                        **{**style, "label": label})


def pareto_figure(results: pd.DataFrame, *, metric: str) -> Figure:
    """Metric against weight megabytes for every plan kind, FP32 as a line, integer references as stars;
    the top axis reads the same positions as compression against FP32."""
    fig = Figure(figsize=(WIDTH, 4.6), layout="constrained")
    ax = fig.subplots()
    fp32 = results[results["plan"] == "fp32"]
    fp32_mb = float(fp32["weight_mb"].iloc[0]) if len(fp32) and pd.notna(fp32["weight_mb"].iloc[0]) else None
    if len(fp32) and pd.notna(fp32["value"].iloc[0]):
        ax.axhline(float(fp32["value"].iloc[0]), color="#27ae60", linestyle="--", label="FP32")
    _plan_lines(ax, results, "weight_mb", "value")
    others = results[~results["plan"].isin([*PLAN_STYLES, "fp32"]) & results["value"].notna()
                     & results["weight_mb"].notna()]
    for _, row in others.iterrows():  # integer references of a sweep, or single quantized runs
        ax.plot(row["weight_mb"], row["value"], marker="*", markersize=12, color="#e67e22", linestyle="none")
        ax.annotate(str(row["label"]), (row["weight_mb"], row["value"]), textcoords="offset points",
                    xytext=(6, -10), fontsize=8)
    ax.set_xlabel("weight storage (MB, scales included)")
    ax.set_ylabel(f"dev {metric}{display_unit(metric)}")
    ax.set_title(f"{metric.capitalize()} against weight bytes: what the Hessian bought", fontsize=10)
    ax.grid(alpha=0.3)
    if metric in LOWER_IS_BETTER:  # a perplexity spans orders of magnitude at 2 to 3 bits; lower is better
        ax.set_yscale("log")
    ax.legend(fontsize=8, loc="upper right" if metric in LOWER_IS_BETTER else "lower right")
    if fp32_mb:
        top = ax.secondary_xaxis("top", functions=(lambda mb: fp32_mb / np.maximum(mb, 1e-9),
                                                   lambda ratio: fp32_mb / np.maximum(ratio, 1e-9)))
        top.set_xlabel("compression against FP32 (x)")
        top.set_xticks(compression_ticks(fp32_mb, ax.get_xlim()))
        top.xaxis.set_major_formatter(ScalarFormatter())
    return fig


def kl_figure(results: pd.DataFrame) -> Figure:
    """KL divergence to the unquantized model against mean weight bits (scales and zero points counted) for
    every plan kind and mode of a language-model sweep, on a log scale."""
    fig = Figure(figsize=(WIDTH, 4.2), layout="constrained")
    ax = fig.subplots()
    _plan_lines(ax, results, "weight_bits_mean_all_scales", "kl", distinct_x=True)
    ax.set_yscale("log")
    ax.set_xlabel("mean weight bits (scales and zero points counted)")
    ax.set_ylabel("KL(FP32 || quantized), nats per token")
    ax.set_title("KL divergence to the unquantized model against bits", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper right")
    return fig


NICE_RATIOS = (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64)
"""Compression ratios the Pareto chart's top axis may label."""


def compression_ticks(fp32_mb: float, xlim: tuple[float, float], *, spacing: float = 0.06) -> list[float]:
    """The `NICE_RATIOS` inside ``xlim`` (megabytes) whose positions lie at least ``spacing`` of the axis width
    apart: compression is 1/MB, so evenly spaced ratios crowd at the small-MB end of a linear axis."""
    low, high = sorted(xlim)
    chosen: list[float] = []
    for ratio in NICE_RATIOS:  # large MB first: the wide end keeps the round ratios
        mb = fp32_mb / ratio
        if low <= mb <= high and all(abs(fp32_mb / c - mb) >= spacing * (high - low) for c in chosen):
            chosen.append(ratio)
    return chosen


def rank_figure(ranks: pd.DataFrame, *, metric: str, reference: float | None) -> Figure:
    """One qdylora run's metric at every rank it was cut to, against rank and against trainable parameters;
    one line per run, FP32 as a dashed line."""
    fig = Figure(figsize=(WIDTH, 3.8), layout="constrained")
    by_rank, by_params = fig.subplots(1, 2)
    for label, group in ranks.groupby("label", sort=False):
        group = group.sort_values("rank")
        by_rank.plot(group["rank"], group["value"], marker="o", label=str(label))
        if group["trainable_parameters"].notna().all():
            by_params.plot(group["trainable_parameters"].astype(float), group["value"], marker="o", label=str(label))
    for ax in (by_rank, by_params):
        if reference is not None:
            ax.axhline(reference, color="#27ae60", linestyle="--", label="FP32 full fine-tuning")
        ax.set_xscale("log", base=2 if ax is by_rank else 10)
        ax.set_ylabel(f"dev {metric}{display_unit(metric)}")
        ax.grid(alpha=0.3)
    by_rank.set_xticks(sorted(ranks["rank"].unique()))
    by_rank.xaxis.set_major_formatter(ScalarFormatter())
    by_rank.set_xlabel("adapter rank (one trained run, cut at each rank)")
    by_params.set_xlabel("trainable parameters (adapters at that rank + task head)")
    by_rank.legend(fontsize=8, loc="lower right")
    return fig


def predictor_figure(predictions: pd.DataFrame, spearman: pd.DataFrame) -> Figure:
    """Predicted against measured loss change per module, one panel per predictor, with Spearman's ρ."""
    predictors = [p for p in ("trace", "eig", "fisher") if predictions[p].notna().any()]
    fig = Figure(figsize=(WIDTH, 3.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, max(len(predictors), 1)))
    colours = {2: "#c0392b", 3: "#d35400", 4: "#2980b9", 6: "#16a085", 8: "#27ae60"}
    for ax, predictor in zip(axes, predictors):
        for bits, group in predictions.groupby("bits"):
            pair = group[[predictor, "measured"]].dropna()
            ax.scatter(pair[predictor].clip(lower=1e-12), pair["measured"], s=10, label=f"{bits} bits",
                       color=colours.get(int(bits)))
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=1e-4)
        rhos = ", ".join(f"{int(r['bits'])}b {r[predictor]:.2f}" for _, r in spearman.iterrows()
                         if pd.notna(r[predictor]))
        ax.set_title(f"{predictor}: ρ {rhos}", fontsize=9)
        ax.set_xlabel(f"predicted Δloss ({predictor})")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("measured Δloss")
    axes[0].legend(fontsize=7)
    return fig
