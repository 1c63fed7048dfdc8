"""Names of weight group layouts: row groups (`qanalyze.quant.primitives`) and column groups
(`qanalyze.quant.columns`) side by side, as the analysis and the planner offer them.

Row layouts (``tensor``, ``channel``, ``head``, ``"128"`` = rows per scale) are symmetric with one scale per
group of output rows (Q-BERT). Column layouts (``g32``, ``g64``, ``g128``, ``row``) split each output row into
groups of G consecutive input columns, each with a float16 scale and an integer zero point (asymmetric), the
layout of GPTQ, GGUF and torchao; ``row`` is one scale and zero point per whole row. The names never collide:
a column layout is ``row`` or ``g<G>``, a row layout is a name of `GROUP_NAMES` or a bare number.

Column candidates are what `quantize_columns` gives with ``ColumnSpec(bits, G, symmetric=False)`` and its
defaults (scales rounded up to float16, no shorter last group): a G that does not divide the input width, or
bits outside `COLUMN_BITS`, is no candidate. Only modules of `COLUMN_KINDS` stored as ``(out, in)`` take them:
an embedding table is looked up by row, and the post-training methods (`qanalyze.ptq`) quantize linear layers.
"""

from __future__ import annotations

from qanalyze.errors import ConfigError
from qanalyze.quant.columns import COLUMN_BITS, ColumnSpec, column_group_name, parse_column_layout
from qanalyze.quant.primitives import GROUP_NAMES, parse_group

COLUMN_LAYOUTS = ("g32", "g64", "g128", "row")
"""The column layouts LLM formats use, finest first."""

COLUMN_KINDS = ("linear",)
"""Module kinds that take column layouts (when their weight is stored ``(out, in)``)."""


def is_column_layout(group: object) -> bool:
    """Whether ``group`` names a column layout (``row``, ``g128``), not a row layout (``channel``, ``128``)."""
    return group == "row" or (isinstance(group, str) and group.startswith("g"))


def parse_layout(group: str | int) -> str:
    """A layout's canonical name: a column layout as `column_group_name` writes it (``"g0128"`` -> ``"g128"``),
    anything else as `parse_group` does. ConfigError naming both families for anything else."""
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
                      f"column layout ({', '.join(COLUMN_LAYOUTS)}), not {group!r}")


def column_spec(bits: int, group: str) -> ColumnSpec:
    """The quantizer of column candidate (``bits``, ``group``): asymmetric, float16 scales, full groups only."""
    size, partial = parse_column_layout(group)
    return ColumnSpec(bits, size, symmetric=False, partial_last=partial)


def takes_columns(kind: str | None, transposed: bool = False) -> bool:
    """Whether a module of ``kind`` (stored transposed, as GPT-2's Conv1D, or not) takes column layouts."""
    return kind in COLUMN_KINDS and not transposed


def column_fits(bits: int, group: str, in_features: int) -> bool:
    """Whether column candidate (``bits``, ``group``) applies to a weight of ``in_features`` input columns: bits
    in `COLUMN_BITS` and G dividing the width (``row`` always does)."""
    size, partial = parse_column_layout(group)
    return bits in COLUMN_BITS and (size is None or partial or in_features % size == 0)


def column_groups_per_row(group: str, in_features: int) -> int:
    """Scales (and zero points) per output row of column layout ``group`` on ``in_features`` columns."""
    size, _ = parse_column_layout(group)
    return 1 if size is None else -(-in_features // size)
