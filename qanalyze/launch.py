"""The command line as one rank of several (``torchrun --nproc-per-node N -m qanalyze ...``): one voice, and
one failure that stops every rank.

`ranked` runs a command on each rank: it joins the process group before the command (`qanalyze.distributed`),
so that every rank can report a failure through the launcher's key-value store, and keeps every rank but 0
quiet (its stdout and stderr, progress bars included, go nowhere), so the user reads one set of lines.

`shared_failures` wraps the command's work. A rank whose work raises publishes its exit code and one-line
message in the store, then fails as it would alone. A rank that fails only because of that (its collective
broke when the peer exited, or the launcher stopped it with SIGTERM after the peer's exit) raises the peer's
error instead, so rank 0 prints the cause, not "connection closed", and exits with the cause's code: 2 for
input the user can fix, 1 otherwise. Errors every rank meets alike (bad input) are each rank's own: rank 0
prints its line, every rank exits 2. A collective never waits longer than `qanalyze.distributed.timeout`.

Not launched as several ranks (no ``WORLD_SIZE``), both are the identity: no group, no store, no handler.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

from qanalyze.distributed import launched
from qanalyze.errors import InputError, Interrupted, QAnalyzeError

FAILURE_KEY = "qanalyze/failed/"
"""Store key prefix of a rank's failure: ``qanalyze/failed/<rank>`` = ``"<exit code> <one-line message>"``."""

PEER_WAIT_S = 2.0
"""How long a rank whose collective broke looks for the failing peer's message (published before that peer
exited, so normally already there)."""


class RankInputError(InputError):
    """Another rank stopped on input the user can fix (exit 2); the message is that rank's."""


class RankFailed(QAnalyzeError):
    """Another rank stopped on an internal error (exit 1); the message names the rank."""


class LauncherStopped(Exception):
    """The launcher sent SIGTERM (it stops every rank once one has failed)."""


_armed = False  # whether SIGTERM raises `LauncherStopped` now (inside `shared_failures`)


def _on_sigterm(signum: int, frame: Any) -> None:
    if _armed:
        raise LauncherStopped("stopped by the launcher")
    # Outside the work (printing the final line), the rank is about to exit by itself.


def ranked(command: Callable[[], int]) -> int:
    """Run ``command`` (the CLI, returning its exit code) as this process's rank: joined to the process group,
    quiet unless rank 0, SIGTERM turned into `LauncherStopped` inside `shared_failures`. Exactly
    ``command()`` when not launched as several ranks."""
    if not launched():
        return command()
    from qanalyze.threads import wait_env

    os.environ.update(wait_env(os.environ))  # the thread pool's wait policy must be set before torch loads
    from qanalyze.distributed import init_from_env

    try:
        here = init_from_env()
    except Exception as exc:  # a launcher's environment that names no reachable group
        import click

        click.echo(f"error: cannot join the process group of {os.environ.get('WORLD_SIZE')} ranks: "
                   f"{' '.join(str(exc).split())}", err=True)
        return 1
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    sink = io.StringIO()
    try:
        with contextlib.ExitStack() as stack:
            if not here.is_main:
                stack.enter_context(contextlib.redirect_stdout(sink))
                stack.enter_context(contextlib.redirect_stderr(sink))
            return command()
    finally:
        signal.signal(signal.SIGTERM, previous)
        _leave()


def _leave() -> None:
    import torch.distributed as dist

    with contextlib.suppress(Exception):  # a peer that died leaves nothing to tidy up with
        if dist.is_initialized():
            dist.destroy_process_group()


def launcher_store() -> Any:
    """The launcher's key-value store that the process group was joined through (where failures are published);
    None when not distributed or when this torch does not expose it."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return None
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except Exception:  # a torch without it: failures are then each rank's own
        return None


def exit_code(exc: BaseException) -> int:
    """The exit code the CLI gives ``exc`` (2 for input errors, 130 for interrupts, 1 otherwise)."""
    if isinstance(exc, InputError):
        return 2
    if isinstance(exc, Interrupted | KeyboardInterrupt):
        return 130
    return 1


def _publish(store: Any, rank: int, exc: BaseException) -> None:
    message = " ".join(str(exc).split()) or exc.__class__.__name__
    with contextlib.suppress(Exception):
        store.set(f"{FAILURE_KEY}{rank}", f"{exit_code(exc)} {message}")


def _peer_failure(store: Any, rank: int, size: int) -> tuple[int, int, str] | None:
    deadline = time.monotonic() + PEER_WAIT_S
    while True:
        for peer in range(size):
            if peer == rank:
                continue
            key = f"{FAILURE_KEY}{peer}"
            with contextlib.suppress(Exception):
                if store.check([key]):
                    code, _, message = store.get(key).decode().partition(" ")
                    return peer, int(code), message
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


@contextlib.contextmanager
def shared_failures() -> Iterator[None]:
    """Publish this rank's failure to the others, and turn a failure caused by another rank's into that rank's
    error (`RankInputError`, `RankFailed`). The identity when not launched as several ranks."""
    global _armed
    if not launched():
        yield
        return
    from qanalyze.distributed import world

    here = world()
    _armed = True
    try:
        yield
    except BaseException as exc:
        _armed = False
        store = launcher_store()
        if store is None:
            raise
        # Our own named errors and interrupts are causes; anything else (a broken collective, the launcher's
        # SIGTERM) is a consequence when a peer has failed first.
        if not isinstance(exc, QAnalyzeError | KeyboardInterrupt):
            peer = _peer_failure(store, here.rank, here.size)
            if peer is not None:
                rank, code, message = peer
                if code == 2:
                    raise RankInputError(message) from None
                raise RankFailed(f"rank {rank} failed: {message}") from None
        _publish(store, here.rank, exc)
        raise
    finally:
        _armed = False
