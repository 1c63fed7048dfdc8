"""llama.cpp's weight types (GGML block formats) as quantizers, so that a plan can pick them by name.

A GGML type quantizes each row of a weight ``(out, in)`` in blocks of consecutive input columns, like the column
groups of `qanalyze.quant.columns`, but with its own codes, scales and storage:

- Q4_0, Q5_0 (4.5 and 5.5 bits per weight): blocks of 32, a float16 ``d``, codes ``-2**(b-1) .. 2**(b-1) - 1``
  (the block's value of largest magnitude maps to the most negative code);
- Q4_1, Q5_1 (5.0, 6.0): blocks of 32, a float16 ``d`` and minimum ``m``, codes ``0 .. 2**b - 1``;
- Q8_0 (8.5): blocks of 32, a float16 ``d = max|x| / 127``;
- Q2_K, Q4_K, Q5_K (2.625, 4.5, 5.5): super-blocks of 256 in blocks of 16, 32, 32; each block's scale and minimum
  is a 4-bit (Q2_K) or 6-bit integer times the super-block's float16 ``d`` and ``dmin``;
- Q3_K, Q6_K (3.4375, 6.5625): super-blocks of 256 in blocks of 16, each block's signed 6-bit (Q3_K) or 8-bit
  (Q6_K) scale times the float16 ``d``; codes ``-4..3`` and ``-32..31``.

A row must be a whole number of the type's blocks (32 for the legacy types, 256 for the k-quants): llama.cpp
refuses a k-quant for a tensor whose row is not a multiple of 256 and falls back to a legacy type
(SmolLM2's 576-column projections: `GGMLType.fits`). The storage is exactly the type's bytes per block
(`gguf.constants.GGML_QUANT_SIZES`).

Every quantizer gives codes, one float32 scale per block and, for the types with a minimum, one float32 bias per
block, such that ``codes * scale + bias`` is exactly what llama.cpp's (and the ``gguf`` package's) dequantizer
computes from the stored block: the k-quants' ``scale = d * sc`` and ``bias = -(dmin * m)`` are the products it
forms in float32. The legacy types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) follow the ``gguf`` package's reference
quantizers operation for operation, so their codes are its codes. The k-quants round each block's range to
nearest (the scale from the block's extremes, as a first pass of llama.cpp's reference quantizers) without the
iterative scale search llama.cpp runs afterwards: their error is an upper bound of llama.cpp's, slightly higher
than the real file's, so a plan built on it errs towards more bits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from qanalyze.errors import ConfigError
from qanalyze.quant.ggml_names import GGML_BITS, is_ggml_layout

Quantizer = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
"""``blocks (n, row_multiple) float32 -> (codes (n, row_multiple), scale (n, blocks), bias (n, blocks) or None)``."""


@dataclass(frozen=True)
class GGMLType:
    """One GGML weight type: its code ``bits``, the weights per scale (``block``), its quantizer and whether it
    stores minima; the row multiple it needs (its ``gguf`` block size: 32, or 256 for a k-quant super-block) and
    its bytes come from the ``gguf`` package."""

    name: str
    bits: int
    block: int
    quantizer: Quantizer
    minimum: bool
    """Whether each block stores a minimum (an offset, like a zero point) besides its scale."""

    @property
    def ggml(self) -> GGMLQuantizationType:
        """The ``gguf`` package's enum member of this type."""
        return GGMLQuantizationType[self.name]

    @property
    def row_multiple(self) -> int:
        """Weights of one stored block (32; 256 for the k-quants): a row's width must be a multiple of it."""
        return GGML_QUANT_SIZES[self.ggml][0]

    @property
    def block_bytes(self) -> int:
        """Bytes of one stored block of `row_multiple` weights."""
        return GGML_QUANT_SIZES[self.ggml][1]

    @property
    def bits_per_weight(self) -> float:
        """Storage per weight, every scale included (Q4_K: 4.5)."""
        return 8 * self.block_bytes / self.row_multiple

    def fits(self, in_features: int) -> bool:
        """Whether rows of ``in_features`` columns are whole blocks of this type."""
        return in_features % self.row_multiple == 0

    def groups_per_row(self, in_features: int) -> int:
        """Scales per row of ``in_features`` columns."""
        return in_features // self.block

    def storage_bits(self, out_features: int, in_features: int) -> int:
        """Exact storage of an ``(out, in)`` weight of this type, in bits."""
        return 8 * self.block_bytes * out_features * (in_features // self.row_multiple)


@dataclass(frozen=True)
class GGMLQuantized:
    """A weight in a GGML type: ``codes`` ``(out, in)`` (int8), ``scale`` and ``bias`` ``(out, in / block)``
    (float32; ``bias`` None for the types without a minimum)."""

    codes: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None
    type: GGMLType

    def dequantize(self) -> torch.Tensor:
        """``codes * scale + bias`` per block, float32 ``(out, in)``: what llama.cpp computes."""
        out_features, in_features = self.codes.shape
        values = self.codes.float().reshape(out_features, -1, self.type.block) * self.scale.unsqueeze(-1)
        if self.bias is not None:
            values = values + self.bias.unsqueeze(-1)
        return values.reshape(out_features, in_features)

    @property
    def storage_bits(self) -> int:
        """Exact storage of the stored blocks (`GGMLType.storage_bits`)."""
        return self.type.storage_bits(*self.codes.shape)


def _inverse(value: torch.Tensor) -> torch.Tensor:
    """``1 / value``, 0 where value is 0 (the reference quantizers' ``id``)."""
    return torch.where(value == 0, torch.zeros_like(value), 1 / torch.where(value == 0, 1, value))


def _round_away(values: torch.Tensor) -> torch.Tensor:
    """C's ``roundf`` (halves away from zero), in the ``gguf`` package's exact formula."""
    magnitude = values.abs()
    floored = torch.floor(magnitude)
    return torch.sign(values) * (floored + torch.floor(2 * (magnitude - floored)))


def _signed_peak(blocks: torch.Tensor) -> torch.Tensor:
    """Each row's value of largest magnitude, with its sign (the first one on a tie)."""
    return blocks.gather(-1, blocks.abs().argmax(dim=-1, keepdim=True))


def _half(values: torch.Tensor) -> torch.Tensor:
    """``values`` as stored in float16 and read back as float32."""
    return values.half().float()


def _legacy_symmetric(half_range: int) -> Quantizer:
    """Q4_0 (8) and Q5_0 (16): ``d = peak / -half_range``, codes ``trunc(x / d + half_range + 0.5) - half_range``."""

    def quantize(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        d = _signed_peak(blocks) / -half_range
        codes = torch.trunc(blocks * _inverse(d) + (half_range + 0.5)).clamp(0, 2 * half_range - 1) - half_range
        return codes, _half(d), None

    return quantize


def _legacy_asymmetric(levels: int) -> Quantizer:
    """Q4_1 (15) and Q5_1 (31): ``d = (max - min) / levels``, codes ``trunc((x - min) / d + 0.5)``."""

    def quantize(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        high, low = blocks.amax(dim=-1, keepdim=True), blocks.amin(dim=-1, keepdim=True)
        d = (high - low) / levels
        codes = torch.trunc((blocks - low) * _inverse(d) + 0.5).clamp(0, levels)
        return codes, _half(d), _half(low)

    return quantize


def _q8_0(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
    d = blocks.abs().amax(dim=-1, keepdim=True) / 127
    return _round_away(blocks * _inverse(d)), _half(d), None


def _k_asymmetric(block: int, levels: int, scale_levels: int) -> Quantizer:
    """Q2_K (16, 3, 15), Q4_K (32, 15, 63), Q5_K (32, 31, 63): each block's range ``[min(x, 0), max(x)]`` gives a
    scale and a minimum, both rounded to ``scale_levels`` steps of the super-block's float16 ``d`` / ``dmin``."""

    def quantize(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        count = blocks.shape[0]
        parts = blocks.reshape(count, -1, block)
        low = parts.amin(dim=-1).clamp(max=0)
        scales, minima = (parts.amax(dim=-1) - low) / levels, -low
        d, sc = _super_scale(scales, scale_levels)
        dmin, m = _super_scale(minima, scale_levels)
        step, offset = d * sc, dmin * m
        codes = torch.round((parts + offset.unsqueeze(-1)) * _inverse(step).unsqueeze(-1)).clamp(0, levels)
        codes = torch.where(step.unsqueeze(-1) == 0, torch.zeros_like(codes), codes)
        return codes.reshape(count, -1), step, -offset

    return quantize


def _super_scale(values: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative block values ``(n, blocks)`` as ``d * q``: float16 ``d = max / levels`` per row, integer
    ``q = round(value / max * levels)`` in ``0..levels``."""
    top = values.amax(dim=-1, keepdim=True)
    q = torch.round(values * torch.where(top > 0, levels / torch.where(top > 0, top, 1), 0)).clamp(0, levels)
    return _half(top / levels), q


def _k_symmetric(half_range: int, scale_half_range: int) -> Quantizer:
    """Q3_K (4, 32) and Q6_K (32, 128), blocks of 16: each block's scale ``peak / -half_range`` rounded to a
    signed integer of ``-scale_half_range .. scale_half_range - 1`` steps of the super-block's float16 ``d``."""

    def quantize(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        count = blocks.shape[0]
        parts = blocks.reshape(count, -1, 16)
        scales = _signed_peak(parts).squeeze(-1) / -half_range
        top = _signed_peak(scales)
        inverse = torch.where(top != 0, -scale_half_range / torch.where(top != 0, top, 1), 0)
        sc = torch.round(inverse * scales).clamp(-scale_half_range, scale_half_range - 1)
        step = _half(_inverse(inverse)) * sc
        codes = torch.round(parts * _inverse(step).unsqueeze(-1)).clamp(-half_range, half_range - 1)
        return codes.reshape(count, -1), step, None

    return quantize


def _type(name: str, block: int, quantizer: Quantizer, minimum: bool) -> GGMLType:
    return GGMLType(name, GGML_BITS[name], block, quantizer, minimum)


GGML_TYPES: dict[str, GGMLType] = {t.name: t for t in (
    _type("Q2_K", 16, _k_asymmetric(16, 3, 15), True),
    _type("Q3_K", 16, _k_symmetric(4, 32), False),
    _type("Q4_0", 32, _legacy_symmetric(8), False),
    _type("Q4_1", 32, _legacy_asymmetric(15), True),
    _type("Q4_K", 32, _k_asymmetric(32, 15, 63), True),
    _type("Q5_0", 32, _legacy_symmetric(16), False),
    _type("Q5_1", 32, _legacy_asymmetric(31), True),
    _type("Q5_K", 32, _k_asymmetric(32, 31, 63), True),
    _type("Q6_K", 16, _k_symmetric(32, 128), False),
    _type("Q8_0", 32, _q8_0, False),
)}
"""Every GGML weight type qanalyze models, by llama.cpp's name."""


def get_ggml_type(name: str) -> GGMLType:
    """The GGML type ``name`` (any case); ConfigError listing the known ones."""
    if not is_ggml_layout(name):
        raise ConfigError(f"unknown GGML type {name!r}; known: {', '.join(GGML_TYPES)}")
    return GGML_TYPES[name.upper()]


def quantize_ggml(weight: torch.Tensor, kind: GGMLType, *, where: str = "the weight") -> GGMLQuantized:
    """``weight`` ``(out, in)`` in GGML type ``kind``; ConfigError naming ``where`` when its rows are not whole
    blocks of the type (llama.cpp would store another type there)."""
    if weight.dim() != 2 or weight.numel() == 0:
        raise ConfigError(f"GGML types quantize a non-empty 2-d weight (out, in), not {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if not kind.fits(in_features):
        raise ConfigError(f"{kind.name} stores rows in blocks of {kind.row_multiple} columns; {where} has "
                          f"{in_features} (llama.cpp falls back to another type there)")
    blocks = weight.detach().float().reshape(-1, kind.row_multiple)
    codes, scale, bias = kind.quantizer(blocks)
    per_row = kind.groups_per_row(in_features)
    return GGMLQuantized(codes=codes.to(torch.int8).reshape(out_features, in_features),
                         scale=scale.reshape(out_features, per_row),
                         bias=None if bias is None else bias.reshape(out_features, per_row), type=kind)


FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
"""The type llama.cpp's ``llama-quantize`` stores instead of a k-quant where a row is not a multiple of 256
columns. It picks IQ4_NL for Q2_K and Q3_K, a 4.5-bit type with a non-linear grid that is not modelled here:
Q4_0 has the same size and a uniform grid, so its error is a little higher."""


def ggml_fallback(kind: GGMLType, in_features: int) -> GGMLType | None:
    """``kind`` where rows of ``in_features`` columns are whole blocks of it, else the type llama.cpp falls back
    to (`FALLBACK`) if that one fits, else None."""
    if kind.fits(in_features):
        return kind
    other = GGML_TYPES.get(FALLBACK.get(kind.name, ""))
    return other if other is not None and other.fits(in_features) else None
