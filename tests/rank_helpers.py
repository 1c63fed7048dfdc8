"""Starting two gloo ranks on the CPU from a test, as torchrun would: one thread each, a short collective timeout,
a free port. Imported by the tests of runs on several ranks (conftest puts this folder on the path)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys


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
