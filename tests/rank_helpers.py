"""Starting two gloo ranks on the CPU from a test, as torchrun would: one thread each, a short collective timeout,
a free port. Imported by the tests of runs on several ranks (conftest puts this folder on the path)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def rank_env(**extra: str) -> dict[str, str]:
    """This environment without a launcher's rank variables, one thread, a 120 s collective timeout, and ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", "QANALYZE_THREADS": "1", "QANALYZE_DIST_TIMEOUT": "120", **extra}


def free_port() -> int:
    """A TCP port nobody listens on now, for the ranks' rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_ranks(*argv: str) -> list[subprocess.CompletedProcess]:
    """``python ARGV`` as ranks 0 and 1, started by hand with the environment torchrun gives them, to read each
    one's exit and output."""
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, *argv], env=rank_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                                                  MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    done = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


VENV_BIN = Path(sys.executable).parent


def one_process(*args: object) -> subprocess.CompletedProcess:
    """``python -m qanalyze ARGS`` in one process with `rank_env`."""
    return subprocess.run([sys.executable, "-m", "qanalyze", *map(str, args)], env=rank_env(), capture_output=True,
                          text=True, timeout=300)


def torchrun(*args: object, timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2 -m qanalyze ARGS`` with `rank_env` on a free port."""
    return subprocess.run([str(VENV_BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", str(free_port()),
                           "-m", "qanalyze", *map(str, args)], env=rank_env(), capture_output=True, text=True,
                          timeout=timeout)


def messages(err: str) -> list[str]:
    """The lines qanalyze itself wrote to stderr (the environment's import-time warnings are not ours)."""
    return [line for line in err.splitlines() if line.startswith(("error:", "internal error:"))]


def largest_difference(a: object, b: object, where: str = "") -> float:
    """The largest relative difference of the numbers of two JSON values, which must match in structure."""
    if isinstance(a, dict):
        assert set(a) == set(b), (where, set(a) ^ set(b))
        return max((largest_difference(a[k], b[k], f"{where}.{k}") for k in a), default=0.0)
    if isinstance(a, list):
        assert len(a) == len(b), where
        return max((largest_difference(x, y, f"{where}[{i}]") for i, (x, y) in enumerate(zip(a, b))), default=0.0)
    if isinstance(a, float):
        return abs(a - b) / max(abs(a), abs(b), 1e-30)
    assert a == b, (where, a, b)
    return 0.0
