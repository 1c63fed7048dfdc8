"""Text forms of settings shared by the command line and method configs."""

from __future__ import annotations

from qanalyze.errors import ConfigError


def int_list(text: str) -> tuple[int, ...]:
    """``2-16`` or ``2,3,4,8`` -> a tuple of ints; ConfigError for anything else."""
    values: list[int] = []
    try:
        for part in text.split(","):
            low, _, high = part.strip().partition("-")
            values.extend(range(int(low), int(high) + 1) if high else [int(low)])
    except ValueError:
        raise ConfigError(f"{text!r} is not a list of integers like 2-16 or 2,4,8") from None
    return tuple(values)


def name_list(text: str) -> tuple[str, ...]:
    """``a, b,c`` -> ("a", "b", "c"): comma-separated names, blanks dropped."""
    return tuple(part.strip() for part in text.split(",") if part.strip())
