"""What a command's outcome becomes: an exit code, and one line on stderr for every failure.

0 ok; 2 what the user can fix (`qanalyze.errors.InputError`, click usage errors, and file-system errors such as
permissions or a full disk: one line on stderr, nothing written); 3 training diverged (NaN or overflow: a finding
about the plan or the settings, not bad input); 130 interrupted (`qanalyze.errors.Interrupted`: one line saying what
was kept and how to go on); 1 an internal error (traceback only with ``QANALYZE_DEBUG=1``).
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable

import click

EXIT_OK, EXIT_INTERNAL, EXIT_INPUT, EXIT_DIVERGED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def run_command(build: Callable[[], click.Group], argv: list[str] | None) -> int:
    """Run the command line ``build()`` makes on ``argv`` and turn every outcome into an exit code: one line on
    stderr for every failure."""
    from qanalyze.errors import InputError
    from qanalyze.launch import shared_failures

    _quiet_engine_loggers()
    try:
        # Without standalone mode click returns the code of --help / --version instead of exiting.
        with shared_failures():  # a rank that fails because another did reports that rank's error
            result = build().main(args=argv, prog_name="qanalyze", standalone_mode=False)
    except click.Abort:
        click.echo("error: aborted", err=True)
        return EXIT_INTERRUPTED
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        return EXIT_INPUT
    except InputError as exc:
        click.echo(f"error: {_one_line(exc)}", err=True)
        return EXIT_INPUT
    except KeyboardInterrupt:
        click.echo("error: interrupted; nothing was written", err=True)
        return EXIT_INTERRUPTED
    except Exception as exc:
        from qanalyze.engine.train import TrainingDiverged
        from qanalyze.errors import Interrupted, file_system_problem

        if isinstance(exc, Interrupted | TrainingDiverged):
            click.echo(f"error: {_one_line(exc)}", err=True)
            return EXIT_INTERRUPTED if isinstance(exc, Interrupted) else EXIT_DIVERGED
        problem = file_system_problem(exc)
        if problem is None:
            return _internal(exc)
        click.echo(f"error: {problem}", err=True)
        return EXIT_INPUT
    return result if isinstance(result, int) else EXIT_OK


QUIET_LOGGERS = ("torchao", "torch.utils._pytree")
"""Loggers of packages that transformers imports when installed (the ``export`` extra's torchao), whose
import-time warnings concern GPU kernels and torch.compile, never a qanalyze command: shown only as errors."""


def _quiet_engine_loggers() -> None:
    import logging

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def _internal(exc: BaseException) -> int:
    if os.environ.get("QANALYZE_DEBUG"):
        traceback.print_exception(exc)
    click.echo(f"internal error: {exc.__class__.__name__}: {_one_line(exc)} "
               "(set QANALYZE_DEBUG=1 for the traceback)", err=True)
    return EXIT_INTERNAL


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or exc.__class__.__name__
