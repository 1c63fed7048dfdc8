"""Progress display for long work (rich, on stderr). Used by the CLI; the library only calls back."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class StepProgress:
    """A progress bar over optimizer steps that shows loss and learning rate, and prints evaluations."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.bar = Progress(
            TextColumn("[bold]train[/]"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=console, transient=False, disable=console.quiet)
        self.task_id: Any = None

    def on_step(self, log: Any) -> None:
        """Advance to ``log.step`` of ``log.total_steps`` (a `qanalyze.engine.train.StepLog`)."""
        if self.task_id is None:
            self.task_id = self.bar.add_task("train", total=log.total_steps, completed=log.step - 1,
                                             loss=log.loss, lr=log.lr)
        self.bar.update(self.task_id, completed=log.step, loss=log.loss, lr=log.lr)

    def on_eval(self, step: int, result: Any) -> None:
        """Print one line per evaluation (a `qanalyze.engine.evaluate.EvalResult`)."""
        values = "  ".join(f"{k} {v:.4f}" for k, v in result.to_dict().items())
        self.console.print(f"eval at step {step}: {values}")


@contextlib.contextmanager
def step_progress(console: Console) -> Iterator[StepProgress]:
    """A `StepProgress` whose bar is live for the duration of the block."""
    progress = StepProgress(console)
    with progress.bar:
        yield progress


class StageProgress:
    """One progress bar per analysis stage (weights, errors, trace, eig, ...), advanced by callbacks."""

    def __init__(self, console: Console) -> None:
        self.bar = Progress(TextColumn("[bold]{task.fields[stage]:<22}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
                            console=console, disable=console.quiet)
        self.tasks: dict[str, Any] = {}

    def update(self, stage: str, done: int, total: int, detail: str) -> None:
        """Show ``done`` of ``total`` for ``stage``, with what is being worked on now."""
        if stage not in self.tasks:
            self.tasks[stage] = self.bar.add_task(stage, total=total, stage=stage, detail=detail)
        self.bar.update(self.tasks[stage], completed=done, total=total, detail=detail)


@contextlib.contextmanager
def stage_progress(console: Console) -> Iterator[StageProgress]:
    """A `StageProgress` that is live for the duration of the block."""
    progress = StageProgress(console)
    with progress.bar:
        yield progress


class SweepProgress:
    """A sweep's progress: one bar over its runs (with the ETA of the rest), one over the current run's
    steps, and a line per finished run with its metric and cost."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.bar = Progress(TextColumn("[bold]{task.fields[label]:<10}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), TextColumn("eta"),
                            TimeRemainingColumn(), console=console, disable=console.quiet)
        self.runs: Any = None
        self.steps: Any = None

    def on_stage(self, text: str) -> None:
        """Say which stage the sweep is in (FP32 reference, analysis, planning)."""
        self.console.print(f"[bold]sweep:[/] {text}")

    def on_analysis(self, stage: str, done: int, total: int, detail: str) -> None:
        """Show the analysis a sweep runs when it has no sensitivity file yet."""
        if done == total:
            self.console.print(f"  analyze: {stage} done")

    def on_run_start(self, index: int, total: int, run: Any) -> None:
        """A run (`qanalyze.sweep.run.SweepRun`) begins: name it on the runs bar, reset the steps bar."""
        if self.runs is None:
            self.runs = self.bar.add_task("runs", total=total, completed=index, label="runs", detail="")
        self.bar.update(self.runs, detail=run.name)
        if self.steps is not None:
            self.bar.remove_task(self.steps)
            self.steps = None

    def on_step(self, log: Any) -> None:
        """Advance the current run's steps bar (a `qanalyze.engine.train.StepLog`)."""
        if self.steps is None:
            self.steps = self.bar.add_task("steps", total=log.total_steps, label="  steps", detail="")
        self.bar.update(self.steps, completed=log.step, detail=f"loss {log.loss:.4f}")

    def on_run_end(self, index: int, total: int, run: Any, row: dict[str, Any]) -> None:
        """Print what the run gave and what it cost, and advance the runs bar."""
        value, delta = row.get("value"), row.get("delta_pts")
        shown = (f"{row['metric']} {100 * value:.2f} ({delta:+.2f} pt vs FP32)" if value is not None
                 else "no result")
        self.console.print(f"{run.name}: {shown}, {row['weight_bytes'] / 1e6:.2f} MB, {row['status']}, "
                           f"{row['seconds']:.0f} s")
        self.bar.update(self.runs, completed=index + 1)


@contextlib.contextmanager
def sweep_progress(console: Console) -> Iterator[SweepProgress]:
    """A `SweepProgress` that is live for the duration of the block."""
    progress = SweepProgress(console)
    with progress.bar:
        yield progress
