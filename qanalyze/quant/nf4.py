"""QLoRA's 4-bit NormalFloat (NF4): the code book, block-wise quantize / dequantize, double quantization.

Pure maths, like `qanalyze.quant.primitives`: no input is changed in place, nothing is cached, no
random draw. Layout follows QLoRA (Dettmers et al., 2023) and bitsandbytes: the tensor is flattened
in row-major order and cut into contiguous blocks of ``block_size`` elements (64); each block keeps
its absolute maximum ``absmax`` and each element the 4-bit index (0..15) of the code-book entry
nearest to ``w / absmax``, so ``w_hat = NF4[code] * absmax``.

Double quantization (QLoRA section 3) compresses the block scales themselves: their mean is
subtracted (they are all positive, so centring uses the 8-bit range on both signs), then they are
quantized to 8 bits in blocks of 256 with one float scale per block. bitsandbytes uses its 8-bit
"dynamic" (tree) code for that step; here it is a plain symmetric int8 grid
(`qanalyze.quant.primitives.quantize_symmetric`), which costs the same 8 bits per scale and errs by
at most half a step of its 256-block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qanalyze.errors import ConfigError, NonFiniteError
from qanalyze.quant.primitives import quantize_symmetric

NF4_CODE_BOOK: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
"""The 16 NF4 values exactly as QLoRA / bitsandbytes publish them (float32 constants), code 0 to 15.

`derive_nf4_code_book` recomputes them from the normal quantiles; it agrees to 2e-7. The difference
is bitsandbytes' arithmetic, not the recipe: it rounds the offset to ``0.9677083`` and works in
float32, which reproduces this table bit for bit.
"""

NF4_OFFSET = 0.5 * ((1 - 1 / (2 * 15)) + (1 - 1 / (2 * 16)))
"""The largest probability whose normal quantile becomes ±1 (0.96770833...).

``Φ⁻¹(1)`` is infinite, so the outermost quantile is taken just inside: halfway between the
outermost bin centres of a 15-bin and a 16-bin split of [0, 1], ``1 - 1/(2·15)`` and ``1 - 1/(2·16)``.
"""

DOUBLE_QUANT_BLOCK = 256
"""Block size of the second quantization (of the block scales), as in QLoRA."""

ZERO_CODE = NF4_CODE_BOOK.index(0.0)
"""The code of the exact zero (7): zero padding and zero weights stay exactly zero."""


def derive_nf4_code_book(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The NF4 values from the standard normal quantile function, in float64 (QLoRA section 3).

    A k-bit NormalFloat puts an equal share of N(0, 1) mass in each bin, normalised to [-1, 1]. To
    have an exact zero (zero padding, and weights that are zero) the two signs are built apart:
    ``2**(k-1)`` positive quantiles at probabilities evenly spaced from ``offset`` down to 1/2 (1/2
    itself excluded), ``2**(k-1) - 1`` negative ones the same way, plus zero: 8 + 7 + 1 = 16 values
    for k = 4, one more on the positive side. Dividing by the largest, ``Φ⁻¹(offset)``, maps both
    ends to exactly ±1.
    """
    bits = 4
    positive_count, negative_count = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    # linspace(offset, 1/2, n + 1) without its last point: n probabilities, none at the median
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, positive_count + 1, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, negative_count + 1, dtype=torch.float64)[:-1])
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return values / values.max()


def nf4_code_book(dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """`NF4_CODE_BOOK` as a tensor of shape (16,), code ``i`` at index ``i``."""
    return torch.tensor(NF4_CODE_BOOK, dtype=dtype, device=device)


@dataclass(frozen=True)
class NF4Tensor:
    """A tensor in NF4: codes and block scales, plain or double-quantized.

    ``codes``: uint8 in 0..15 with the input's shape (one code per byte; packing two per byte is a
    storage concern). One block scale per ``block_size`` elements of the flattened tensor, either
    ``absmax`` (shape ``(blocks,)``, float32, float64 for a float64 input) or, with double
    quantization, ``absmax_codes`` (int8, ``(blocks,)``), ``absmax_scale`` (one per block of 256
    scales) and ``absmax_offset`` (0-d, the mean subtracted first), with ``absmax`` None.
    """

    codes: torch.Tensor
    block_size: int
    absmax: torch.Tensor | None
    absmax_codes: torch.Tensor | None = None
    absmax_scale: torch.Tensor | None = None
    absmax_offset: torch.Tensor | None = None

    @property
    def double_quant(self) -> bool:
        """True when the block scales are themselves quantized to 8 bits."""
        return self.absmax is None

    @property
    def shape(self) -> torch.Size:
        """The shape of the quantized tensor."""
        return self.codes.shape

    def scales(self) -> torch.Tensor:
        """The scale of each block, shape ``(blocks,)``: ``absmax``, or its double-quantized value."""
        if self.absmax is not None:
            return self.absmax
        scale = self.absmax_scale.reshape(-1, 1)
        padded = _pad(self.absmax_codes.to(scale.dtype), DOUBLE_QUANT_BLOCK).reshape(-1, DOUBLE_QUANT_BLOCK)
        return (padded * scale).reshape(-1)[: self.absmax_codes.numel()] + self.absmax_offset

    def dequantize(self) -> torch.Tensor:
        """``NF4[code] * scale`` of each element's block, with ``codes``' shape, in the scales' dtype."""
        return nf4_dequantize(self)


def _pad(values: torch.Tensor, multiple: int) -> torch.Tensor:
    """``values`` (1-D) with zeros appended up to a multiple of ``multiple`` elements."""
    missing = -values.numel() % multiple
    return torch.cat([values, values.new_zeros(missing)]) if missing else values


def _check_block_size(block_size: object) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ConfigError(f"NF4 block_size must be a positive integer, not {block_size!r}")


def nf4_quantize(w: torch.Tensor, block_size: int = 64, double_quant: bool = False) -> NF4Tensor:
    """Quantize ``w`` to NF4 in blocks of ``block_size`` consecutive elements (row-major order).

    Each code is the nearest code-book entry of ``w / absmax`` (a value exactly halfway between two
    entries takes the lower code); a block of zeros keeps absmax 0 and code 7 (zero). With
    ``double_quant`` the scales are quantized as the module docstring says; the codes are always
    chosen with the exact absmax, as in QLoRA. Raises ConfigError for a non-float or empty tensor,
    a bad block size, or an element count that is not a multiple of it; NonFiniteError for
    inf / nan.
    """
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.numel() == 0:
        raise ConfigError(f"NF4 quantizes non-empty floating-point tensors, not {_describe(w)}")
    _check_block_size(block_size)
    if not isinstance(double_quant, bool):
        raise ConfigError(f"double_quant must be True or False, not {double_quant!r}")
    if w.numel() % block_size:
        raise ConfigError(f"NF4 splits the {w.numel()} elements of a {tuple(w.shape)} tensor into blocks of "
                          f"{block_size}; {w.numel()} is not a multiple of {block_size}")
    dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    blocks = w.detach().to(dtype).reshape(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    if not bool(torch.isfinite(absmax).all()):
        raise NonFiniteError("cannot quantize a tensor with inf or nan values to NF4")
    # an all-zero block divides by 1 instead of 0: every element is then exactly code 7 (zero)
    normalised = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax)).unsqueeze(1)
    book = nf4_code_book(dtype, w.device)
    # nearest entry = number of midpoints strictly below the value; bucketize (right=False) puts a value
    # equal to a midpoint in the lower bin, and needs no (elements x 16) table of distances
    codes = torch.bucketize(normalised, (book[1:] + book[:-1]) / 2).to(torch.uint8).reshape(w.shape)
    if not double_quant:
        return NF4Tensor(codes=codes, block_size=block_size, absmax=absmax)
    offset = absmax.mean()
    second = quantize_symmetric(_pad(absmax - offset, DOUBLE_QUANT_BLOCK), 8, rows_per_group=DOUBLE_QUANT_BLOCK)
    return NF4Tensor(codes=codes, block_size=block_size, absmax=None,
                     absmax_codes=second.q[: absmax.numel()], absmax_scale=second.scale.reshape(-1),
                     absmax_offset=offset)


def nf4_dequantize(q: NF4Tensor) -> torch.Tensor:
    """The values ``q`` stands for: ``NF4[code] * scale`` of the element's block, in the scales' dtype."""
    scales = q.scales()
    values = nf4_code_book(scales.dtype, scales.device)[q.codes.long()].reshape(-1, q.block_size)
    return (values * scales.unsqueeze(1)).reshape(q.codes.shape)


def nf4_bits_per_weight(block_size: int = 64, double_quant: bool = False) -> float:
    """Storage per weight: 4 bits plus the block scale's share (32 / 64 = 0.5; with double
    quantization 8 / 64 + 32 / (64 · 256) ≈ 0.127, QLoRA's figures)."""
    _check_block_size(block_size)
    if not double_quant:
        return 4 + 32 / block_size
    return 4 + 8 / block_size + 32 / (block_size * DOUBLE_QUANT_BLOCK)


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__

