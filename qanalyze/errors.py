"""Named errors. Every `InputError` is the user's to fix: the CLI prints its message on one
line and exits with code 2, as for the file-system errors `file_system_problem` recognises. Anything
else is a bug in qanalyze (exit 1)."""

from __future__ import annotations

import errno
import re


class QAnalyzeError(Exception):
    """Base class of every error qanalyze raises on purpose."""


class InputError(QAnalyzeError):
    """Bad input from the user: a path, a name, a flag value, a file's content."""


class ModelNotFoundError(InputError):
    """The model path, alias or hub id names nothing that can be loaded."""


class ModelFormatError(InputError):
    """The model exists but is not a usable Hugging Face model for the request."""


class UnknownTaskError(InputError):
    """The task name is not in the registry."""


class DataError(InputError):
    """The data source is missing, malformed or inconsistent with the task."""


class ConfigError(InputError):
    """A setting is out of range or inconsistent with another setting."""


class OutputDirError(InputError):
    """The output location cannot be used as asked (exists, not a run, ...)."""


class RecordError(InputError):
    """A qanalyze record file (metrics.json, plan.json, ...) is missing or invalid."""


class NonFiniteError(ConfigError):
    """A loss, a Hessian-vector product or a tensor to quantize holds NaN or infinity (bad weights or data;
    in training the trainer turns it into `qanalyze.engine.train.TrainingDiverged`)."""


class Interrupted(QAnalyzeError):
    """The user stopped a command with Ctrl-C; the message says what was kept and how to go on (the CLI
    prints it and exits 130)."""


USER_OS_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.ENOTDIR,
                  errno.EISDIR, errno.ENAMETOOLONG}
"""Errors of the file system the user can act on (the CLI exits 2): permissions, a full or read-only disk, a
file size limit, a file where a folder is needed (and the reverse), a name too long."""


def file_system_problem(exc: BaseException) -> str | None:
    """The one line for a file-system error the user can act on, else None. Writers in Rust (safetensors)
    report the OS error only inside their message: "I/O error: File too large (os error 27)"."""
    if isinstance(exc, OSError):
        number, reason, where = exc.errno, exc.strerror or str(exc), f" {exc.filename}" if exc.filename else ""
    else:
        found = re.search(r"I/O error: (.*?) \(os error (\d+)\)", str(exc))
        if found is None:
            return None
        number, reason, where = int(found.group(2)), found.group(1), ""
    if number not in USER_OS_ERRORS:
        return None
    return f"cannot write or read{where}: {reason}"
