"""Budgets as the user types them (``4bit``, ``3.5bit``, ``12MB``, ``12MiB``, ``0.5GB``, ``8x``) -> `Budget`.

A budget is one number of one kind:

- ``bits``: the parameter-weighted mean of weight bits over the planned modules, with every scale
  beyond the first of each weight tensor counted (``4bit``: at most 4 bits per weight, plus one
  free fp16 scale per tensor; finer groups pay for their extra scales out of the 4 bits);
- ``bytes``: the storage of the quantized weights and all their scales (``12MB`` is 12 * 10**6
  bytes, ``12MiB`` is 12 * 2**20: the decimal and binary prefixes are both in use and differ by 5 %);
- ``ratio``: compression against FP32, every scale counted (``8x``: at most 32 / 8 = 4 bits per
  weight on average, scales included).

Why a bits budget lets one scale per tensor go free: counting every scale would make the budgets
people type mean something else. ``16bit`` could then never give every module 16 bits (a
per-tensor 16-bit weight costs ``16 * n + 16`` bits), ``2bit`` would be unreachable, and the
uniform plan at ``4bit`` would drop to 3 bits. One scale per tensor is a rounding error next to
the weights (0.0001 bits per weight on a 384 x 384 projection), while finer groups (per channel,
per 32 rows) add enough to matter, so those are what a bits budget still charges. Byte and ratio
budgets are about the real storage, so they keep counting every byte.

`Budget.capacity_bits` turns any of them into the one thing a solver needs: the total number of
storage bits (every scale included) that the planned weights may take.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qanalyze.errors import ConfigError

ACCEPTED_FORMS = "4bit, 3.5bit, 12MB, 12MiB, 0.5GB, 8x"
"""Examples of every accepted budget form, quoted by every parsing error."""

FLOAT_BITS = 32
"""Bits of one FP32 weight: the reference of a compression ratio and the ceiling of a bits budget."""

SCALE_BITS = 16
"""Storage of one group's scale (fp16); symmetric weights need no zero point. Asymmetric column layouts
(`qanalyze.quant.columns.storage_bits`) also store a ``bits``-bit zero point per group: part of a candidate's
cost, so every budget counts them (a bits budget frees a tensor's first scale, never a zero point)."""

BITS_RANGE = (2.0, 16.0)
"""Inclusive range of an activation or gradient bits budget (the quantizers' 2..16 bits)."""


class BudgetError(ConfigError):
    """A budget string that cannot be read or whose value is out of range."""


# unit (lower case) -> (kind, multiplier from the typed number to the budget's value)
_UNITS: dict[str, tuple[str, float]] = {
    "bit": ("bits", 1.0),
    "bits": ("bits", 1.0),
    "kb": ("bytes", 1e3),
    "kib": ("bytes", 2.0**10),
    "mb": ("bytes", 1e6),
    "mib": ("bytes", 2.0**20),
    "gb": ("bytes", 1e9),
    "gib": ("bytes", 2.0**30),
    "x": ("ratio", 1.0),
}

# kind -> capacity in bits for `params` planned weights in `tensors` weight tensors
_CAPACITY: dict[str, Callable[[float, int, int], float]] = {
    # the first scale of every tensor is free (see the module docstring)
    "bits": lambda value, params, tensors: value * params + SCALE_BITS * tensors,
    "bytes": lambda value, params, tensors: value * 8,
    "ratio": lambda value, params, tensors: FLOAT_BITS * params / value,
}

# kind -> (lowest allowed value, highest allowed value or None, why), bounds inclusive except a 0 floor
_LIMITS: dict[str, tuple[float, float | None, str]] = {
    "bits": (0.0, float(FLOAT_BITS), f"a bits budget must be above 0 and at most {FLOAT_BITS} (FP32)"),
    "bytes": (0.0, None, "a storage budget must be above 0 bytes"),
    # below 1x the "compressed" model would be larger than FP32, which no plan can use
    "ratio": (1.0, None, "a compression ratio must be at least 1x (FP32 itself)"),
}

_NUMBER = r"(?P<number>\d+(?:\.\d*)?|\.\d+)"
_BUDGET = re.compile(rf"^\s*{_NUMBER}\s*(?P<unit>[a-z]+)\s*$", re.IGNORECASE)
_BITS = re.compile(rf"^\s*{_NUMBER}\s*(?:bits?)?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Budget:
    """A parsed weight budget: ``text`` as typed, ``kind`` ("bits" | "bytes" | "ratio") and ``value``.

    ``value`` is bits per weight for "bits", bytes for "bytes", the compression factor for "ratio".
    """

    text: str
    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in _CAPACITY:
            raise BudgetError(f"budget kind {self.kind!r} is not one of {', '.join(_CAPACITY)}")
        _check_value(self.text, self.kind, self.value)

    def capacity_bits(self, params: int, *, tensors: int) -> float:
        """Total storage, in bits and every scale included, that ``params`` planned weights forming
        ``tensors`` weight tensors may take. Only a bits budget depends on ``tensors``: it adds
        `SCALE_BITS` per tensor, the free first scale."""
        for what, number in (("weights", params), ("weight tensors", tensors)):
            if isinstance(number, bool) or not isinstance(number, int) or number < 0:
                raise ConfigError(f"the number of planned {what} must be a non-negative integer, not {number!r}")
        return _CAPACITY[self.kind](self.value, params, tensors)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: ``{"text", "kind", "value"}`` (plan.json's ``budget``)."""
        return {"text": self.text, "kind": self.kind, "value": self.value}


def _check_value(text: str, kind: str, value: float) -> None:
    low, high, why = _LIMITS[kind]
    too_low = value <= 0 or value < low
    if not math.isfinite(value) or too_low or (high is not None and value > high):
        raise BudgetError(f"budget {text!r}: {why} (accepted forms: {ACCEPTED_FORMS})")


def _not_understood(text: object) -> BudgetError:
    return BudgetError(f"budget {text!r} is not understood; accepted forms: {ACCEPTED_FORMS} "
                       "(also KB/KiB/GiB, case-insensitive, spaces allowed)")


def parse_budget(text: str) -> Budget:
    """Parse a weight budget: ``4bit``, ``4 bits``, ``3.5bit``, ``12MB`` (10**6 bytes), ``12MiB`` (2**20),
    ``0.5GB``, ``1GiB``, ``8x``; case-insensitive, spaces allowed. Anything else raises `BudgetError`."""
    if not isinstance(text, str):
        raise _not_understood(text)
    match = _BUDGET.match(text)
    if match is None or match["unit"].lower() not in _UNITS:
        raise _not_understood(text)
    kind, multiplier = _UNITS[match["unit"].lower()]
    value = float(match["number"]) * multiplier
    _check_value(text, kind, value)
    return Budget(text=text, kind=kind, value=value)


def parse_bits(text: str) -> float:
    """Parse an activation or gradient bits budget (``--act-budget``, ``--grad-budget``): ``8bit``,
    ``8 bits`` or ``8`` -> 8.0, from 2 to 16 inclusive; anything else raises `BudgetError`."""
    if not isinstance(text, str) or (match := _BITS.match(text)) is None:
        raise BudgetError(f"bits budget {text!r} is not understood; accepted forms: 8bit, 8 bits, 8, 6.5bit")
    value = float(match["number"])
    low, high = BITS_RANGE
    if not low <= value <= high:
        raise BudgetError(f"bits budget {text!r} must be from {low:g} to {high:g} bits")
    return value


_BOPS = re.compile(r"^\s*(?P<number>\d+(?:\.\d*)?(?:e\d+)?|\.\d+)\s*(?P<unit>[kmgt]?)\s*(?:bops)?\s*$", re.IGNORECASE)
_BOPS_UNITS = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


def parse_bops(text: str) -> float:
    """A bit-operations budget: ``2e12``, ``500G``, ``1.5T`` (k, M, G, T are powers of 1000)."""
    match = _BOPS.match(str(text))
    value = float(match["number"]) * _BOPS_UNITS[match["unit"].lower()] if match else 0.0
    if not value > 0:
        raise BudgetError(f"cannot read BOPs budget {text!r}; write a positive number such as 2e12, 500G or 1.5T")
    return value
