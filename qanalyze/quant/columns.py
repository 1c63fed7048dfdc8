"""Column-group weight quantization: the layout of GPTQ, AWQ, GGUF, torchao and compressed-tensors.

A weight of shape ``(out, in)`` is quantized row by row, each row split into groups of ``group_size``
consecutive input columns (``None``: one group holding the whole row, "per row"). Every group has its own
scale and, when asymmetric, its own integer zero point. This is the transpose of the row groups of
`qanalyze.quant.primitives` (Q-BERT), and it reuses that module's conventions exactly, by viewing the
weight as ``(out * in / G, G)`` and giving each of those rows one scale (``rows_per_group=1``):

- symmetric: ``q = clamp(round(w / s), -qmax, qmax)``, ``s = max|w_g| / qmax`` (``qmax = 2**(bits-1) - 1``,
  the most negative code unused);
- asymmetric: the range ``[min(w_g, 0), max(w_g, 0)]`` on ``[0, 2**bits - 1]``, ``s = (hi - lo) / (2**bits - 1)``,
  ``z = clamp(round(-lo / s), 0, 2**bits - 1)``, ``q = clamp(round(w / s) + z, 0, 2**bits - 1)``;
- rounding to nearest, ties to even (``torch.round``); an all-zero group gets scale 1 (and zero point 0);
- integer codes in the smallest signed dtype of their range (int8 symmetric; int8 asymmetric up to 7 bits,
  int16 at 8); scales float32 (float64 for a float64 weight).

Scales are rounded up to float16 values by default (``scale_format="float16"``, as
`qanalyze.quant.primitives.quantize_symmetric` does for packed checkpoints): the codes and scales here are
then exactly what a checkpoint storing 16-bit scales holds, and `ColumnQuantized.dequantize` is exactly
what its loader computes. Rounding up keeps every ``|w| / s`` within the codes, so nothing extra is clipped.

Storage convention (`storage_bits`): ``bits * n + 16 * scales + bits * zero_points``, where ``n`` is the
number of weights, there is one 16-bit scale per group, and, when asymmetric, one zero point per group
stored in ``bits`` bits (a zero point lies in ``[0, 2**bits - 1]``, as GPTQ's packed ``qzeros`` hold it).

Shapes: ``q`` is ``(out, in)``; ``scale`` and ``zero_point`` are ``(out, groups)`` with
``groups = in / group_size`` (1 per row); group ``j`` of row ``r`` covers columns ``j*G .. (j+1)*G - 1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qanalyze.errors import ConfigError
from qanalyze.quant.primitives import (
    SCALE_FORMATS,
    _format_scale,
    check_bits,
    is_positive_int,
    qmax,
    quantize_asymmetric,
    quantize_symmetric,
)

COLUMN_GROUP_SIZES = (32, 64, 128)
"""The column group sizes LLM formats use; ``None`` (per row) is the fourth layout. Other positive sizes
are accepted (tests, odd formats) as long as they divide the layer's input width."""

COLUMN_BITS = range(2, 9)
"""Bit widths of column-group weight codes, 2 to 8: what packed LLM formats store."""

SCALE_BITS = 16
"""Bits one stored scale costs (float16)."""


def parse_column_group(value: str | int | None) -> int | None:
    """A column-group spec as a size: ``128``, ``"128"``, ``"g128"`` or ``"g128p"`` -> 128; ``None``, ``"row"`` ->
    None (one group per row). ConfigError for anything else (`parse_column_layout` also says whether the
    layout lets the last group be shorter)."""
    return parse_column_layout(value)[0]


def parse_column_layout(value: str | int | None) -> tuple[int | None, bool]:
    """A column layout as (group size, shorter last group allowed): ``"g128"`` -> (128, False); ``"g128p"`` ->
    (128, True), groups of 128 where the last one of a row may be shorter (SmolLM2's 576 columns: four of 128 and
    one of 64, as GPTQ's packed format stores them); ``"row"`` / None -> (None, False)."""
    if value is None or value == "row":
        return None, False
    if isinstance(value, str) and value.startswith("g") and value.endswith("p") and len(value) > 2:
        return _column_size(value[1:-1], value), True
    return _column_size(value[1:] if isinstance(value, str) and value.startswith("g") else value, value), False


def _column_size(text: str | int, value: str | int) -> int:
    if isinstance(text, str) and text.isascii() and text.isdigit() and int(text) > 0:
        return int(text)
    if is_positive_int(text):
        return int(text)
    raise ConfigError(f"column group must be 'row' or a positive number of columns (g32, g64, g128; g128p with a "
                      f"shorter last group), not {value!r}")


def column_group_name(group_size: int | None, partial_last: bool = False) -> str:
    """The canonical name of a column layout: ``"g128"`` (``"g128p"`` with a shorter last group allowed), or
    ``"row"`` for one group per row."""
    return "row" if group_size is None else f"g{group_size}" + ("p" if partial_last else "")


@dataclass(frozen=True)
class ColumnSpec:
    """How one weight is quantized in column groups: ``bits`` (2..8), ``group_size`` consecutive input
    columns per scale (None: one per row), ``symmetric`` or asymmetric (zero points), and the
    ``scale_format`` of the stored scales (``float16``: rounded up to float16, what a checkpoint holds;
    ``exact``: as computed). ``partial_last`` lets the last group of a row be shorter when ``group_size`` does
    not divide the input width (GPTQ's packed format and GPTQModel do this: SmolLM2's 576 columns at g128 are
    four groups of 128 and one of 64); without it such a width is refused."""

    bits: int
    group_size: int | None = 128
    symmetric: bool = True
    scale_format: str = "float16"
    partial_last: bool = False

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.bits not in COLUMN_BITS:
            raise ConfigError(f"column-group weights take {COLUMN_BITS.start} to {COLUMN_BITS.stop - 1} bits, "
                              f"not {self.bits}")
        if self.group_size is not None and not is_positive_int(self.group_size):
            raise ConfigError(f"group_size must be a positive number of columns or None (per row), "
                              f"not {self.group_size!r}")
        if not isinstance(self.symmetric, bool):
            raise ConfigError(f"symmetric must be True or False, not {self.symmetric!r}")
        if self.scale_format not in SCALE_FORMATS:
            raise ConfigError(f"unknown scale_format {self.scale_format!r}; known: {', '.join(SCALE_FORMATS)}")
        if not isinstance(self.partial_last, bool):
            raise ConfigError(f"partial_last must be True or False, not {self.partial_last!r}")

    def width(self, in_features: int, *, where: str = "the weight") -> int:
        """Columns per group for a weight of ``in_features`` columns (the last group may be shorter with
        ``partial_last``); ConfigError naming ``where`` and the group sizes that would fit when ``group_size``
        does not divide it and ``partial_last`` is off."""
        if self.group_size is None:
            return in_features
        if in_features % self.group_size and not self.partial_last:
            fits = [str(g) for g in COLUMN_GROUP_SIZES if in_features % g == 0] + ["row"]
            raise ConfigError(f"group size {self.group_size} does not divide the {in_features} input columns of "
                              f"{where}; group sizes that work: {', '.join(fits)} (or allow a shorter last group: "
                              "--partial-groups)")
        return self.group_size

    def groups(self, in_features: int) -> int:
        """Groups (scales) per row for ``in_features`` columns, a shorter last one included."""
        return -(-in_features // self.width(in_features))

    @property
    def name(self) -> str:
        """Short label, e.g. ``"4bit-g128-asym"``."""
        return f"{self.bits}bit-{column_group_name(self.group_size)}-{'sym' if self.symmetric else 'asym'}"


def storage_bits(out_features: int, in_features: int, spec: ColumnSpec) -> int:
    """Exact storage of a column-quantized ``(out, in)`` weight in bits: ``bits * n + 16 * scales``, plus
    ``bits * zero_points`` when asymmetric (one scale and one zero point per group; see the module docstring)."""
    groups = out_features * spec.groups(in_features)
    cost = spec.bits * out_features * in_features + SCALE_BITS * groups
    return cost if spec.symmetric else cost + spec.bits * groups


@dataclass(frozen=True)
class ColumnQuantized:
    """A column-quantized weight: integer codes ``q`` ``(out, in)``, ``scale`` ``(out, groups)`` and, when
    asymmetric, ``zero_point`` ``(out, groups)`` (None when symmetric), with the spec that made them."""

    q: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    spec: ColumnSpec

    def dequantize(self) -> torch.Tensor:
        """``(q - z) * s`` per group, in the scale's dtype, shape ``(out, in)``: what a loader computes."""
        return dequantize_codes(self.q, self.scale, self.zero_point, self.spec.width(self.q.shape[1]))

    @property
    def storage_bits(self) -> int:
        """Exact storage of these codes, scales and zero points (`storage_bits`)."""
        return storage_bits(self.q.shape[0], self.q.shape[1], self.spec)


def expand_groups(per_group: torch.Tensor, width: int, columns: int) -> torch.Tensor:
    """``(out, groups)`` -> ``(out, columns)``: each group's value over its ``width`` columns (the last group
    cut at ``columns``)."""
    return per_group.repeat_interleave(width, dim=1)[:, :columns]


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                     width: int) -> torch.Tensor:
    """``(q - zero_point) * scale`` with ``scale`` / ``zero_point`` of shape ``(out, groups)`` spread over
    ``q``'s ``(out, in)`` columns in consecutive groups of ``width`` (the last one possibly shorter)."""
    columns = q.shape[1]
    values = q.to(scale.dtype)
    if zero_point is not None:
        values = values - expand_groups(zero_point.to(scale.dtype), width, columns)
    return values * expand_groups(scale, width, columns)


def _check_weight(weight: torch.Tensor) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.numel() == 0:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ConfigError(f"column groups quantize a non-empty 2-d weight (out, in), not {shape}")


def group_params(block: torch.Tensor, spec: ColumnSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point of each row of ``block`` ``(out, columns)`` taken as one group: ``(out, 1)``
    tensors (zero point None when symmetric), by `qanalyze.quant.primitives`' quantizers."""
    _check_weight(block)
    if spec.symmetric:
        found = quantize_symmetric(block, spec.bits, rows_per_group=1, scale_format=spec.scale_format)
        return found.scale.reshape(-1, 1), None
    found = quantize_asymmetric(block, spec.bits, rows_per_group=1)
    scale = found.scale.reshape(-1, 1)
    if spec.scale_format == "exact":
        return scale, found.zero_point.reshape(-1, 1)
    # The zero point follows from the stored (rounded-up) scale, exactly as primitives derive it from theirs.
    low = block.to(scale.dtype).amin(dim=1, keepdim=True).clamp(max=0)
    stored = _format_scale(scale, spec.scale_format)
    levels = 2**spec.bits - 1
    zero = torch.round(-low / stored).clamp(0, levels).to(found.zero_point.dtype)
    return stored, zero


def column_codes(values: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                 bits: int) -> torch.Tensor:
    """Integer codes of ``values`` under given scales (and zero points), all broadcast together, as
    float values in the scale's dtype: the primitives' formulas with the scale fixed beforehand."""
    x = values.to(scale.dtype) / scale
    if zero_point is None:
        limit = qmax(bits)
        return torch.round(x).clamp(-limit, limit)
    return (torch.round(x) + zero_point.to(scale.dtype)).clamp(0, 2**bits - 1)


def code_dtype(spec: ColumnSpec) -> torch.dtype:
    """The integer dtype of ``spec``'s codes (and zero points): the smallest that holds their range."""
    high = qmax(spec.bits) if spec.symmetric else 2**spec.bits - 1
    return torch.int8 if high <= 127 else torch.int16


def quantize_columns(weight: torch.Tensor, spec: ColumnSpec, *, where: str = "the weight") -> ColumnQuantized:
    """Round-to-nearest column-group quantization of ``weight`` ``(out, in)`` as ``spec`` says.

    The weight is viewed as ``(out * groups, G)`` and each row of that view quantized as one group by
    `qanalyze.quant.primitives`, so rounding, clamping and dtypes are that module's (a shorter last group,
    with ``partial_last``, is quantized the same way on its own). ConfigError naming ``where`` when the group
    size does not divide the input width and ``partial_last`` is off.
    """
    _check_weight(weight)
    in_features = weight.shape[1]
    width = spec.width(in_features, where=where)
    full = in_features // width * width
    parts = [_quantize_even(weight.detach()[:, :full], spec, width)] if full else []
    if full < in_features:
        parts.append(_quantize_even(weight.detach()[:, full:], spec, in_features - full))
    codes, scales, zeros = (torch.cat([part[k] for part in parts], dim=1) if parts[0][k] is not None else None
                            for k in range(3))
    return ColumnQuantized(q=codes, scale=scales, zero_point=zeros, spec=spec)


def _quantize_even(weight: torch.Tensor, spec: ColumnSpec,
                   width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Codes, scales and zero points of ``weight`` whose columns split evenly into groups of ``width``."""
    out_features, in_features = weight.shape
    groups = in_features // width
    flat = weight.reshape(out_features * groups, width)
    scale, zero = group_params(flat, spec)
    codes = column_codes(flat, scale, zero, spec.bits)
    dtype = code_dtype(spec)
    return (codes.to(dtype).reshape(out_features, in_features), scale.reshape(out_features, groups),
            None if zero is None else zero.to(dtype).reshape(out_features, groups))


def bits_per_weight(out_features: int, in_features: int, spec: ColumnSpec) -> float:
    """`storage_bits` divided by the number of weights (4-bit g128 asymmetric: 4 + 20/128 = 4.156)."""
    return storage_bits(out_features, in_features, spec) / math.prod((out_features, in_features))
