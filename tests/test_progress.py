"""Plain progress lines where stderr is not a terminal: when they come, what they say, and quiet."""

from __future__ import annotations

import io
from types import SimpleNamespace

from rich.console import Console

from qanalyze.progress import (
    Ticker,
    format_seconds,
    stage_progress,
    step_progress,
    sweep_progress,
    task_progress,
)


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def log_console(quiet: bool = False) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=False, quiet=quiet, width=80), out


def lines(out: io.StringIO) -> list[str]:
    return [x for x in out.getvalue().splitlines() if x]


def step(n: int, total: int, loss: float = 0.5, seconds: float = 1.0) -> SimpleNamespace:
    return SimpleNamespace(step=n, total_steps=total, epoch=0, loss=loss, lr=1e-5, grad_norm=1.0, seconds=seconds)


def test_lines_need_both_ten_seconds_and_five_percent():
    console, out = log_console()
    clock = FakeClock()
    ticker = Ticker(console, "trace", clock=clock)
    ticker.update(0, 100)                   # first: always
    clock.now += 60
    ticker.update(4, 100)                   # 60 s but only 4 %: none
    ticker.update(5, 100)                   # 60 s and 5 %: a line
    clock.now += 9.9
    ticker.update(50, 100)                  # 45 % but 9.9 s: none
    clock.now += 0.1
    ticker.update(50, 100)                  # 10 s and 45 %: a line
    clock.now += 1
    ticker.update(100, 100)                 # last: always
    ticker.update(100, 100)                 # ...once
    got = lines(out)
    assert [x.split(",")[0] for x in got] == ["trace: 0/100 (0%)", "trace: 5/100 (5%)", "trace: 50/100 (50%)",
                                               "trace: 100/100 (100%)"]
    assert got[0] == "trace: 0/100 (0%), 0 s elapsed, ETA ?"
    assert got[-1] == "trace: 100/100 (100%), 71 s elapsed, ETA 0 s"


def test_eta_is_the_rest_at_the_rate_seen():
    console, out = log_console()
    clock = FakeClock()
    ticker = Ticker(console, "eig", clock=clock)
    ticker.update(0, 400)
    clock.now += 30
    ticker.update(100, 400, "layer 3")
    assert lines(out)[-1] == "eig: 100/400 (25%), 30 s elapsed, ETA 90 s, layer 3"
    assert ticker.eta(100, 400, clock.now) == 90.0
    # A resumed stage counts only the work of this process.
    resumed = Ticker(console, "eig", clock=clock, done0=200)
    clock.now += 10
    assert resumed.eta(300, 400, clock.now) == 10.0


def test_training_lines_look_like_the_issue_asks():
    console, out = log_console()
    clock = FakeClock()
    with step_progress(console, clock=clock) as progress:
        for n in range(1, 401):
            clock.now += 0.25
            progress.on_step(step(n, 400, loss=0.4123, seconds=0.25))
        progress.on_eval(400, SimpleNamespace(to_dict=lambda: {"accuracy": 0.9}))
    got = lines(out)
    assert got[0] == "train: step 1/400 (0%), 0 s elapsed, ETA 100 s, loss 0.4123"
    assert "train: step 121/400 (30%), 30 s elapsed, ETA 70 s, loss 0.4123" in got  # 10 s after step 81
    assert got[-2] == "train: step 400/400 (100%), 100 s elapsed, ETA 0 s, loss 0.4123"
    assert got[-1] == "eval at step 400: accuracy 0.9000"
    # 100 s of steps: a line every 10 s at most, plus the first and the last.
    assert len(got) == 12


def test_fast_work_prints_first_and_last_only():
    console, out = log_console()
    clock = FakeClock()
    with stage_progress(console, clock=clock) as progress:
        for stage in ("weights", "trace"):
            for done in range(11):
                clock.now += 0.1
                progress.update(stage, done, 10, f"module {done}")
    assert [x.split(",")[0] for x in lines(out)] == ["weights: 0/10 (0%)", "weights: 10/10 (100%)",
                                                     "trace: 0/10 (0%)", "trace: 10/10 (100%)"]


def test_slow_work_is_limited_by_the_five_percent():
    console, out = log_console()
    clock = FakeClock()
    ticker = Ticker(console, "weights", clock=clock)
    for done in range(1001):
        ticker.update(done, 1000)
        clock.now += 1.0  # 1000 s over 1000 items: 10 s lines would be 100; 5 % allows 20
    assert len(lines(out)) == 21


def test_quiet_prints_nothing():
    console, out = log_console(quiet=True)
    clock = FakeClock()
    with step_progress(console, clock=clock) as progress:
        progress.on_step(step(1, 2))
        progress.on_step(step(2, 2))
    with stage_progress(console, clock=clock) as stages:
        stages.update("trace", 0, 1, "")
        stages.update("trace", 1, 1, "")
    with task_progress(console, "report", clock=clock):
        pass
    assert out.getvalue() == ""


def test_sweep_lines_over_runs_and_steps():
    console, out = log_console()
    clock = FakeClock()
    runs = [SimpleNamespace(name=f"int{b}") for b in (4, 8)]
    row = {"metric": "accuracy", "value": 0.9, "delta_pts": -1.0, "weight_bytes": 2e6, "status": "ok",
           "seconds": 50}
    with sweep_progress(console, clock=clock) as progress:
        progress.on_stage("FP32 reference")
        progress.on_analysis("trace", 0, 1, "batch 1")
        clock.now += 5
        progress.on_analysis("trace", 1, 1, "done")
        for index, run in enumerate(runs):
            progress.on_run_start(index, 2, run)
            for n in range(1, 51):
                clock.now += 1
                progress.on_step(step(n, 50))
            progress.on_run_end(index, 2, run, row)
    got = lines(out)
    assert got[0] == "sweep: FP32 reference"
    assert got[1].startswith("  analyze trace: 0/1 (0%)")
    assert got[2].startswith("  analyze trace: 1/1 (100%), 5 s elapsed")
    assert got[3] == "sweep: run 0/2 (0%), 0 s elapsed, ETA ?, starting int4"
    assert got[4].startswith("  int4: step 1/50 (2%), 1 s elapsed, ETA 49 s")
    assert "sweep: run 1/2 (50%), 50 s elapsed, ETA 50 s, int4 done" in got
    assert got[-1] == "sweep: run 2/2 (100%), 100 s elapsed, ETA 0 s, int8 done"
    assert sum(x.startswith("  int8: step") for x in got) == 6  # first, every 10 s, last


def test_task_progress_writes_first_and_last():
    console, out = log_console()
    clock = FakeClock()
    with task_progress(console, "report", clock=clock):
        clock.now += 3
    assert lines(out) == ["report: 0/1 (0%), 0 s elapsed, ETA ?, started",
                          "report: 1/1 (100%), 3 s elapsed, ETA 0 s, done"]


def test_terminal_keeps_the_bars():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100)
    with step_progress(console) as progress:
        progress.on_step(step(1, 2))
        progress.on_step(step(2, 2))
    assert "train: step" not in out.getvalue()
    assert "2/2" in out.getvalue()


def test_format_seconds():
    assert [format_seconds(s) for s in (0.4, 35, 119, 270, 7300)] == ["0 s", "35 s", "119 s", "4.5 min", "2.0 h"]
