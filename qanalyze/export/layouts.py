"""Which plan entries a format expresses exactly, and ``--snap up``: the one place an exporter asks
`qanalyze.quant.targets.TARGETS` (the table the planner's ``--target`` uses) about bits and column layouts.

A `ModuleLayout` is one quantized linear module as an exporter sees it: its weight bits, column group size
(None: one group per row), scheme and weight shape. Its layout name is the table's: ``g128`` for groups of
128, and ``g128p`` only where 128 does not divide the module's input width (a ``g128p`` plan entry on a
module of 1536 columns is plain ``g128``: every group is full).

`express` checks every module against a target. An entry the target lists is kept as it is; otherwise,
with ``snap="up"``, it moves to the cheapest (fewest stored bits) layout the target lists that is at least
as precise: no fewer bits and groups no wider (``row`` is the widest), that fits the module's width;
otherwise the first such module is refused by name with the format's limit. For a target of llama.cpp types
(``gguf``) a column entry is stored in a GGML type instead (`qanalyze.export.ggml_layouts`: `ModuleLayout.ggml`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from qanalyze.errors import ConfigError
from qanalyze.export.ggml_layouts import exact_ggml, is_ggml_target, snap_ggml
from qanalyze.quant.columns import ColumnSpec, column_group_name, parse_column_layout, storage_bits
from qanalyze.quant.targets import Target, get_target

SNAP_CHOICES = ("none", "up")
"""``--snap`` values: ``none`` refuses an entry the format cannot express, ``up`` moves it (see `express`)."""


@dataclass(frozen=True)
class ModuleLayout:
    """One quantized linear module as a format stores it: ``bits``, ``group_size`` input columns per scale
    (None: per row), ``symmetric`` (no zero points) and the weight's ``(out, in)`` ``shape``; ``ggml``: the
    llama.cpp type storing it (its bits, block and scheme), None for a column group."""

    name: str
    bits: int
    group_size: int | None
    symmetric: bool
    shape: tuple[int, int]
    ggml: str | None = None

    @property
    def partial(self) -> bool:
        """Whether the last group of a row is shorter (the group size does not divide the input width)."""
        return self.group_size is not None and self.shape[1] % self.group_size != 0

    @property
    def layout(self) -> str:
        """The column layout's name in `TARGETS`: ``g64``, ``row``, ``g128p`` (only when really partial), or the
        GGML type's name (``Q4_K``)."""
        if self.ggml is not None:
            return self.ggml
        return column_group_name(self.group_size, self.partial)

    @property
    def spec(self) -> ColumnSpec:
        """The column quantizer of this layout (float16 scales)."""
        return ColumnSpec(self.bits, self.group_size, symmetric=self.symmetric, partial_last=self.partial)

    @property
    def storage_bits(self) -> int:
        """Bits of codes, float16 scales and zero points (`qanalyze.quant.columns.storage_bits`), or the GGML
        type's exact bytes."""
        if self.ggml is not None:
            from qanalyze.quant.ggml import get_ggml_type  # torch: the export registry is read by --help

            return get_ggml_type(self.ggml).storage_bits(*self.shape)
        return storage_bits(*self.shape, self.spec)

    def describe(self) -> str:
        """``3-bit g128p asym`` (``Q4_K``): what the layout is, for messages and records."""
        if self.ggml is not None:
            return self.ggml
        return f"{self.bits}-bit {self.layout} {'sym' if self.symmetric else 'asym'}"


@dataclass(frozen=True)
class Snapped:
    """A module ``--snap up`` moved: its planned layout and the one the format stores."""

    name: str
    planned: str
    stored: str

    def to_dict(self) -> dict[str, str]:
        """``{"module", "planned", "stored"}`` for export.json."""
        return {"module": self.name, "planned": self.planned, "stored": self.stored}


@dataclass(frozen=True)
class Expressed:
    """What a format stores for every quantized module (`layouts`), and which of them were snapped."""

    layouts: dict[str, ModuleLayout]
    snapped: tuple[Snapped, ...]

    @property
    def exact(self) -> int:
        """How many modules the format stores exactly as planned."""
        return len(self.layouts) - len(self.snapped)


def layout_from_entry(name: str, bits: int, column_group: str | None, group: str, scheme: str,
                      shape: tuple[int, int]) -> ModuleLayout:
    """The layout of a plan entry: its ``column_group`` (``g64``, ``g128p``, ``row``), or one group per row
    for an entry without one whose row ``group`` is ``channel`` (as `plan_specs` of the PTQ methods reads
    it); ConfigError naming the module for row groups no column format holds."""
    if column_group is not None:
        size, _ = parse_column_layout(column_group)
    elif group == "channel":
        size = None
    else:
        raise ConfigError(f"{name}: row groups {group!r} are not a column layout, which every export format "
                          "stores (plan with --group-sizes g32,g64,g128,row or uniform:N:gG)")
    return ModuleLayout(name, bits, size, scheme == "symmetric", shape)


def _group_order(layout: str) -> float:
    size, _ = parse_column_layout(layout)
    return float("inf") if size is None else size


def _candidates(target: Target) -> list[tuple[int, str]]:
    return [] if target.formats is None else sorted(target.formats)


def _limit(target: Target) -> str:
    pairs = _candidates(target)
    return ", ".join(f"{bits}-bit {layout}" for bits, layout in pairs) if pairs else "any layout"


def snap_up(layout: ModuleLayout, target: Target) -> ModuleLayout | None:
    """The cheapest layout ``target`` lists with at least ``layout``'s bits and groups no wider, that fits
    the module's width (a group size dividing it); None when there is none."""
    best: ModuleLayout | None = None
    wanted = float("inf") if layout.group_size is None else layout.group_size
    for bits, name in _candidates(target):
        size, partial = parse_column_layout(name)
        if bits < layout.bits or _group_order(name) > wanted:
            continue
        if size is not None and layout.shape[1] % size and not partial:
            continue
        option = replace(layout, bits=bits, group_size=size)
        if target.allows(option.bits, option.layout) and (best is None or option.storage_bits < best.storage_bits):
            best = option
    return best


def express(layouts: Iterable[ModuleLayout], target_name: str, format_name: str, *, snap: str = "none",
            can_snap: bool = True) -> Expressed:
    """Check every layout against target ``target_name`` (format ``format_name`` in messages). ``snap="up"``
    moves an inexpressible one (`snap_up`); ``can_snap=False`` (a quantized run: its codes are fixed) refuses
    it even then. ConfigError naming the first module that stays inexpressible and the format's limit."""
    if snap not in SNAP_CHOICES:
        raise ConfigError(f"unknown --snap {snap!r}; known: {', '.join(SNAP_CHOICES)}")
    target = get_target(target_name)
    ggml = is_ggml_target(target)
    kept: dict[str, ModuleLayout] = {}
    snapped: list[Snapped] = []
    for layout in layouts:
        exact = exact_ggml(layout, target, fixed_codes=not can_snap) if ggml else \
            layout if target.allows(layout.bits, layout.layout) else None
        if exact is not None:
            kept[layout.name] = exact
            continue
        moved = (snap_ggml if ggml else snap_up)(layout, target) if snap == "up" and can_snap else None
        if moved is None:
            why = ("its codes are fixed, so --snap cannot move it; quantize with a plan made with --target "
                   f"{target_name}" if not can_snap else
                   "no layout at least as precise fits" if snap == "up" else "pass --snap up to move it")
            raise ConfigError(f"{format_name} cannot store {layout.name} at {layout.describe()} "
                              f"({layout.shape[1]} input columns); it stores {_limit(target)}; {why}")
        kept[layout.name] = moved
        snapped.append(Snapped(layout.name, layout.describe(), moved.describe()))
    return Expressed(kept, tuple(snapped))


def group_by_layout(layouts: Mapping[str, ModuleLayout]) -> dict[tuple[int, int | None, bool], list[str]]:
    """Module names by (bits, group size, symmetric), in first-seen order: one config group (or dynamic rule)
    each."""
    groups: dict[tuple[int, int | None, bool], list[str]] = {}
    for name, layout in layouts.items():
        groups.setdefault((layout.bits, layout.group_size, layout.symmetric), []).append(name)
    return groups
