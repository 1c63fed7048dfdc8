"""Pure, stateless quantization maths: group layout, rounding, quantize / dequantize.

Everything here is a function of its arguments: no input is modified in place, no global random
state is used (stochastic rounding takes an explicit ``torch.Generator``), nothing is cached.

Granularity is one notion, ``rows_per_group`` (Q-BERT group-wise quantization): dim 0 of a tensor
(the output rows of a weight, the tokens of an activation) is split into contiguous groups of
``rows_per_group`` rows, one scale per group; ``None`` means one scale for the whole tensor.
Plans name groups with strings (``"tensor"``, ``"channel"``, ``"head"``, ``"<rows>"``);
:func:`rows_per_group` turns a name into a row count for a given weight.

Scale shape convention. For ``x`` of shape ``(R, *rest)`` quantized with ``rows_per_group=r``:

- ``G = R // r`` groups; the grouped view of ``x`` is ``x.reshape(G, r, *rest)``;
- ``scale`` (and ``zero_point``) has shape ``(G,) + (1,) * x.dim()``, i.e. ``(G, 1, 1, ...)``, which
  broadcasts against that grouped view: ``x_hat = (q.reshape(G, r, *rest) * scale).reshape(x.shape)``;
- per tensor (``rows_per_group=None``) ``scale`` is a 0-d tensor that broadcasts against ``x`` itself.

Scales are float32, or float64 when the input is float64; integer values use the smallest signed
integer dtype that holds their range (int8 up to 8 bits symmetric, int16 up to 16; asymmetric
``[0, 2**bits - 1]`` needs int16 from 8 bits and int32 at 16).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from qanalyze.errors import ConfigError, NonFiniteError

BITS_RANGE = range(2, 17)
"""Supported bit widths, 2 to 16 inclusive."""

GROUP_NAMES = ("tensor", "channel", "head")
"""Named group layouts; any positive integer (rows per group) is also a group spec."""

ACTIVATION_GROUPS = ("tensor", "token")
GRADIENT_GROUPS = ("tensor", "row")
"""Scale layouts of an output gradient in the integer engine: one per tensor, or one per row of each backward
product's gradient operand (per token for the input gradient, per output channel for the weight gradient)."""
"""Activation scale layouts: one scale per tensor, or one per token (row of the flattened input)."""

WEIGHT_RANGES = ("max", "mse")
"""How a weight's range is set: ``max`` maps each group's max|w| to the largest code (Q8BERT, Q-BERT);
``mse`` clips each group at the fraction of max|w| that minimizes ||Q(W) - W||^2 (:func:`mse_clip`)."""


def check_weight_range(weight_range: object) -> None:
    """ConfigError unless ``weight_range`` is one of `WEIGHT_RANGES`."""
    if weight_range not in WEIGHT_RANGES:
        raise ConfigError(f"unknown weight range {weight_range!r}; known: {', '.join(WEIGHT_RANGES)}")


MAX_RULE_KINDS = ("layernorm", "rmsnorm")
"""Module kinds whose weight always takes the max rule: a layer norm's gain is a per-channel scale, not a
weight matrix, and its few values are each their own group's maximum anyway."""


def module_weight_range(kind: str, weight_range: str) -> str:
    """The range rule a module of ``kind`` takes when ``weight_range`` is asked (`MAX_RULE_KINDS` keep ``max``)."""
    return "max" if kind in MAX_RULE_KINDS else weight_range


def qmax(bits: int) -> int:
    """Largest magnitude of a symmetric signed ``bits``-bit integer: ``2**(bits-1) - 1``.

    The symmetric range is ``[-qmax, qmax]`` (the most negative code is left unused so that the
    range is symmetric and zero sits in the middle). Raises ConfigError outside 2..16 bits.
    """
    check_bits(bits)
    return 2 ** (bits - 1) - 1


def check_bits(bits: int) -> None:
    """ConfigError unless ``bits`` is an integer bit-width from 2 to 16."""
    # bool is an int subclass; True would silently mean 1 bit
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS_RANGE:
        raise ConfigError(f"bits must be an integer from {BITS_RANGE.start} to {BITS_RANGE.stop - 1}, not {bits!r}")


def is_positive_int(value: object) -> bool:
    """True for an int above 0 (bool is not an int here)."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


# ---------------------------------------------------------------------------------------------------------------------
# group layout


def parse_group(group: str | int) -> str:
    """Normalise a group spec to its canonical string.

    ``"tensor"``, ``"channel"`` and ``"head"`` are kept as they are; a positive integer, or a string
    of decimal digits naming one, becomes that integer as a string (``64`` and ``"064"`` -> ``"64"``).
    Raises ConfigError for anything else (other names, zero, negatives, non-integers).
    """
    if is_positive_int(group):
        return str(group)
    if isinstance(group, str):
        if group in GROUP_NAMES:
            return group
        if group.isascii() and group.isdigit() and int(group) > 0:
            return str(int(group))
    raise ConfigError(f"group must be one of {', '.join(GROUP_NAMES)} or a positive number of rows, not {group!r}")


def rows_per_group(out_rows: int, group: str | int, *, head_dim: int | None = None) -> int:
    """Rows in each group when the ``out_rows`` rows (dim 0) of a weight are split as ``group`` says.

    ``"tensor"`` -> ``out_rows`` (one group); ``"channel"`` -> 1 (one scale per output row);
    ``"head"`` -> ``head_dim`` (one group per attention head; the rows of head h are
    ``h * head_dim`` to ``(h + 1) * head_dim``); ``"<n>"`` -> n.
    Raises ConfigError when the row count does not divide ``out_rows`` or ``"head"`` has no ``head_dim``.
    """
    if not is_positive_int(out_rows):
        raise ConfigError(f"out_rows must be a positive integer, not {out_rows!r}")
    name = parse_group(group)
    if name == "tensor":
        return out_rows
    if name == "channel":
        return 1
    if name == "head":
        if head_dim is None:
            raise ConfigError("group 'head' needs head_dim (the rows of one attention head)")
        if not is_positive_int(head_dim):
            raise ConfigError(f"head_dim must be a positive integer, not {head_dim!r}")
        rows = head_dim
    else:
        rows = int(name)
    if out_rows % rows:
        raise ConfigError(f"group '{name}' needs {rows} rows per group, which does not divide {out_rows} rows")
    return rows


def num_groups(out_rows: int, group: str | int, *, head_dim: int | None = None) -> int:
    """Number of groups (and so of scales) for ``out_rows`` rows split as ``group`` says."""
    return out_rows // rows_per_group(out_rows, group, head_dim=head_dim)


# ---------------------------------------------------------------------------------------------------------------------
# the quantized value


@dataclass(frozen=True)
class Quantized:
    """Integer values with their scales: ``x_hat = (q - zero_point) * scale`` per group.

    ``q`` has the input's shape and an integer dtype. ``scale`` (float32, or float64 for a float64
    input) and ``zero_point`` (integer, asymmetric only, else None) are 0-d when ``rows_per_group``
    is None (per tensor), else of shape ``(G, 1, 1, ...)`` with ``q.dim() + 1`` dimensions, which
    broadcasts against ``q.reshape(G, rows_per_group, *q.shape[1:])``.
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    bits: int
    rows_per_group: int | None

    def dequantize(self) -> torch.Tensor:
        """The real values the integers stand for, in the scale's dtype, with ``q``'s shape."""
        values = _grouped(self.q.to(self.scale.dtype), self.rows_per_group)
        if self.zero_point is not None:
            values = values - self.zero_point.to(self.scale.dtype)
        return (values * self.scale).reshape(self.q.shape)


# ---------------------------------------------------------------------------------------------------------------------
# rounding


def round_nearest(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest integer, ties to even (``torch.round``: 0.5 -> 0, 1.5 -> 2, -2.5 -> -2).

    Ties to even has no bias on values spread evenly over the ties, unlike ties away from zero.
    """
    return torch.round(x)


NOISE_BITS = 16
"""Resolution of the uniform draws stochastic rounding compares against: 2**16 levels."""


def random_bytes(count: int, generator: torch.Generator, device: torch.device | str | None = None) -> torch.Tensor:
    """`count` uniformly random bytes (uint8, flat) from `generator`, on `device` (default the generator's).

    Drawn as full-range int64 words: the generator spends one call per element whatever its width, so a
    word gives eight bytes for the price of one. ``random_()`` without bounds would leave each word's sign
    bit 0; the explicit range ``[-2**63, 2**63)`` makes all 64 bits random.
    """
    words = torch.empty((count + 7) // 8, dtype=torch.int64, device=device or generator.device)
    return words.random_(-(2**63), None, generator=generator).view(torch.uint8)[:count]


def uniform_noise(shape: Sequence[int], generator: torch.Generator, *, dtype: torch.dtype = torch.float32,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """Uniform draws on the 2**16 midpoints ``(k + 1/2) / 2**16`` of [0, 1), of `shape`, from `generator`.

    Rounding up when ``u < frac`` then happens with probability ``frac`` rounded to 16 bits: a bias of
    at most 2**-17 of a quantization step, below float32's own resolution of ``x / scale`` at 16-bit
    codes. The draws come four to a 64-bit word of the generator: on CPU 3.4x faster than
    ``torch.rand``, which spends one generator call per value, and drawing was the integer engine's
    costliest step. Exact in float32 and float64; `device` defaults to the generator's.
    """
    count = math.prod(shape)
    levels = random_bytes(2 * count, generator, device).view(torch.int16).to(dtype)  # -2**15 .. 2**15 - 1
    return levels.add_(2**15 + 0.5).mul_(2.0**-NOISE_BITS).reshape(tuple(shape))


def round_stochastic(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Round down or up at random, up with probability ``x - floor(x)``: unbiased, ``E[result] = x``
    (to the 2**-17 of `uniform_noise`).

    Computes ``floor(x) + [u < x - floor(x)]`` with ``u`` from `uniform_noise` on ``x``'s device, in
    ``x``'s dtype (float32 for float16 / bfloat16). The result, in ``x``'s dtype, is always ``floor(x)``
    or ``ceil(x)``.
    """
    _check_generator(generator, x)
    if not x.is_floating_point():
        raise ConfigError(f"stochastic rounding needs a floating-point tensor, not {x.dtype}")
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    u = uniform_noise(work.shape, generator, dtype=work.dtype, device=work.device)
    low = torch.floor(work)
    # Written as floor(x) + [u < frac] rather than floor(x + u): in floating point x + u can round up
    # to x + 1 when x is already an integer and u is close to 1, which would give neither floor nor ceil.
    return (low + (u < work - low).to(work.dtype)).to(x.dtype)


def _check_generator(generator: object, x: torch.Tensor) -> None:
    if not isinstance(generator, torch.Generator):
        raise ConfigError(f"stochastic rounding needs a torch.Generator, not {type(generator).__name__}")
    if generator.device.type != x.device.type:
        raise ConfigError(f"the generator is on {generator.device} but the tensor is on {x.device}")


_ROUNDERS: dict[str, Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]] = {
    "nearest": lambda x, generator: round_nearest(x),
    "stochastic": round_stochastic,
}

ROUNDING_MODES = tuple(_ROUNDERS)
"""Names accepted by the ``rounding`` argument of the quantizers."""


def _rounder(rounding: str, generator: torch.Generator | None) -> Callable[[torch.Tensor], torch.Tensor]:
    if rounding not in _ROUNDERS:
        raise ConfigError(f"unknown rounding {rounding!r}; known: {', '.join(ROUNDING_MODES)}")
    if rounding == "stochastic" and generator is None:
        raise ConfigError("stochastic rounding needs an explicit torch.Generator (generator=...)")
    # With nearest rounding a generator is accepted and unused, so callers can pass one uniformly.
    fn = _ROUNDERS[rounding]
    return lambda values: fn(values, generator)


# ---------------------------------------------------------------------------------------------------------------------
# quantizers


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # float64 stays float64 so references can be exact; half types are widened for the scale maths
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _prepare(x: torch.Tensor, rows_per_group: int | None) -> torch.Tensor:
    """Validate ``x`` and the group size; return ``x`` in the compute dtype, viewed by groups."""
    if not isinstance(x, torch.Tensor):
        raise ConfigError(f"expected a torch.Tensor, not {type(x).__name__}")
    if not x.is_floating_point():
        raise ConfigError(f"can only quantize floating-point tensors, not {x.dtype}")
    if x.dim() < 1 or x.numel() == 0:
        raise ConfigError(f"can only quantize non-empty tensors of at least one dimension, not shape {tuple(x.shape)}")
    if rows_per_group is not None:
        if not is_positive_int(rows_per_group):
            raise ConfigError(f"rows_per_group must be a positive integer or None, not {rows_per_group!r}")
        if x.shape[0] % rows_per_group:
            raise ConfigError(f"rows_per_group {rows_per_group} does not divide the {x.shape[0]} rows of the tensor")
    # .to() returns x itself when the dtype already matches; that is safe because nothing below writes in place
    return _grouped(x.to(_compute_dtype(x)), rows_per_group)


def _grouped(x: torch.Tensor, rows_per_group: int | None) -> torch.Tensor:
    if rows_per_group is None:
        return x
    return x.reshape(x.shape[0] // rows_per_group, rows_per_group, *x.shape[1:])


def _reduce(values: torch.Tensor, rows_per_group: int | None, op: Callable[..., torch.Tensor]) -> torch.Tensor:
    """``op`` (amax / amin) per group: 0-d per tensor, else keeping dims so the result is ``(G, 1, ...)``."""
    if rows_per_group is None:
        return op(values)
    return op(values, dim=tuple(range(1, values.dim())), keepdim=True)


def _clipped(amax: torch.Tensor, clip: torch.Tensor | None) -> torch.Tensor:
    """``amax`` scaled by the clipping ratios ``clip`` (None: unchanged), which must have its shape."""
    if clip is None:
        return amax
    if not isinstance(clip, torch.Tensor) or clip.shape != amax.shape:
        shape = tuple(clip.shape) if isinstance(clip, torch.Tensor) else type(clip).__name__
        raise ConfigError(f"clip must be a tensor of the scale's shape {tuple(amax.shape)}, not {shape}")
    if not bool(((clip > 0) & (clip <= 1)).all()):
        raise ConfigError("clipping ratios must lie in (0, 1]")
    return amax * clip.to(amax.dtype)


def _check_finite(scale: torch.Tensor) -> None:
    # One check on the (small) scale tensor catches inf / nan anywhere in the input: amax / amin propagate them.
    if not bool(torch.isfinite(scale).all()):
        raise NonFiniteError("cannot quantize a tensor with inf or nan values (or a range beyond its dtype)")


SCALE_FORMATS = ("exact", "float16")
"""How scales are stored: as computed, or rounded up to float16 (what a packed checkpoint keeps)."""


def _format_scale(scale: torch.Tensor, scale_format: str) -> torch.Tensor:
    if scale_format == "exact":
        return scale
    if scale_format != "float16":
        raise ConfigError(f"unknown scale_format {scale_format!r}; known: {', '.join(SCALE_FORMATS)}")
    half = scale.to(torch.float16)
    up = torch.nextafter(half, torch.full_like(half, math.inf))
    # the smallest float16 value >= scale; a scale below float16's range becomes its smallest subnormal
    half = torch.where(half.to(scale.dtype) < scale, up, half)
    half = torch.where(half > 0, half, torch.full_like(half, 2.0**-24))
    _check_finite(half)
    return half.to(scale.dtype)


def _int_dtype(low: int, high: int) -> torch.dtype:
    for dtype in (torch.int8, torch.int16):
        info = torch.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return dtype
    return torch.int32  # holds every range of 2..16 bits, including asymmetric [0, 2**16 - 1]


def symmetric_scale(amax: torch.Tensor, bits: int, scale_format: str = "exact") -> torch.Tensor:
    """The step that maps ``amax`` (per group) to ``qmax(bits)``, in ``scale_format``; 1 where ``amax`` is 0."""
    scale = amax / qmax(bits)
    _check_finite(scale)
    # s == 0 for an all-zero group (or one so tiny that amax / qmax underflows): 1 keeps q = 0 and avoids 0 / 0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return _format_scale(scale, scale_format)


def dfp_scale(amax: torch.Tensor, bits: int) -> torch.Tensor:
    """Dynamic fixed point's power-of-two step for ``amax`` (per group): ``2**(floor(log2 amax) - (bits - 2))``,
    never below the dtype's smallest normal number; 1 where ``amax`` is 0 (see `dynamic_fixed_point`)."""
    _check_finite(amax)
    # frexp gives amax = m * 2**k with m in [0.5, 1), so floor(log2 amax) = k - 1 exactly, with no log2 rounding
    _, exponent = torch.frexp(amax)
    min_exponent = int(math.log2(torch.finfo(amax.dtype).tiny))
    shift = (exponent - 1 - (bits - 2)).clamp(min=min_exponent)
    scale = torch.exp2(shift.to(amax.dtype))
    return torch.where(amax > 0, scale, torch.ones_like(scale))


def quantize_symmetric(
    x: torch.Tensor,
    bits: int,
    *,
    rows_per_group: int | None = None,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
    scale_format: str = "exact",
    clip: torch.Tensor | None = None,
) -> Quantized:
    """Symmetric uniform quantization: ``q = clamp(round(x / s), -qmax, qmax)``, ``s = max|x_g| / qmax``.

    One scale per group of ``rows_per_group`` rows of dim 0 (None: per tensor). The element of largest
    magnitude in each group maps to ``±qmax``. A group of zeros gets scale 1, so it stays exactly zero.
    ``rounding`` is ``"nearest"`` (ties to even) or ``"stochastic"`` (needs ``generator``).
    ``scale_format="float16"`` rounds each scale up to the next float16 value before quantizing, so a
    checkpoint that stores scales in 16 bits holds exactly the scales used (rounding up, not to nearest,
    keeps ``max|x| / s <= qmax``: nothing is clipped).
    ``clip`` (ratios in (0, 1], one per group: the scale's shape) clips each group at ``clip · max|x_g|``
    instead (see :func:`mse_clip`); values beyond it take the largest code.
    """
    limit = qmax(bits)
    round_fn = _rounder(rounding, generator)
    values = _prepare(x, rows_per_group)
    amax = _clipped(_reduce(values.abs(), rows_per_group, torch.amax), clip)
    scale = symmetric_scale(amax, bits, scale_format)
    q = round_fn(values / scale).clamp(-limit, limit)
    return Quantized(
        q=q.to(_int_dtype(-limit, limit)).reshape(x.shape),
        scale=scale,
        zero_point=None,
        bits=bits,
        rows_per_group=rows_per_group,
    )


def quantize_asymmetric(
    x: torch.Tensor,
    bits: int,
    *,
    rows_per_group: int | None = None,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> Quantized:
    """Asymmetric (affine) quantization to ``[0, 2**bits - 1]`` with an integer zero point per group.

    The range ``[lo, hi]`` is the group's ``[min, max]`` widened to include 0, so that zero is exactly
    representable (padding, ReLU outputs): ``s = (hi - lo) / (2**bits - 1)``,
    ``zero_point = clamp(round(-lo / s), 0, 2**bits - 1)``, ``q = clamp(round(x / s) + zero_point, 0, 2**bits - 1)``.
    For a non-negative input the zero point is 0 and the minimum maps to code 0 exactly. Because the
    zero point is rounded, the other end of a mixed-sign range can fall up to half a step outside the
    codes and is clipped (the PyTorch / Q8BERT convention). A degenerate range (an all-zero group) gets
    scale 1 and zero point 0.
    """
    check_bits(bits)
    levels = 2**bits - 1
    round_fn = _rounder(rounding, generator)
    values = _prepare(x, rows_per_group)
    low = _reduce(values, rows_per_group, torch.amin).clamp(max=0)
    high = _reduce(values, rows_per_group, torch.amax).clamp(min=0)
    scale = (high - low) / levels
    _check_finite(scale)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    # the zero point always rounds to nearest: it is part of the format, not a random draw
    zero_point = round_nearest(-low / scale).clamp(0, levels)
    q = (round_fn(values / scale) + zero_point).clamp(0, levels)
    dtype = _int_dtype(0, levels)
    return Quantized(
        q=q.to(dtype).reshape(x.shape),
        scale=scale,
        zero_point=zero_point.to(dtype),
        bits=bits,
        rows_per_group=rows_per_group,
    )


def fake_quantize(
    x: torch.Tensor,
    bits: int,
    *,
    symmetric: bool = True,
    rows_per_group: int | None = None,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
    weight_range: str = "max",
) -> torch.Tensor:
    """``dequantize(quantize(x))`` in ``x``'s dtype: the values a ``bits``-bit format can hold, in float.

    ``weight_range="mse"`` (symmetric only) clips each group at its :func:`mse_clip` ratio. There is no
    straight-through estimator here (rounding has zero gradient); autograd wrappers that need one belong
    in the engine.
    """
    check_weight_range(weight_range)
    if not symmetric:
        if weight_range == "mse":
            raise ConfigError("the mse weight range is implemented for symmetric quantization only")
        quantized = quantize_asymmetric(x, bits, rows_per_group=rows_per_group, rounding=rounding, generator=generator)
    else:
        clip = mse_clip(x, bits, rows_per_group=rows_per_group) if weight_range == "mse" else None
        quantized = quantize_symmetric(x, bits, rows_per_group=rows_per_group, rounding=rounding,
                                       generator=generator, clip=clip)
    return quantized.dequantize().to(x.dtype)


def dynamic_fixed_point(
    x: torch.Tensor,
    bits: int,
    *,
    rows_per_group: int | None = None,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
    clip: torch.Tensor | None = None,
) -> Quantized:
    """Dynamic fixed point (integer fine-tuning paper): a power-of-two scale per tensor (or per group).

    ``s = 2**(e - (bits - 2))`` with ``e = floor(log2(max|x|))``, the binary exponent of the largest
    magnitude; mantissas ``q = clamp(round(x / s), -qmax, qmax)``. This is the paper's float-to-integer
    mapping: every mantissa is aligned to the tensor's largest exponent, and the largest element's
    ``1.m`` fills the ``bits - 1`` magnitude bits, so ``max|x| / s`` lies in ``[2**(bits-2), 2**(bits-1))``
    and is clipped by at most one step (when it rounds up to ``2**(bits-1)``). (``e = ceil(log2 max|x|)``
    would leave the upper half of the integer range unused: one bit lost.) ``rows_per_group`` gives
    each group of rows its own exponent (the plan's groups); None is the paper's one per tensor. An
    all-zero group gets scale 1; the scale never goes below the dtype's smallest normal number.
    ``clip`` (ratios in (0, 1], the scale's shape) takes the exponent of ``clip · max|x_g|`` instead.
    """
    limit = qmax(bits)
    round_fn = _rounder(rounding, generator)
    values = _prepare(x, rows_per_group)
    amax = _clipped(_reduce(values.abs(), rows_per_group, torch.amax), clip)
    scale = dfp_scale(amax, bits)
    q = round_fn(values / scale).clamp(-limit, limit)
    return Quantized(q=q.to(_int_dtype(-limit, limit)).reshape(x.shape), scale=scale, zero_point=None, bits=bits,
                     rows_per_group=rows_per_group)


# ---------------------------------------------------------------------------------------------------------------------
# errors


def quantization_error(
    x: torch.Tensor,
    bits: int,
    *,
    rows_per_group: int | None = None,
    symmetric: bool = True,
    weight_range: str = "max",
) -> float:
    """``||fake_quantize(x) - x||^2`` (nearest rounding) as a Python float, accumulated in float64.

    ``weight_range="mse"`` (symmetric only) clips each group at its :func:`mse_clip` ratio."""
    x = x.detach()  # a Parameter in, a float out: no autograd graph is wanted
    quantized = fake_quantize(x, bits, symmetric=symmetric, rows_per_group=rows_per_group, weight_range=weight_range)
    difference = quantized.to(torch.float64) - x.to(torch.float64)
    return float(torch.sum(difference * difference))


def weight_errors(
    weight: torch.Tensor,
    bits_list: Sequence[int],
    groups: Sequence[str | int],
    *,
    head_dim: int | None = None,
    weight_range: str = "max",
) -> dict[int, dict[str, float]]:
    """``{bits: {group: ||Q(W) - W||^2}}`` with symmetric nearest rounding, rows of dim 0 grouped, each
    group's range set as ``weight_range`` says (`WEIGHT_RANGES`).

    Group keys are canonical (:func:`parse_group`). Groups that do not apply to this weight (a row
    count that does not divide its rows, ``"head"`` without ``head_dim``) are left out silently: the
    caller offers candidates and this keeps the ones that fit. Invalid bits or group specs still raise
    ConfigError.
    """
    for bits in bits_list:
        check_bits(bits)
    names = list(dict.fromkeys(parse_group(group) for group in groups))
    if head_dim is not None and not is_positive_int(head_dim):
        raise ConfigError(f"head_dim must be a positive integer or None, not {head_dim!r}")
    if not isinstance(weight, torch.Tensor) or weight.dim() < 1 or weight.numel() == 0:
        raise ConfigError("a weight must be a non-empty tensor with at least one dimension")
    layout: dict[str, int] = {}
    for name in names:
        try:
            layout[name] = rows_per_group(weight.shape[0], name, head_dim=head_dim)
        except ConfigError:
            # with the specs and head_dim checked above, only the two "does not apply" cases land here
            continue
    return {
        bits: {name: quantization_error(weight, bits, rows_per_group=rows, weight_range=weight_range)
               for name, rows in layout.items()}
        for bits in bits_list
    }


CLIP_COARSE = tuple(0.85**i for i in range(25))
"""`mse_clip`'s first pass: clipping ratios 1, 0.85, 0.85², ... down to 0.02 of max|x| (geometric: a group with
one outlier far beyond its other values wants a small ratio; bell-shaped rows want 0.3-0.5 at 2 bits)."""

CLIP_FINE = (0.92, 0.94, 0.96, 0.98, 1.02, 1.04, 1.06, 1.08)
"""`mse_clip`'s second pass: factors on each group's best coarse ratio (half the coarse spacing either way)."""


CLIP_CHUNK = 1 << 18
"""`mse_clip` works through the tensor in blocks of about this many elements, so each candidate's passes stay
in cache: 0.2 to 1 s for a table of minilm-l6's word-embedding shape (30522 x 384, per row, 2 bits) on 2 idle
cores; a first version with whole-tensor passes through `quantize_symmetric` took 3.7 s. Its thousands of
small parallel ops slow down badly when another process holds a core (OpenMP threads wait on each other)."""


def mse_clip(
    x: torch.Tensor, bits: int, *, rows_per_group: int | None = None,
    scale_rule: Callable[[torch.Tensor, int], torch.Tensor] = symmetric_scale,
) -> torch.Tensor:
    """The clipping ratio of each group (of ``rows_per_group`` rows of dim 0; None: one for the tensor) that
    minimizes the group's ``||Q(x) - x||^2`` under symmetric nearest rounding with the step
    ``scale_rule(r · max|x_g|, bits)`` (`symmetric_scale`: ``r · max|x_g| / qmax``; `dfp_scale` for powers of two).

    The result has the scale's shape and goes to a quantizer's ``clip``. A grid search, since rounding makes
    the error piecewise smooth with many local minima: the ratios `CLIP_COARSE`, then each group's best
    times `CLIP_FINE`, within (0, 1]. Ratio 1 (the max rule) is on the grid, so no group's error exceeds the max
    rule's; ties keep the larger ratio (less clipping). An all-zero group gets 1.
    """
    limit = qmax(bits)
    values = _prepare(x.detach(), rows_per_group)
    scale_amax = _reduce(values.abs(), rows_per_group, torch.amax)
    _check_finite(scale_amax)
    groups = values.reshape(1, -1) if rows_per_group is None else values.reshape(values.shape[0], -1)
    amax = scale_amax.reshape(-1)
    coarse = torch.tensor(CLIP_COARSE, dtype=values.dtype, device=values.device).expand(len(groups), -1)

    def steps(ratios: torch.Tensor) -> torch.Tensor:
        return scale_rule(ratios * amax.unsqueeze(1), bits)

    best = _best_ratio(groups, coarse, steps, limit)
    fine = torch.tensor((1.0, *CLIP_FINE), dtype=values.dtype, device=values.device)
    best = _best_ratio(groups, (best.unsqueeze(1) * fine).clamp(max=1.0), steps, limit)
    return torch.where(amax > 0, best, torch.ones_like(best)).reshape(scale_amax.shape)


def _best_ratio(groups: torch.Tensor, ratios: torch.Tensor, step_of: Callable[[torch.Tensor], torch.Tensor],
                limit: int) -> torch.Tensor:
    """Per row of ``groups``, the entry of its row of ``ratios`` with the least error (the first on ties);
    ``step_of(ratios)`` gives each candidate's step."""
    count, width = groups.shape
    errors = torch.zeros(count, ratios.shape[1], dtype=torch.float64, device=groups.device)
    rows = max(1, CLIP_CHUNK // width)
    steps = step_of(ratios)
    for first in range(0, count, rows):
        for column in range(0, width, CLIP_CHUNK):
            block = groups[first:first + rows, column:column + CLIP_CHUNK]
            for j in range(ratios.shape[1]):
                step = steps[first:first + rows, j:j + 1]
                difference = round_nearest(block / step).clamp_(-limit, limit).mul_(step).sub_(block)
                errors[first:first + rows, j] += difference.square_().sum(dim=1, dtype=torch.float64)
    return ratios.gather(1, errors.argmin(dim=1, keepdim=True)).squeeze(1)
