"""Ctrl-C that waits for a safe point.

A KeyboardInterrupt raised in the middle of an optimizer step leaves the weights, the optimizer
moments and the random state of two different steps; a checkpoint of that state cannot resume to
the numbers of an uninterrupted run. Inside `deferred_interrupt` the first SIGINT only sets a flag
that the training loop reads between steps, where the state is whole; a second SIGINT raises
KeyboardInterrupt at once for a user who will not wait.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


class InterruptFlag:
    """Whether a SIGINT arrived since `deferred_interrupt` was entered."""

    def __init__(self) -> None:
        self.requested = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


@contextmanager
def deferred_interrupt() -> Iterator[InterruptFlag]:
    """Hold the first SIGINT as a flag until the block ends or the caller reads it; a second SIGINT
    raises KeyboardInterrupt. Outside the main thread (where Python delivers no signals) the flag
    simply stays unset."""
    flag = InterruptFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.signal(signal.SIGINT, flag._handle)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)
