"""What the command line prints: tables and one-line summaries of the records the verbs return."""

from __future__ import annotations

from typing import Any

import click


def print_metrics(task: str, split: str, metrics: dict[str, float], examples: int | str,
                  intervals: dict[str, list[float]] | None = None) -> None:
    """One line of metrics on stdout; ``examples`` is a count, or words for what was evaluated; ``intervals``
    (95 % bootstrap intervals by metric) are shown beside their metrics."""
    intervals = intervals or {}
    values = "  ".join(f"{name} {value:.4f}" + (f" [{intervals[name][0]:.4f}, {intervals[name][1]:.4f}]"
                                                 if name in intervals else "")
                       for name, value in metrics.items())
    count = f"{examples} examples" if isinstance(examples, int) else examples
    click.echo(f"{task} {split} ({count}): {values}")


FISHER_SHOWN = ("3", "g32")
"""The bits and layout of the Fisher score ranked when an analysis measured no Hessian (task lm's default)."""


def print_most_sensitive(report: Any, console: Any, count: int = 10) -> None:
    """The modules with the largest Ω (or average trace), as a table on the console; by the Fisher score when
    the analysis measured no Hessian figure."""
    from rich.table import Table

    if not any(entry.get("hessian") for entry in report.modules.values()):
        _print_most_fisher(report, console, count)
        return
    rows = []
    for name, entry in report.modules.items():
        hessian = entry.get("hessian", {})
        rows.append((name, hessian.get("omega"), hessian.get("avg_trace"), hessian.get("trace"),
                     hessian.get("trace_stderr")))
    # Ω comes from converged Lanczos runs; the trace is a stochastic estimate shown with its error.
    rows.sort(key=lambda r: -(r[1] if r[1] is not None else (r[2] or 0.0)))
    table = Table(title=f"the {count} most sensitive modules (by Ω = |mean λ_max| + std over batches)")
    for column in ("module", "Ω", "average trace", "trace ± stderr"):
        table.add_column(column)
    for name, omega, avg, trace, stderr in rows[:count]:
        shown = f"{trace:.4g} ± {stderr:.2g}" if trace is not None else "-"
        table.add_row(name, *(f"{v:.4g}" if v is not None else "-" for v in (omega, avg)), shown)
    console.print(table)


def _print_most_fisher(report: Any, console: Any, count: int) -> None:
    from rich.table import Table

    bits, layout = FISHER_SHOWN
    rows = []
    for name, entry in report.modules.items():
        scores = entry.get("fisher_error", {}).get(bits, {})
        score = scores.get(layout, scores.get("row")) if isinstance(scores, dict) else scores
        if score is not None:
            rows.append((name, score, entry.get("params")))
    if not rows:
        return
    rows.sort(key=lambda row: -row[1])
    table = Table(title=f"the {count} most sensitive modules (by the Fisher score Σ F·ΔW² at {bits} bits, {layout})")
    for column in ("module", "Fisher score", "parameters"):
        table.add_column(column)
    for name, score, params in rows[:count]:
        table.add_row(name, f"{score:.4g}", f"{params:,}" if params else "-")
    console.print(table)


def print_plan(plan_record: Any, console: Any) -> None:
    """A plan as a table of modules, then its totals."""
    from rich.table import Table

    table = Table(title=f"plan: budget {plan_record.budget['text']}, objective {plan_record.objective}"
                        + (f", baseline {plan_record.baseline}" if plan_record.baseline else ""))
    table.add_column("module", overflow="fold")
    for column in ("W bits", "group", "A bits", "G bits", "predicted damage"):
        table.add_column(column)
    for name, entry in plan_record.entries.items():
        if not entry.quantized:
            table.add_row(name, "float", "", "", "", "")
        else:
            # a column layout (g64, or a llama.cpp type such as Q4_K) says more than its row group "channel"
            group = (entry.column_group or entry.group) + (", mse range" if entry.weight_range == "mse" else "")
            damage = f"{entry.predicted_damage:.3g}" if entry.predicted_damage is not None else "-"
            table.add_row(name, str(entry.weight_bits), group, str(entry.activation_bits or "-"),
                          str(entry.gradient_bits or "-"), damage)
    console.print(table)
    totals = plan_record.totals
    console.print(f"mean weight bits {totals['weight_bits_mean']:.3f}, weight bytes {totals['weight_bytes']:,}, "
                  f"compression {totals['compression']:.2f}x, predicted damage {totals['predicted_damage']:.4g}, "
                  f"BOPs {totals.get('bops', 0):.3g} per {totals.get('bops_seq_len', '?')}-token sequence")
