"""Progress display for long work, on stderr. Used by the CLI; the library only calls back.

On a terminal each stage is a rich bar. Elsewhere (CI logs, ``make demo > log``, nohup) a bar
draws nothing until it ends, so each stage writes plain lines instead (`Ticker`): its first line,
then one whenever at least `MIN_INTERVAL_S` seconds have passed since its last line *and* at
least `MIN_FRACTION` more of its work is done, and its last (done == total). Each line has the
stage, done/total, elapsed time and ETA, e.g.
``train: step 120/400 (30%), 35 s elapsed, ETA 82 s, loss 0.4123``.
A quiet console (``Console(quiet=True)``) shows neither. Every class takes ``clock`` (seconds,
monotonic) so that tests can drive time.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
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

Clock = Callable[[], float]
"""Seconds from an arbitrary origin that never go back (`time.monotonic`)."""

MIN_INTERVAL_S = 10.0
"""Least time between two lines of a stage (its first and last line excepted)."""
MIN_FRACTION = 0.05
"""Least share of a stage's work done between two lines (its first and last line excepted)."""


def format_seconds(seconds: float) -> str:
    """``35 s``, ``4.5 min``, ``2.1 h``: short enough for a log line, exact enough for an ETA."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class Ticker:
    """Plain progress lines for one stage of work (see the module docstring for when a line is written).

    ``unit`` is written before the count (``"step "`` gives ``step 120/400``). The stage's clock
    starts at construction, or ``started`` seconds of ``clock`` if given; ``done0`` is the work
    already done then (a resumed run), so that the ETA counts only the rate of this process.
    """

    def __init__(self, console: Console, stage: str, *, unit: str = "", clock: Clock = time.monotonic,
                 started: float | None = None, done0: int = 0) -> None:
        self.console, self.stage, self.unit, self.clock = console, stage, unit, clock
        self.started = clock() if started is None else started
        self.done0 = done0
        self.last_time: float | None = None
        self.last_done = 0
        self.finished = False

    def update(self, done: int, total: int, detail: str = "") -> None:
        """Record ``done`` of ``total`` (with what is being worked on) and write a line if one is due."""
        now = self.clock()
        last = done >= total
        if self.last_time is None or (last and not self.finished):
            due = True
        else:
            due = (not last and now - self.last_time >= MIN_INTERVAL_S
                   and done - self.last_done >= MIN_FRACTION * total)
        self.finished = last
        if not due or self.console.quiet:
            return
        self.last_time, self.last_done = now, done
        self.console.print(self.line(done, total, detail, now), markup=False, highlight=False, soft_wrap=True)

    def eta(self, done: int, total: int, now: float) -> float | None:
        """Seconds left at the rate seen since the stage started, ``None`` before any work is seen."""
        elapsed, progressed = now - self.started, done - self.done0
        if done >= total:
            return 0.0
        if progressed <= 0 or elapsed <= 0:
            return None
        return (total - done) * elapsed / progressed

    def line(self, done: int, total: int, detail: str, now: float) -> str:
        """The text of one line: stage, done/total (percent), elapsed, ETA and ``detail``."""
        share = f" ({100 * done / total:.0f}%)" if total > 0 else ""
        eta = self.eta(done, total, now)
        text = (f"{self.stage}: {self.unit}{done}/{total}{share}, {format_seconds(now - self.started)} elapsed, "
                f"ETA {'?' if eta is None else format_seconds(eta)}")
        return f"{text}, {detail}" if detail else text


def _live(console: Console) -> bool:
    """Bars where they can redraw (a terminal); plain lines elsewhere."""
    return console.is_terminal and not console.quiet


class StepProgress:
    """Progress over optimizer steps with loss and learning rate (a bar, or lines), and a line per evaluation."""

    def __init__(self, console: Console, clock: Clock = time.monotonic) -> None:
        self.console, self.clock = console, clock
        self.bar = Progress(
            TextColumn("[bold]train[/]"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=console, transient=False, disable=not _live(console))
        self.task_id: Any = None
        self.ticker: Ticker | None = None

    def on_step(self, log: Any) -> None:
        """Advance to ``log.step`` of ``log.total_steps`` (a `qanalyze.engine.train.StepLog`)."""
        if not _live(self.console):
            if self.ticker is None:
                # The first call comes after the first step of this process: its clock started then.
                self.ticker = Ticker(self.console, "train", unit="step ", clock=self.clock,
                                     started=self.clock() - log.seconds, done0=log.step - 1)
            self.ticker.update(log.step, log.total_steps, f"loss {log.loss:.4f}")
            return
        if self.task_id is None:
            self.task_id = self.bar.add_task("train", total=log.total_steps, completed=log.step - 1,
                                             loss=log.loss, lr=log.lr)
        self.bar.update(self.task_id, completed=log.step, loss=log.loss, lr=log.lr)

    def on_eval(self, step: int, result: Any) -> None:
        """Print one line per evaluation (a `qanalyze.engine.evaluate.EvalResult`)."""
        values = "  ".join(f"{k} {v:.4f}" for k, v in result.to_dict().items())
        self.console.print(f"eval at step {step}: {values}")


@contextlib.contextmanager
def step_progress(console: Console, clock: Clock = time.monotonic) -> Iterator[StepProgress]:
    """A `StepProgress` whose bar is live for the duration of the block."""
    progress = StepProgress(console, clock)
    with progress.bar:
        yield progress


class StageProgress:
    """Progress per analysis stage (weights, errors, trace, eig, ...): a bar each, or lines each."""

    def __init__(self, console: Console, clock: Clock = time.monotonic) -> None:
        self.console, self.clock = console, clock
        self.bar = Progress(TextColumn("[bold]{task.fields[stage]:<22}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
                            console=console, disable=not _live(console))
        self.tasks: dict[str, Any] = {}
        self.tickers: dict[str, Ticker] = {}

    def update(self, stage: str, done: int, total: int, detail: str) -> None:
        """Show ``done`` of ``total`` for ``stage``, with what is being worked on now."""
        if not _live(self.console):
            if stage not in self.tickers:
                self.tickers[stage] = Ticker(self.console, stage, clock=self.clock, done0=done)
            self.tickers[stage].update(done, total, detail)
            return
        if stage not in self.tasks:
            self.tasks[stage] = self.bar.add_task(stage, total=total, stage=stage, detail=detail)
        self.bar.update(self.tasks[stage], completed=done, total=total, detail=detail)


@contextlib.contextmanager
def stage_progress(console: Console, clock: Clock = time.monotonic) -> Iterator[StageProgress]:
    """A `StageProgress` that is live for the duration of the block."""
    progress = StageProgress(console, clock)
    with progress.bar:
        yield progress


class SweepProgress:
    """A sweep's progress: its runs (with the ETA of the rest) and the current run's steps, as bars or
    lines, and a line per finished run with its metric and cost."""

    def __init__(self, console: Console, clock: Clock = time.monotonic) -> None:
        self.console, self.clock = console, clock
        self.bar = Progress(TextColumn("[bold]{task.fields[label]:<10}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), TextColumn("eta"),
                            TimeRemainingColumn(), console=console, disable=not _live(console))
        self.runs: Any = None
        self.steps: Any = None
        self.run_ticker: Ticker | None = None
        self.step_ticker: Ticker | None = None
        self.run_name = ""
        self.analysis: dict[str, Ticker] = {}

    def on_stage(self, text: str) -> None:
        """Say which stage the sweep is in (FP32 reference, analysis, planning)."""
        self.console.print(f"[bold]sweep:[/] {text}")

    def on_analysis(self, stage: str, done: int, total: int, detail: str) -> None:
        """Show the analysis a sweep runs when it has no sensitivity file yet."""
        if not _live(self.console):
            if stage not in self.analysis:
                self.analysis[stage] = Ticker(self.console, f"  analyze {stage}", clock=self.clock, done0=done)
            self.analysis[stage].update(done, total, detail)
        elif done == total:
            self.console.print(f"  analyze: {stage} done")

    def on_run_start(self, index: int, total: int, run: Any) -> None:
        """A run (`qanalyze.sweep.run.SweepRun`) begins: name it on the runs bar, reset the steps bar."""
        self.run_name = run.name
        self.step_ticker = None
        if not _live(self.console):
            if self.run_ticker is None:
                self.run_ticker = Ticker(self.console, "sweep", unit="run ", clock=self.clock, done0=index)
            self.run_ticker.update(index, total, f"starting {run.name}")
            return
        if self.runs is None:
            self.runs = self.bar.add_task("runs", total=total, completed=index, label="runs", detail="")
        self.bar.update(self.runs, detail=run.name)
        if self.steps is not None:
            self.bar.remove_task(self.steps)
            self.steps = None

    def on_step(self, log: Any) -> None:
        """Advance the current run's steps (a `qanalyze.engine.train.StepLog`)."""
        if not _live(self.console):
            if self.step_ticker is None:
                self.step_ticker = Ticker(self.console, f"  {self.run_name or 'run'}", unit="step ",
                                          clock=self.clock, started=self.clock() - log.seconds, done0=log.step - 1)
            self.step_ticker.update(log.step, log.total_steps, f"loss {log.loss:.4f}")
            return
        if self.steps is None:
            self.steps = self.bar.add_task("steps", total=log.total_steps, label="  steps", detail="")
        self.bar.update(self.steps, completed=log.step, detail=f"loss {log.loss:.4f}")

    def on_run_end(self, index: int, total: int, run: Any, row: dict[str, Any]) -> None:
        """Print what the run gave and what it cost, and advance the runs count."""
        value, delta = row.get("value"), row.get("delta_pts")
        from qanalyze.metrics import display_scale, display_unit

        metric = row["metric"]
        unit = "pt" if display_unit(metric) else ""  # points for rates, nothing for a perplexity
        shown = (f"{metric} {display_scale(metric) * value:.2f} ({delta:+.2f}{' ' + unit if unit else ''} vs FP32)"
                 if value is not None else "no result")
        self.console.print(f"{run.name}: {shown}, {row['weight_bytes'] / 1e6:.2f} MB, {row['status']}, "
                           f"{row['seconds']:.0f} s")
        if not _live(self.console):
            if self.run_ticker is not None:
                self.run_ticker.update(index + 1, total, f"{run.name} done")
            return
        self.bar.update(self.runs, completed=index + 1)


@contextlib.contextmanager
def sweep_progress(console: Console, clock: Clock = time.monotonic) -> Iterator[SweepProgress]:
    """A `SweepProgress` that is live for the duration of the block."""
    progress = SweepProgress(console, clock)
    with progress.bar:
        yield progress


class TaskProgress:
    """One task without steps of its own (the report): a spinner on a terminal, else a first and a last line.

    ``update(done, total, detail)`` may be called when the task can count its work.
    """

    def __init__(self, console: Console, stage: str, clock: Clock = time.monotonic) -> None:
        self.console, self.stage = console, stage
        self.ticker = Ticker(console, stage, clock=clock)
        self.status: Any = None

    def update(self, done: int, total: int, detail: str = "") -> None:
        """Record ``done`` of ``total``: a line when due, or the spinner's text on a terminal."""
        if self.status is not None:
            self.status.update(f"{self.stage}: {done}/{total} {detail}".rstrip())
        elif not _live(self.console):
            self.ticker.update(done, total, detail)


@contextlib.contextmanager
def task_progress(console: Console, stage: str, clock: Clock = time.monotonic) -> Iterator[TaskProgress]:
    """A `TaskProgress` for the block: its first line on entry and its last (1/1, with the time) on a normal exit."""
    progress = TaskProgress(console, stage, clock)
    if _live(console):
        with console.status(stage) as status:
            progress.status = status
            yield progress
        return
    progress.update(0, 1, "started")
    yield progress
    if not progress.ticker.finished:
        progress.update(1, 1, "done")
