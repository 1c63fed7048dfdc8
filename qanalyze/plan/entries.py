"""The entries of plan.json's ``modules`` as typed records: `QuantizedEntry` and `FloatEntry`.

On disk an entry is ``{"float": true}`` or a mapping with ``weight_bits`` and ``group`` and optional
keys (DESIGN.md, "Data contracts"). `entry_from_dict` is the one reader: the defaults of absent
optional keys are written here and nowhere else, and `to_dict` writes back exactly the keys the
entry was read with, in the order qanalyze writes them, so a plan round-trips byte for byte.

This module imports nothing heavier than the quantizers' constants: the engine, the sweep and the
report read plans through it without importing the planner.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from qanalyze.errors import ConfigError, RecordError
from qanalyze.quant.columns import parse_column_group
from qanalyze.quant.ggml import get_ggml_type, is_ggml_layout
from qanalyze.quant.primitives import WEIGHT_RANGES

BITS_LIMITS = (2, 16)
"""Inclusive range of every bit width a plan entry may give."""

BITS_KEYS = ("weight_bits", "activation_bits", "gradient_bits")
"""The bit-width keys of a quantized entry, checked in this order."""

REQUIRED_KEYS = ("weight_bits", "group")
"""Keys every quantized entry holds."""


def _check_bits(name: str, key: str, bits: object) -> None:
    low, high = BITS_LIMITS
    # bool is an int to Python, but "weight_bits": true is not a bit width
    if bits is not None and not (isinstance(bits, int) and not isinstance(bits, bool) and low <= bits <= high):
        raise RecordError(f"plan: module {name} has {key} {bits!r}; bits must be integers in {low}..{high}")


@dataclass(frozen=True)
class QuantizedEntry:
    """A module the plan quantizes: its weight bits and scale layout, and the bits of its input and output gradient.

    Optional keys absent from a file read as the defaults below and are listed in ``omitted``, so that
    `to_dict` leaves them out again. An entry made in code writes every key unless ``omitted`` names it.
    The scale layouts (``activation_group``, ``gradient_group``) are checked by the engine against what a
    mode runs, not here: a plan is valid data whatever mode later runs it.
    """

    name: str
    """The module's fully qualified name (the entry's key in ``modules``; not written inside the entry)."""
    weight_bits: int
    """Bits of the weight codes, 2..16."""
    group: str
    """Weight scale layout: ``tensor``, ``channel``, ``head`` or a number of rows per group (``"128"``)."""
    groups: int | None = None
    """Number of weight scales; None when the file does not say (older files)."""
    activation_bits: int | None = None
    """Bits of the module's input; None when the plan leaves it unplanned (the engine then picks its default)."""
    gradient_bits: int | None = None
    """Bits of the output gradient; None when unplanned, as for ``activation_bits``."""
    scheme: str = "symmetric"
    """Quantizer scheme of the weights: ``symmetric`` or ``asymmetric``."""
    rounding: str = "nearest"
    """Rounding of the weights: ``nearest`` (gradients always round stochastically)."""
    weight_range: str = "max"
    """How the weight scale is set, one of `WEIGHT_RANGES`: the range rule the weight errors were measured with."""
    predicted_damage: float | None = None
    """The loss change the plan's objective predicts for this choice; None for plans made without one."""
    activation_group: str = "tensor"
    """Scales of the input of a linear layer: ``tensor`` (one) or ``token`` (one per token)."""
    gradient_group: str = "tensor"
    """Scales of the output gradient of a linear layer: ``tensor`` (one) or ``row``."""
    column_group: str | None = None
    """Column groups of the weight for post-training quantization (``rtn``, ``gptq``): ``g32``, ``g64``,
    ``g128`` (consecutive input columns per scale) or ``row`` (one scale per row); None when the plan has no
    column layout (the row groups of ``group`` then apply)."""
    omitted: frozenset[str] = field(default=frozenset(), repr=False)
    """Optional keys the entry does not write (absent from the file it was read from)."""

    quantized: ClassVar[bool] = True
    OPTIONAL_KEYS: ClassVar[tuple[str, ...]] = (
        "groups", "activation_bits", "gradient_bits", "scheme", "rounding", "weight_range", "predicted_damage",
        "activation_group", "gradient_group", "column_group",
    )
    """Keys an entry may leave out, in the order they are written (the order of the fields)."""

    def __post_init__(self) -> None:
        for key in BITS_KEYS:
            _check_bits(self.name, key, getattr(self, key))
        if self.weight_bits is None or self.group is None:
            raise RecordError(f"plan: module {self.name} has no weight_bits/group and is not float")
        if self.weight_range not in WEIGHT_RANGES:
            raise RecordError(f"plan: module {self.name} has weight_range {self.weight_range!r}; known: "
                              f"{', '.join(WEIGHT_RANGES)}")
        if self.column_group is not None:
            try:
                if not is_ggml_layout(self.column_group):
                    parse_column_group(self.column_group)
                elif get_ggml_type(self.column_group).bits != self.weight_bits:
                    raise ConfigError(f"{self.column_group} stores {get_ggml_type(self.column_group).bits}-bit codes, "
                                      f"not weight_bits {self.weight_bits}")
            except ConfigError as error:
                raise RecordError(f"plan: module {self.name}: {error}") from None
        unknown = set(self.omitted) - set(self.OPTIONAL_KEYS)
        if unknown:
            raise RecordError(f"plan: module {self.name} omits {', '.join(sorted(unknown))}, which are not optional")
        # a set given as a list or tuple still compares and hashes as one
        object.__setattr__(self, "omitted", frozenset(self.omitted))

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> QuantizedEntry:
        """Read a quantized entry; unknown keys are ignored so that newer files with more keys load."""
        # same order of checks as the entry's own, so a file with several faults names the same one first
        for key in BITS_KEYS:
            _check_bits(name, key, data.get(key))
        if data.get("weight_bits") is None or "group" not in data:
            raise RecordError(f"plan: module {name} has no weight_bits/group and is not float")
        given = {key: data[key] for key in cls.OPTIONAL_KEYS if key in data}
        omitted = frozenset(key for key in cls.OPTIONAL_KEYS if key not in data)
        return cls(name=name, weight_bits=data["weight_bits"], group=data["group"], **given, omitted=omitted)

    def to_dict(self) -> dict[str, Any]:
        """The entry as plan.json holds it: the required keys, then every optional key not omitted."""
        keys = (*REQUIRED_KEYS, *(key for key in self.OPTIONAL_KEYS if key not in self.omitted))
        # column_group is new in v2: a plan without a column layout does not write it, so v1 files stay v1
        return {key: getattr(self, key) for key in keys if key != "column_group" or self.column_group is not None}


@dataclass(frozen=True)
class FloatEntry:
    """A module kept in floating point: ``{"float": true}`` in plan.json, and what a plan says of a module it
    does not list."""

    name: str
    """The module's fully qualified name."""

    quantized: ClassVar[bool] = False

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> FloatEntry:
        """Read a float entry (any mapping whose ``float`` is true)."""
        if not data.get("float"):
            raise RecordError(f"plan: module {name} is not marked float")
        return cls(name=name)

    def to_dict(self) -> dict[str, Any]:
        """``{"float": True}``."""
        return {"float": True}


PlanEntry = QuantizedEntry | FloatEntry
"""One entry of a plan's ``modules``."""


def entry_from_dict(name: str, data: Mapping[str, Any]) -> PlanEntry:
    """Read one entry of plan.json's ``modules``: `FloatEntry` when ``float`` is true, else `QuantizedEntry`."""
    if not isinstance(data, Mapping):
        raise RecordError(f"plan: module {name} has entry {data!r}, not a mapping")
    if data.get("float"):
        return FloatEntry.from_dict(name, data)
    return QuantizedEntry.from_dict(name, data)

