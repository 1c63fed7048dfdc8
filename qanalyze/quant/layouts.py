"""Names of weight group layouts: row groups (`qanalyze.quant.primitives`) and column groups
(`qanalyze.quant.columns`) side by side, as the analysis and the planner offer them.

Row layouts (``tensor``, ``channel``, ``head``, ``"128"`` = rows per scale) are symmetric with one scale per
group of output rows (Q-BERT). Column layouts (``g32``, ``g64``, ``g128``, ``row``) split each output row into
groups of G consecutive input columns, each with a float16 scale and an integer zero point (asymmetric), the
layout of GPTQ, GGUF and torchao; ``row`` is one scale and zero point per whole row. The names never collide:
a column layout is ``row`` or ``g<G>``, a row layout is a name of `GROUP_NAMES` or a bare number.

GGML layouts (``Q4_K``, ``Q3_K``, ``Q4_0``... `qanalyze.quant.ggml`) are llama.cpp's weight types: column layouts
too (blocks of consecutive input columns per scale, linear layers only), but each fixes its bits, scale format and
storage, so (bits, layout) is a candidate only at the type's own bits, and only where the type's block (32, or 256
for a k-quant) divides the width. `quantize_layout` and `column_storage_bits` quantize and cost either family.

Column candidates are what `quantize_columns` gives with ``ColumnSpec(bits, G, symmetric=False)`` and its
defaults (scales rounded up to float16, no shorter last group): a G that does not divide the input width, or
bits outside `COLUMN_BITS`, is no candidate. Only modules of `COLUMN_KINDS` stored as ``(out, in)`` take them:
an embedding table is looked up by row, and the post-training methods (`qanalyze.ptq`) quantize linear layers.
"""

from __future__ import annotations

import torch

from qanalyze.errors import ConfigError
from qanalyze.quant.columns import (
    COLUMN_BITS,
    ColumnQuantized,
    ColumnSpec,
    column_group_name,
    parse_column_layout,
    quantize_columns,
    storage_bits,
)
from qanalyze.quant.ggml import GGML_TYPES, GGMLQuantized, get_ggml_type, is_ggml_layout, quantize_ggml
from qanalyze.quant.primitives import GROUP_NAMES, parse_group

COLUMN_LAYOUTS = ("g32", "g64", "g128", "row")
"""The column layouts LLM formats use, finest first."""

COLUMN_KINDS = ("linear",)
"""Module kinds that take column layouts (when their weight is stored ``(out, in)``)."""


def is_column_layout(group: object) -> bool:
    """Whether ``group`` names a column layout (``row``, ``g128``, a GGML type such as ``Q4_K``), not a row
    layout (``channel``, ``128``)."""
    return group == "row" or (isinstance(group, str) and group.startswith("g")) or is_ggml_layout(group)


def parse_layout(group: str | int) -> str:
    """A layout's canonical name: a column layout as `column_group_name` writes it (``"g0128"`` -> ``"g128"``),
    anything else as `parse_group` does. ConfigError naming both families for anything else."""
    if is_ggml_layout(group):
        return get_ggml_type(str(group)).name
    if is_column_layout(group):
        try:
            return column_group_name(*parse_column_layout(group))
        except ConfigError:
            pass
    else:
        try:
            return parse_group(group)
        except ConfigError:
            pass
    raise ConfigError(f"group must be a row layout ({', '.join(GROUP_NAMES)} or a number of rows per scale) or a "
                      f"column layout ({', '.join(COLUMN_LAYOUTS)}, or a GGML type: {', '.join(GGML_TYPES)}), "
                      f"not {group!r}")


def column_spec(bits: int, group: str) -> ColumnSpec:
    """The quantizer of column candidate (``bits``, ``group``): asymmetric, float16 scales, full groups only.
    ConfigError for a GGML type, which has its own quantizer (`quantize_layout`)."""
    if is_ggml_layout(group):
        raise ConfigError(f"{group} is a GGML type, not a column group of scales and zero points")
    size, partial = parse_column_layout(group)
    return ColumnSpec(bits, size, symmetric=False, partial_last=partial)


def takes_columns(kind: str | None, transposed: bool = False) -> bool:
    """Whether a module of ``kind`` (stored transposed, as GPT-2's Conv1D, or not) takes column layouts."""
    return kind in COLUMN_KINDS and not transposed


def column_fits(bits: int, group: str, in_features: int) -> bool:
    """Whether column candidate (``bits``, ``group``) applies to a weight of ``in_features`` input columns: bits
    in `COLUMN_BITS` and G dividing the width (``row`` always does); a GGML type at its own bits, on a width of
    whole blocks."""
    if is_ggml_layout(group):
        kind = get_ggml_type(group)
        return bits == kind.bits and kind.fits(in_features)
    size, partial = parse_column_layout(group)
    return bits in COLUMN_BITS and (size is None or partial or in_features % size == 0)


def column_groups_per_row(group: str, in_features: int) -> int:
    """Scales (and zero points) per output row of column layout ``group`` on ``in_features`` columns."""
    if is_ggml_layout(group):
        return get_ggml_type(group).groups_per_row(in_features)
    size, _ = parse_column_layout(group)
    return 1 if size is None else -(-in_features // size)


def column_storage_bits(bits: int, group: str, out_features: int, in_features: int) -> int:
    """Exact storage in bits of an ``(out, in)`` weight in column candidate (``bits``, ``group``): a GGML type's
    bytes per block, or `qanalyze.quant.columns.storage_bits` of `column_spec`."""
    if is_ggml_layout(group):
        return get_ggml_type(group).storage_bits(out_features, in_features)
    return storage_bits(out_features, in_features, column_spec(bits, group))


def layout_symmetric(group: str) -> bool:
    """Whether column layout ``group`` stores no zero point or minimum (Q4_0, Q3_K, Q6_K, Q8_0: True)."""
    return is_ggml_layout(group) and not get_ggml_type(group).minimum


def quantize_layout(weight: torch.Tensor, bits: int, group: str, *, partial_last: bool = False,
                    symmetric: bool = False, where: str = "the weight") -> ColumnQuantized | GGMLQuantized:
    """``weight`` ``(out, in)`` round-to-nearest in column layout ``group`` at ``bits``: a GGML type's own
    quantizer (its bits must be ``bits``), else `quantize_columns` (``symmetric``, ``partial_last`` as the plan
    entry says). Both results have ``dequantize()`` and ``storage_bits``."""
    if is_ggml_layout(group):
        kind = get_ggml_type(group)
        if bits != kind.bits:
            raise ConfigError(f"{where}: {kind.name} stores {kind.bits}-bit codes, not {bits}")
        return quantize_ggml(weight, kind, where=where)
    size, partial = parse_column_layout(group)
    spec = ColumnSpec(bits, size, symmetric=symmetric, partial_last=partial or partial_last)
    return quantize_columns(weight, spec, where=where)
