"""Column layouts in llama.cpp's weight types: which GGML type stores a plan's column entry (bits, group size,
scheme) for a target whose layouts are GGML type names (``gguf``), exactly or with ``--snap up``.

Exactly: 4- and 5-bit symmetric groups of 32 are Q4_0 and Q5_0 (a float16 scale per 32 signed codes), the
asymmetric ones Q4_1 and Q5_1 (a float16 scale and minimum per 32 unsigned codes: the same bits and groups, a
float minimum for the integer zero point), 8-bit symmetric groups of 32 Q8_0. A run's codes are fixed, so only the
types doing identical arithmetic take them (`SAME_CODES`: ``q * s`` with the run's float16 ``s``); a column
zero point is no Q4_1 minimum.

``--snap up`` picks the cheapest type (bytes per weight) that is at least as precise and fits the module: no
fewer bits, blocks no wider than the groups (``row`` is the widest), a minimum for an asymmetric layout unless
the type has more bits, and rows that are whole blocks of it (the k-quants need a multiple of 256 columns, so
SmolLM2's 576-column rows take only the legacy types).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from qanalyze.quant.ggml_names import is_ggml_layout

if TYPE_CHECKING:
    from qanalyze.export.layouts import ModuleLayout
    from qanalyze.quant.ggml import GGMLType
    from qanalyze.quant.targets import Target

EXACT: dict[tuple[int, bool], str] = {(4, True): "Q4_0", (5, True): "Q5_0", (8, True): "Q8_0",
                                      (4, False): "Q4_1", (5, False): "Q5_1"}
"""The GGML type of a column layout in groups of 32, by (bits, symmetric)."""

EXACT_GROUP = 32

SAME_CODES = frozenset({"Q4_0", "Q5_0", "Q8_0"})
"""The types whose blocks hold a run's symmetric column codes as they are (``d * q`` with ``d`` its scale)."""


def is_ggml_target(target: Target) -> bool:
    """Whether ``target`` lists GGML type names as its layouts (``gguf``)."""
    return bool(target.formats) and all(is_ggml_layout(layout) for _, layout in target.formats or ())


def as_ggml(layout: ModuleLayout, kind: GGMLType) -> ModuleLayout:
    """``layout`` stored in type ``kind`` (its bits, block and scheme)."""
    return replace(layout, bits=kind.bits, group_size=kind.block, symmetric=not kind.minimum, ggml=kind.name)


def exact_ggml(layout: ModuleLayout, target: Target, *, fixed_codes: bool) -> ModuleLayout | None:
    """The type storing ``layout`` exactly (`EXACT`; for ``fixed_codes``, a run's, only `SAME_CODES`), if
    ``target`` lists it and the module's rows are whole blocks of it; else None."""
    if layout.ggml is not None:
        return layout
    name = EXACT.get((layout.bits, layout.symmetric)) if layout.group_size == EXACT_GROUP else None
    if name is None or (fixed_codes and name not in SAME_CODES):
        return None
    from qanalyze.quant.ggml import GGML_TYPES  # torch: the export registry is read by --help

    kind = GGML_TYPES[name]
    return as_ggml(layout, kind) if target.allows(kind.bits, name) and kind.fits(layout.shape[1]) else None


def at_least_as_precise(kind: GGMLType, layout: ModuleLayout) -> bool:
    """Whether ``kind`` has no fewer bits than ``layout``, blocks no wider than its groups, and a minimum when
    ``layout`` is asymmetric unless ``kind`` has more bits."""
    wanted = float("inf") if layout.group_size is None else layout.group_size
    return (kind.bits >= layout.bits and kind.block <= wanted
            and (layout.symmetric or kind.minimum or kind.bits > layout.bits))


def snap_ggml(layout: ModuleLayout, target: Target) -> ModuleLayout | None:
    """The cheapest type ``target`` lists that is at least as precise as ``layout`` and fits its rows; None when
    there is none."""
    from qanalyze.quant.ggml import GGML_TYPES

    fitting = [GGML_TYPES[name] for bits, name in sorted(target.formats or ())
               if at_least_as_precise(GGML_TYPES[name], layout) and GGML_TYPES[name].fits(layout.shape[1])]
    return as_ggml(layout, min(fitting, key=lambda kind: (kind.bits_per_weight, kind.name))) if fitting else None
