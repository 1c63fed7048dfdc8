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
