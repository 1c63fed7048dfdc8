"""The process entry of the command line (the ``qanalyze`` script, ``python -m qanalyze``, ``python cli.py``).

libgomp reads the OpenMP wait policy once, when torch loads it, and building the command line loads torch (the
engine targets behind ``--target`` and the exporters behind ``export``'s options import the quantizers). So the
policy (`qanalyze.threads.WAIT_ENV`) is set here, before `qanalyze.cli` is imported; the ``--threads`` count is
still chosen by the command line's own callback.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Set the wait policy where the user has not, then run `qanalyze.cli.main`."""
    from qanalyze.threads import set_wait_env

    set_wait_env()
    from qanalyze.cli import main as cli_main

    return cli_main(argv)


def entry_point() -> None:
    """Console-script entry: exit with `main`'s code."""
    sys.exit(main())
