"""Run CLI commands in this process and send it a real signal at a chosen point of each.

    python interrupt_driver.py PLAN.json RESULTS.json

PLAN is a list of ``{"point": ..., "args": [...]}``; each command runs in turn and its exit code and
stderr go to RESULTS. A point is ``none``, ``after-checkpoint:N`` (SIGINT just after the N-th checkpoint
is written), ``after-optimizer:N`` (SIGINT inside step N, after the weights moved and before the step is
counted), ``final-eval`` (SIGINT in the first evaluation), ``final-save`` (SIGINT while the first log
file is written) or ``kill:N`` (SIGKILL inside step N, after the optimizer step).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import sys

import torch

import qanalyze.engine.train as train_module
from qanalyze.cli import main

_ARMED = {"target": None, "count": 0, "signal": signal.SIGINT}


def _wrap(owner: object, name: str) -> None:
    original = getattr(owner, name)

    def wrapped(*args: object, **kwargs: object) -> object:
        result = original(*args, **kwargs)
        if _ARMED["target"] == name:
            _ARMED["count"] -= 1
            if _ARMED["count"] == 0:
                os.kill(os.getpid(), _ARMED["signal"])
        return result

    setattr(owner, name, wrapped)


_POINTS = {
    "after-checkpoint": ("save_checkpoint", signal.SIGINT),
    "after-optimizer": ("step", signal.SIGINT),
    "final-eval": ("evaluate", signal.SIGINT),
    "final-save": ("atomic_write_text", signal.SIGINT),
    "kill": ("step", signal.SIGKILL),
}


def _arm(point: str) -> None:
    kind, _, count = point.partition(":")
    target, signum = _POINTS.get(kind, (None, signal.SIGINT))
    _ARMED.update(target=target, count=int(count or 1), signal=signum)


if __name__ == "__main__":
    for owner, name in ((train_module, "save_checkpoint"), (torch.optim.AdamW, "step"),
                        (train_module, "evaluate"), (train_module, "atomic_write_text")):
        _wrap(owner, name)
    with open(sys.argv[1]) as handle:
        plan = json.load(handle)
    results = []
    for item in plan:
        _arm(item["point"])
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(item["args"])
        results.append({"code": code, "stderr": err.getvalue()})
        with open(sys.argv[2], "w") as handle:
            json.dump(results, handle)
