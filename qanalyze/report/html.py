"""Records + figures -> one self-contained HTML page (jinja2), with the figures also written as PNG.

Figures are embedded as base64 SVG images and the style is inline, so the page references nothing
outside itself. Every section is always present; one whose records were not given says which
command makes them. The page and each PNG are written atomically.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape
from matplotlib.figure import Figure

from qanalyze.errors import RecordError
from qanalyze.metrics import display_unit
from qanalyze.records import atomic_path, atomic_write_text, environment, utc_now
from qanalyze.report import figures, tables
from qanalyze.report.inputs import ReportInputs

SECTIONS = ("provenance", "sensitivity", "errors", "plan", "pareto", "ranks", "predictors")
"""The ids of the page's sections, in order."""


@dataclass
class Section:
    """One part of the page: a title, an optional note, findings, figures and tables."""

    id: str
    title: str
    missing: str | None = None
    findings: list[str] = field(default_factory=list)
    figures: list[dict[str, str]] = field(default_factory=list)
    tables: list[dict[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class ReportResult:
    """What `render_report` wrote: the page, the PNG files beside it, and which sections have content."""

    path: Path
    pngs: list[Path]
    filled: list[str]


def _svg(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None})
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _table_html(frame: pd.DataFrame, *, index: bool = False) -> str:
    return frame.to_html(index=index, border=0, classes="data", na_rep="–",
                         float_format=lambda v: f"{v:.4g}", escape=True)


class _Page:
    """Collects sections; figures are rendered once to SVG (embedded) and to PNG (beside the page)."""

    def __init__(self, png_dir: Path | None) -> None:
        self.png_dir = png_dir
        self.pngs: list[Path] = []
        self.sections: list[Section] = []

    def figure(self, section: Section, name: str, fig: Figure, caption: str) -> None:
        section.figures.append({"name": name, "svg": _svg(fig), "caption": caption})
        if self.png_dir is not None:
            target = self.png_dir / f"{name}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(target) as tmp:
                fig.savefig(tmp, format="png", dpi=150)
            self.pngs.append(target)

    @staticmethod
    def table(section: Section, title: str, frame: pd.DataFrame, *, index: bool = False) -> None:
        section.tables.append({"title": title, "html": _table_html(frame, index=index)})


def _provenance(page: _Page, inputs: ReportInputs) -> Section:
    section = Section("provenance", "Model, data, settings and provenance")
    records = {"sweep": inputs.sweep, "sensitivity": inputs.sensitivity, "plan": inputs.plan,
               **{f"run {Path(path).name}": run for path, run in inputs.runs.items()}}
    page.table(section, "Records", tables.provenance_table(records, inputs.sources))
    settings = tables.settings_table(records)
    if len(settings):
        page.table(section, "Settings that change the numbers", settings)
    if inputs.sweep is not None:
        fp32 = inputs.sweep.fp32
        section.findings.append(f"FP32 reference: {', '.join(f'{k} {100 * v:.2f}' for k, v in fp32['metrics'].items())}"
                                f" on {fp32.get('examples')} dev examples of {inputs.sweep.data.get('task')}.")
    return section


def _sensitivity(page: _Page, inputs: ReportInputs) -> Section:
    section = Section("sensitivity", "Per-module sensitivity: Hessian eigenvalues, traces and density")
    report = inputs.sensitivity
    if report is None:
        section.missing = "No sensitivity file given: run `qanalyze analyze` and pass its sensitivity.json."
        return section
    table = tables.sensitivity_table(report)
    if table["omega"].notna().any() or table["avg_trace"].notna().any():
        page.figure(section, "sensitivity", figures.sensitivity_figure(table),
                    "Modules by depth. Ω is Q-BERT's sensitivity over the calibration batches; the average "
                    "trace is HAWQ-V2's.")
    density = report.model_level.get("density")
    if density:
        page.figure(section, "density", figures.density_figure(density),
                    "Ritz values of the whole weight Hessian on the first batch, Gaussian-smoothed.")
    else:
        section.findings.append("No eigenvalue density in this file (run `qanalyze analyze --metrics ...,density`).")
    layers = tables.layer_type_table(report)
    if layers.shape[0] > 1:
        title = "Predicted damage at 4 bits by layer and module type (average trace x weight error)"
        page.figure(section, "layers", figures.heatmap_figure(layers, title=title, colorbar="predicted damage",
                                                              xlabel="module type"), title)
    page.table(section, "Hessian metrics per module", table)
    blocks = pd.DataFrame([{"layer": int(k), "omega": v.get("omega"), "eigenvalues": v.get("eigenvalues")}
                           for k, v in sorted(report.blocks.items(), key=lambda kv: int(kv[0]))])
    if len(blocks):
        page.table(section, "Per-layer (Q-BERT block) top eigenvalues", blocks)
    return section


_ERRORS: tuple[tuple[str, str, str], ...] = (
    ("weight", "Weight quantization error ‖Q(W) − W‖² (one scale per output row)", "‖Q(W) − W‖²"),
    ("activation", "Activation quantization error E‖Q(X) − X‖² on each module's input", "E‖Q(X) − X‖²"),
    ("gradient", "Relative error of the weight gradient when the output gradient is quantized", "relative error"),
)


def _errors(page: _Page, inputs: ReportInputs) -> Section:
    section = Section("errors", "Quantization error of weights, activations and gradients")
    if inputs.sensitivity is None:
        section.missing = "No sensitivity file given: the errors are measured by `qanalyze analyze`."
        return section
    for kind, title, colorbar in _ERRORS:
        table = tables.error_table(inputs.sensitivity, kind)
        if table.empty:
            section.findings.append(f"No {kind} errors in this sensitivity file.")
            continue
        page.figure(section, f"{kind}-error", figures.heatmap_figure(table, title=title, colorbar=colorbar), title)
        page.table(section, title, table, index=True)
    return section


def _plan(page: _Page, inputs: ReportInputs) -> Section:
    section = Section("plan", "The chosen plan")
    plan = inputs.plan
    if plan is None:
        section.missing = "No plan given: run `qanalyze plan MODEL --budget 4bit` and pass its plan.json."
        return section
    table = tables.plan_table(plan)
    totals = plan.totals
    section.findings.append(
        f"Budget {plan.budget.get('text')} ({plan.baseline or 'Hessian'} plan, objective {plan.objective}): mean "
        f"weight bits {totals.get('weight_bits_mean', float('nan')):.3f}, {totals.get('weight_bytes', 0) / 1e6:.2f} "
        f"MB, {totals.get('compression', float('nan')):.2f}x compression, {totals.get('planned_modules')} modules "
        f"quantized and {totals.get('float_modules')} kept in float.")
    page.figure(section, "plan", figures.plan_figure(table), "Bits of weights (with group layout), activations and "
                "gradients per module.")
    page.table(section, "Totals", tables.plan_totals(plan))
    page.table(section, "Per module", table)
    return section


def _finding(row: pd.Series, several_modes: bool) -> str:
    where = f"{row['budget']} ({row['mode']})" if several_modes else row["budget"]
    pt = " pt" if display_unit(row.get("metric")) else ""  # points for rates; a perplexity in its own units
    if row["identical_plans"]:
        return (f"At {where} every baseline is the Hessian plan itself (one trained run, {row['hessian']:.2f}, "
                f"{row['delta_vs_fp32_pts']:+.2f}{pt} against FP32): only one plan fits this budget, so there is "
                "nothing to compare.")
    if row["hessian_ahead"]:
        return (f"At {where} the Hessian plan reaches {row['hessian']:.2f} ({row['delta_vs_fp32_pts']:+.2f}{pt} "
                f"against FP32), {abs(row['margin_pts']):.2f}{pt} ahead of the best baseline ({row['best_baseline']}).")
    return (f"At {where} the Hessian plan does NOT beat the baselines: it reaches {row['hessian']:.2f} "
            f"({row['delta_vs_fp32_pts']:+.2f}{pt} against FP32), {abs(row['margin_pts']):.2f}{pt} behind "
            f"{row['best_baseline']} ({row['best_baseline_value']:.2f}).")


def _pareto(page: _Page, inputs: ReportInputs) -> Section:
    section = Section("pareto", "Accuracy against compression: the Pareto chart")
    if inputs.sweep is None and not inputs.runs:
        section.missing = "No sweep given: run `qanalyze sweep MODEL --budgets 2,3,4,6,8 ...` and pass its folder."
        return section
    if inputs.sweep is None:
        section.findings.append("Single runs, no sweep: the baselines of equal cost appear with "
                                "`qanalyze sweep`.")
        results = tables.runs_table(inputs.runs)
    else:
        results = tables.results_table(inputs.sweep)
    metric = results["metric"].dropna().iloc[0] if results["metric"].notna().any() else "metric"
    page.figure(section, "pareto", figures.pareto_figure(results, metric=metric),
                "Each point is a trained plan; plans of one budget have (nearly) equal bytes.")
    if "kl" in results and results["kl"].notna().any():
        page.figure(section, "kl", figures.kl_figure(results),
                    "KL divergence of each quantized model's next-token distributions to the unquantized model's, "
                    "on the evaluation windows: the figure llama.cpp and exllamav3 compare quantizations by.")
    verdict = tables.verdict_table(results)
    several = verdict["mode"].nunique() > 1
    section.findings += [_finding(row, several) for _, row in verdict.iterrows()]
    if len(verdict):
        page.table(section, "Hessian plan against the best baseline of equal cost", verdict)
    page.table(section, "Every run", results)
    return section


def _ranks(page: _Page, inputs: ReportInputs) -> Section:
    section = Section("ranks", "QDyLoRA: one trained run at every adapter rank")
    table = tables.rank_table(inputs.sweep, inputs.runs)
    if table["value"].notna().sum() == 0:
        section.missing = ("No qdylora run given: `qanalyze train MODEL --mode qdylora ...` (pass its run directory) "
                           "or `qanalyze sweep ... --modes qat,qdylora`.")
        return section
    metric = table["metric"].dropna().iloc[0]
    deltas = table["delta_pts"].dropna()
    reference = (table["value"] - table["delta_pts"]).dropna()
    page.figure(section, "ranks", figures.rank_figure(table, metric=metric,
                                                      reference=float(reference.iloc[0]) if len(reference) else None),
                "Each line is one qdylora run (a frozen quantized base with dynamic-rank adapters), evaluated with its "
                "adapters cut to each rank without retraining.")
    for label, group in table.groupby("label", sort=False):
        best = group.loc[group["value"].idxmax()]
        against = "" if pd.isna(best["delta_pts"]) else f" ({best['delta_pts']:+.2f} pt against FP32)"
        section.findings.append(f"{label}: best at rank {int(best['rank'])} with {best['value']:.2f}{against}, "
                                f"{len(group)} ranks from one run.")
    if len(deltas) == 0:
        section.findings.append("No FP32 run on the same dev data was given, so no rank is compared with FP32.")
    page.table(section, "Metric per rank", table)
    return section


def _predictors(page: _Page, inputs: ReportInputs) -> Section:
    section = Section("predictors", "Which predictor of damage was right")
    report = inputs.sensitivity
    predictions = tables.predictor_table(report) if report is not None else pd.DataFrame()
    if len(predictions):
        spearman = tables.spearman_table(predictions)
        page.figure(section, "predictors", figures.predictor_figure(predictions, spearman),
                    "Each point is a module quantized alone (one scale per row); ρ is Spearman's rank correlation.")
        page.table(section, "Spearman correlation with the measured loss change", spearman)
        page.table(section, "Predicted and measured loss change per module", predictions)
    else:
        section.missing = ("No measured loss changes: run `qanalyze analyze --measure-delta-loss` to compare the "
                           "trace, eigenvalue and Fisher predictions with what quantizing each module does.")
    if inputs.sweep is not None:
        agreement = tables.damage_agreement(tables.results_table(inputs.sweep))
        if agreement["spearman"] is not None:
            section.findings.append(f"Across {agreement['plans']} plans trained in {agreement['mode']}, the plan's "
                                    f"predicted damage and its measured loss of accuracy have Spearman "
                                    f"ρ = {agreement['spearman']:.2f}.")
    return section


BUILDERS: tuple[Callable[[_Page, ReportInputs], Section], ...] = (
    _provenance, _sensitivity, _errors, _plan, _pareto, _ranks, _predictors)


def render_report(inputs: ReportInputs, out: str | Path, *, png_dir: str | Path | None = None,
                  progress: Callable[[int, int, str], None] | None = None) -> ReportResult:
    """Write the report page for ``inputs`` to ``out``; with ``png_dir`` every figure also as PNG there.
    ``progress(done, total, section)`` is called as each section is built."""
    if inputs.empty():
        raise RecordError("nothing to report: give a sensitivity.json, a plan.json or a sweep folder")
    out = Path(out)
    page = _Page(Path(png_dir) if png_dir is not None else None)
    sections = []
    for index, builder in enumerate(BUILDERS):
        sections.append(builder(page, inputs))
        if progress is not None:
            progress(index + 1, len(BUILDERS), sections[-1].id)
    template = Environment(loader=PackageLoader("qanalyze", "report"),
                           autoescape=select_autoescape(["html", "j2"])).get_template("template.html.j2")
    title = _title(inputs)
    html = template.render(title=title, sections=sections, created=utc_now(), versions=environment())
    atomic_write_text(out, html)
    return ReportResult(path=out, pngs=page.pngs, filled=[s.id for s in sections if s.missing is None])


def _title(inputs: ReportInputs) -> str:
    record: Any = inputs.sweep or inputs.sensitivity or inputs.plan or next(iter(inputs.runs.values()))
    model = (record.model or {}).get("source") or (record.model or {}).get("architecture") or "model"
    task = (getattr(record, "data", None) or {}).get("task") or ""
    return f"qanalyze report: {model}" + (f" on {task}" if task else "")
