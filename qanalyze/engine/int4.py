"""The ``int4`` engine mode: training transformers with 4-bit integers (Xi et al., NeurIPS 2023).

Building blocks, bottom up:

- **LSQ quantizer** (`LSQQuantize`, `lsq_quantize`, `lsq_init`): 4-bit codes ``-8..7`` with a learned
  step size ``s`` per tensor, initialised to ``2·mean|h| / sqrt(7)`` and used rounded to float16 (so a
  packed checkpoint, which stores scales in float16, holds exactly the step the layer trained with).
- **Hadamard quantizer** (forward): ``Y = X Wᵀ = (XH)(WH)ᵀ ≈ Q(XH) Q(WH)ᵀ`` with ``H`` the block-diagonal
  normalized Hadamard matrix of `qanalyze.quant.hadamard`, ``Q`` the LSQ quantizer.
- **Bit splitting** (`bit_split`): the output gradient ``G`` becomes two 4-bit matrices, ``G ≈ s_hi·hi + s_lo·lo``.
- **Leverage-score sampling** (`lss_probabilities`): rows of the split ``[14·hi; lo]`` kept with probabilities
  proportional to their scores (water-filled), reweighted by ``1/p`` so the gradients stay unbiased.
- `Int4LinearFunction` (the maths, no state), `Int4Linear` and `Int4Embedding` (the parameters).

What is integer and what is float in `Int4LinearFunction` (N tokens, D in-features, O out-features)::

    forward   float    X̃ = X H, W̃ = W H (fast Walsh-Hadamard), v = X̃ / s_x, W̃ / s_w
              integer  codes X_c = clamp(round(v), -8, 7), W_c likewise (int8)
              integer  A = X_c · W_cᵀ (int_mm, int32 accumulation)
              float    Y = (s_x s_w) · A + b
    backward  float    bit split of the whole G (one scale, from G): hi = round(G/s_hi),
                       lo = stochastic_round((G − s_hi·hi)/s_lo), both int8 in -7..7
              float    row scores of the 2N rows of [14·hi; lo], water-filled probabilities, Bernoulli draws
              integer  P = [hi; lo][kept] · W_c (one int_mm, int32)
              float    ∂L/∂Q(X̃) = (s_lo s_w) · Σ (14 or 1)/p · P, row by row (index_add);
                       ∇X = (mask_x ⊙ ∂L/∂Q(X̃)) Hᵀ (fast transform)
              integer  for each power of two 1/p = 2^k: P_k = part[kept_k]ᵀ · X_c[kept_k] (int_mm, int32)
              float    ∂L/∂Q(W̃) = (s_lo s_x) · Σ_k (14 or 1) · 2^k · P_k;  ∇W = (mask_w ⊙ ∂L/∂Q(W̃)) Hᵀ
              float    LSQ step-size gradients from ∂L/∂Q(X̃), ∂L/∂Q(W̃); bias gradient Σ_rows G (not sampled)

``mask`` is LSQ's straight-through mask (1 strictly inside the code range, 0 where clipped). One split
serves both products; the two samplings (scores ‖row‖ for ∇X, ‖row‖·‖X_i‖ for ∇W) are independent draws
from the explicit generator. Sampling the rows of the split, as the paper does, rather than the rows of
G before it matters: a hi row carries 14 times a lo row's magnitude, so at the paper's budget (N of the
2N rows) nearly every hi row is kept and mostly low-order residuals are dropped, where sampling tokens
of G drops whole rows and, reweighted by 1/p before the split, inflates the split's one scale. In ∇W the
kept rows are the terms of the contracted sum, where no per-row 1/p can be applied after an integer
GEMM; its probabilities are therefore rounded to powers of two and each power makes its own INT4 x INT4
product, scaled exactly. The budget counts every row of the padded batch by default (`LSS_BUDGETS`): with
dynamic padding many rows of G are zero and are never kept, so on short sentences the paper's budget may
cover every non-zero row; ``budget="nonzero"`` halves those instead. Unbiased throughout: E over the draws
of each reweighted row is the row, E over the rounding of the split is G, and the products are linear in G.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qanalyze.distributed import gather_objects
from qanalyze.engine.functions import TensorSpec
from qanalyze.engine.kernels import int_mm
from qanalyze.engine.modules import _Swapped
from qanalyze.errors import ConfigError
from qanalyze.quant.hadamard import block_hadamard, check_block, choose_block
from qanalyze.quant.primitives import Quantized, round_stochastic

CODE_MIN, CODE_MAX = -8, 7
"""The LSQ code range: all 16 values of a signed 4-bit integer (LSQ's Q_N = 8, Q_P = 7)."""

SPLIT_MAX = 7
"""Largest |code| of the hi and lo parts of a bit split (symmetric 4-bit)."""

SPLIT_RATIO = 2 * SPLIT_MAX
"""``s_hi / s_lo``: the hi residual spans ``±s_hi/2``, which lo's ``±7`` steps of ``s_hi/14`` cover exactly."""

MIN_STEP = 2.0**-24
"""Floor of an LSQ step size (the smallest positive float16): an optimizer step that drives ``s`` to or below
zero would make every code ±inf; the floor keeps the quantizer defined (the step-size gradient then pushes
``s`` back up)."""

MAX_STEP = 65504.0
"""Ceiling of an LSQ step size: the largest float16."""

# LSQ codes reach -8, one past the symmetric 4-bit range |v| <= 7 that int_mm's bits=4 declares; declaring
# 5 bits (|v| <= 15) keeps every call inside int_mm's contract. It is the same int8 kernel either way,
# only int_mm's int32 overflow bound is worked out on 15 instead of 7.
_LSQ_BITS = 5
_SPLIT_BITS = 4

LSS_BUDGETS: dict[str, Any] = {
    "rows": lambda scores: scores.numel(),
    "nonzero": lambda scores: int((scores > 0).sum()),
}
"""What ``Int4Spec.keep_fraction`` is a fraction of, given the 2N row scores of ``[14·hi; lo]``: ``rows``, all 2N
rows of the padded batch, zero rows included (the paper's N of 2N: sampling makes the two split products cost
one INT4 product, so a padding row counts as a row of compute); ``nonzero``, only the rows that carry gradient
(stricter: with padding, ``rows`` at 0.5 may keep every non-zero row and sample nothing)."""


# ---------------------------------------------------------------------------------------------------------------------
# LSQ


def lsq_init(h: torch.Tensor) -> torch.Tensor:
    """LSQ's initial step size ``2·mean|h| / sqrt(7)`` as a 0-d tensor (float32, float64 for a float64 ``h``);
    1 for an all-zero ``h`` (any positive step keeps zeros exact). ConfigError for inf or nan in ``h``."""
    values = h.detach()
    dtype = torch.float64 if values.dtype == torch.float64 else torch.float32
    step = 2 * values.to(dtype).abs().mean() / math.sqrt(CODE_MAX)
    if not bool(torch.isfinite(step)):
        raise ConfigError("cannot initialise an LSQ step size from a tensor with inf or nan values")
    return torch.where(step > 0, step, torch.ones_like(step))


def _step(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The step size a quantization uses: ``s`` rounded to the nearest float16, within [MIN_STEP, MAX_STEP].

    A packed checkpoint stores scales in float16 and refuses one it cannot hold exactly, so every LSQ
    step is float16 from the start: the codes a layer trains with are the codes its checkpoint keeps.
    The Parameter itself stays float32 (its small updates accumulate there); the gradient passes the
    rounding straight through.
    """
    return s.detach().to(torch.float16).to(dtype).clamp_(MIN_STEP, MAX_STEP)


def lsq_quantize(h: torch.Tensor, s: torch.Tensor) -> Quantized:
    """The 4-bit LSQ codes of ``h`` with step ``s``: ``q = clamp(round(h/s), -8, 7)`` (int8, ties to even)
    and ``scale = s`` (0-d, float32 or float64), one scale per tensor: ``q · s`` is the fake-quantized value.
    ``s`` is first rounded to float16 (see `LSQQuantize`), so the scale is exactly storable in a checkpoint."""
    dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
    step = _step(s, dtype).reshape(())
    codes = (h.detach().to(dtype) / step).round_().clamp_(CODE_MIN, CODE_MAX).to(torch.int8)
    return Quantized(q=codes, scale=step, zero_point=None, bits=4, rows_per_group=None)


def _lsq_step_terms(v: torch.Tensor) -> torch.Tensor:
    """Per element ``∂(s·Q(v))/∂s`` with a straight-through round: ``round(v) − v`` inside, -8 or 7 when clipped."""
    inside = v.round().sub_(v)
    return torch.where(v <= CODE_MIN, float(CODE_MIN), torch.where(v >= CODE_MAX, float(CODE_MAX), inside))


def _inside(v: torch.Tensor) -> torch.Tensor:
    """LSQ's straight-through mask: strictly inside the code range (clipped values get no gradient)."""
    return (v > CODE_MIN) & (v < CODE_MAX)


def _grad_scale(numel: int) -> float:
    """LSQ's step-size gradient scale ``1 / sqrt(numel · Q_P)``: keeps the step's update in proportion to the
    weights' updates whatever the tensor size."""
    return 1.0 / math.sqrt(max(numel, 1) * CODE_MAX)


class LSQQuantize(torch.autograd.Function):
    """LSQ fake quantization ``apply(h, s) = s · clamp(round(h/s), -8, 7)`` with LSQ's gradients.

    - ``∂/∂h``: straight through where ``-8 < h/s < 7``, 0 where clipped;
    - ``∂/∂s``: ``Σ grad · d`` times ``1/sqrt(numel · 7)``, with per element ``d = round(h/s) − h/s``
      inside the range, ``-8`` where ``h/s <= -8`` and ``7`` where ``h/s >= 7``.

    ``s`` is a 0-d (or one-element) tensor, normally an ``nn.Parameter``; the step used is ``s`` rounded to
    the nearest float16 (what a packed checkpoint can store exactly) and kept within [2**-24, 65504], with
    the gradient passed straight through that rounding. Computed in ``h``'s dtype.
    """

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        step = _step(s, h.dtype).reshape(())
        v = h.detach() / step
        out = v.round().clamp_(CODE_MIN, CODE_MAX).mul_(step)
        ctx.save_for_backward(v)
        ctx.s_shape, ctx.s_dtype = s.shape, s.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        (v,) = ctx.saved_tensors
        grad_h = grad * _inside(v) if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[1]:
            total = (grad * _lsq_step_terms(v)).sum() * _grad_scale(v.numel())
            grad_s = total.reshape(ctx.s_shape).to(ctx.s_dtype)
        return grad_h, grad_s


# ---------------------------------------------------------------------------------------------------------------------
# bit splitting


@dataclass(frozen=True)
class BitSplit:
    """A tensor as two 4-bit parts: ``g ≈ scale_hi · hi + scale_lo · lo``.

    ``hi`` and ``lo`` are int8 codes in ``-7..7`` with ``g``'s shape; ``scale_lo = max|g| / 98`` and
    ``scale_hi = 14 · scale_lo = max|g| / 7`` (0-d). Together they are one code ``14·hi + lo`` in
    ``-105..105`` (211 levels, about 7.7 bits) times ``scale_lo``.
    """

    hi: torch.Tensor
    lo: torch.Tensor
    scale_hi: torch.Tensor
    scale_lo: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        """``scale_hi · hi + scale_lo · lo`` in the scales' dtype."""
        return self.hi.to(self.scale_hi.dtype) * self.scale_hi + self.lo.to(self.scale_lo.dtype) * self.scale_lo


def bit_split(g: torch.Tensor, generator: torch.Generator) -> BitSplit:
    """Split ``g`` (one scale per tensor) into a 4-bit high part and a 4-bit low part (the paper's bit splitting).

    ``hi = round(g / s_hi)`` (nearest) with ``s_hi = max|g| / 7``; the residual ``r = g − s_hi·hi`` lies in
    ``±s_hi/2``; ``lo`` is ``r / s_lo`` rounded stochastically (from ``generator``) with ``s_lo = s_hi / 14``,
    so ``|r / s_lo| <= 7`` and ``lo`` needs no clipping (a clamp to ``±7`` only absorbs float rounding).

    Error bound: every element satisfies ``|g − (s_hi·hi + s_lo·lo)| < s_lo = max|g| / 98`` (stochastic
    rounding moves a value by less than one step), and ``E[s_lo·lo] = r``, so the split is unbiased:
    ``E[s_hi·hi + s_lo·lo] = g``. An all-zero ``g`` gets ``s_hi = 1`` and zero codes. Computed in float32
    (float64 for a float64 ``g``). ConfigError for inf or nan, or a generator on another device.
    """
    dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
    work = g.detach().to(dtype)
    amax = work.abs().amax() if work.numel() else torch.zeros((), dtype=dtype, device=work.device)
    if not bool(torch.isfinite(amax)):
        raise ConfigError("cannot bit-split a gradient with inf or nan values")
    scale_lo = torch.where(amax > 0, amax / (SPLIT_MAX * SPLIT_RATIO), torch.full_like(amax, 1.0 / SPLIT_RATIO))
    scale_hi = scale_lo * SPLIT_RATIO
    hi = (work / scale_hi).round_().clamp_(-SPLIT_MAX, SPLIT_MAX)
    residual = work - hi * scale_hi
    lo = round_stochastic(residual / scale_lo, generator).clamp_(-SPLIT_MAX, SPLIT_MAX)
    return BitSplit(hi=hi.to(torch.int8), lo=lo.to(torch.int8), scale_hi=scale_hi, scale_lo=scale_lo)


# ---------------------------------------------------------------------------------------------------------------------
# leverage-score sampling


def lss_probabilities(norms: torch.Tensor, budget: float) -> torch.Tensor:
    """Keep probabilities ``p_i = min(1, c · norms_i)``, with ``c`` found by water-filling so ``Σ p = budget``.

    ``norms`` is 1-D and non-negative (row scores); ``budget`` is the expected number of kept rows. The
    rows whose scaled score would exceed 1 are capped at 1 and the remaining budget is shared in
    proportion among the others (the smallest set of capped rows that makes every other ``c · norm_i <= 1``).
    Rows of score 0 get ``p = 0``; when ``budget`` is at least the number of positive scores every such
    row gets ``p = 1`` (the sum is then that number). Computed in float64, returned in ``norms``' dtype
    (float64 for an integer ``norms``). ConfigError for a non-positive or non-finite budget, or for
    negative or non-finite scores.
    """
    if not isinstance(norms, torch.Tensor) or norms.dim() != 1:
        raise ConfigError(f"row scores must be a 1-D tensor, not {getattr(norms, 'shape', type(norms))}")
    if isinstance(budget, bool) or not isinstance(budget, int | float) or not math.isfinite(budget) or budget <= 0:
        raise ConfigError(f"the sampling budget (expected kept rows) must be a positive number, not {budget!r}")
    scores = norms.detach().to(torch.float64)
    if not bool(torch.isfinite(scores).all()) or bool((scores < 0).any()):
        raise ConfigError("row scores must be finite and non-negative")
    out_dtype = norms.dtype if norms.is_floating_point() else torch.float64
    positive = scores > 0
    count = int(positive.sum())
    if budget >= count:
        return positive.to(out_dtype)
    ordered, order = scores.sort(descending=True)
    # suffix[m] = sum of the scores from rank m on: what the uncapped rows share when the m largest are capped
    suffix = ordered.flip(0).cumsum(0).flip(0)
    capped = torch.arange(len(ordered), dtype=torch.float64, device=scores.device)
    ratio = (budget - capped) / suffix.clamp_min(torch.finfo(torch.float64).tiny)
    # m capped rows are consistent when the largest uncapped row stays at or under 1; the smallest such m
    # also leaves every capped row at or above 1 (at m - 1 the condition failed), so it is the water level.
    # It always exists below the budget: at m = ceil(budget) - 1, (budget - m) * score_m <= score_m <= suffix[m].
    # (the 1e-12 slack absorbs the rounding of that bound, which is exactly 1 at worst)
    valid = (ratio * ordered <= 1 + 1e-12) & (capped < count)
    m = int(torch.argmax(valid.to(torch.int8)))
    probs_sorted = torch.where(capped < m, torch.ones_like(ordered), (ratio[m] * ordered).clamp(max=1))
    probs = torch.empty_like(probs_sorted)
    probs[order] = probs_sorted
    return probs.to(out_dtype)


# ---------------------------------------------------------------------------------------------------------------------
# the linear Function


@dataclass(frozen=True)
class Int4Spec:
    """Settings of the int4 mode for one linear layer.

    ``block``: Hadamard block size (power of two up to 1024), or None to choose it with
    `qanalyze.quant.hadamard.choose_block` on the first batch (modules only; the Function needs a size).
    ``lss``: leverage-score sampling of the rows of the split ``[14·hi; lo]``; off (the default, as in the
    authors' released kernels, and more accurate on SST-2 in reports/BENCHMARKS.md) keeps every non-zero row.
    ``lss_input``: with ``lss``, sample the rows that enter the input gradient too (scores ``‖row‖``), not
    only those of the weight gradient (scores ``‖row‖·‖X_i‖``). The input gradient flows on to every earlier
    layer, so its sampling noise compounds with depth; False keeps that product whole.
    ``keep_fraction``: with ``lss``, the expected number of rows of ``[14·hi; lo]`` kept, as a fraction in
    (0, 1] of the rows ``budget`` counts (`LSS_BUDGETS`); 0.5 of ``rows`` is the paper's N of 2N.
    """

    block: int | None = None
    lss: bool = False
    keep_fraction: float = 0.5
    lss_input: bool = True
    budget: str = "rows"

    def __post_init__(self) -> None:
        if self.block is not None:
            check_block(self.block)
        for name in ("lss", "lss_input"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, not {getattr(self, name)!r}")
        fraction = self.keep_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction <= 1:
            raise ConfigError(f"keep_fraction must be a number in (0, 1], not {fraction!r}")
        if self.budget not in LSS_BUDGETS:
            raise ConfigError(f"LSS budget {self.budget!r} is not one of {', '.join(LSS_BUDGETS)}")


@dataclass(frozen=True)
class _Rows:
    """The rows of the stacked ``[14·hi; lo]`` that enter one backward product: positions in ``hi`` and in
    ``lo`` (token indices) and the ``1/p`` each kept row is reweighted by."""

    hi: torch.Tensor
    lo: torch.Tensor
    weight_hi: torch.Tensor
    weight_lo: torch.Tensor


def _stacked_rows(split: BitSplit, extra: torch.Tensor | None, spec: Int4Spec, generator: torch.Generator, *,
                  sample: bool, power_of_two: bool) -> _Rows:
    """Leverage-score sampling of the rows of ``[14·hi; lo]`` (2N rows for N tokens), after the split.

    Row scores are the rows' norms (in units of ``s_lo``), times ``extra[token]`` when given (``‖X_i‖`` for the
    weight gradient). The budget is ``keep_fraction`` of the rows `LSS_BUDGETS` counts (``rows`` at 0.5: N of 2N,
    as in the paper). Rows of score 0 are never kept; a budget at or above their count keeps every other row.
    The hi rows carry 14 times the lo rows' magnitude, so water-filling keeps nearly every hi row and samples
    the low-order residual. With ``power_of_two`` each probability is rounded to the nearest power of two
    (in log scale) before the draw, so every ``1/p`` is an exact power of two (see `_weight_side`). Without
    ``sample`` (or with LSS off) every non-zero row is kept with weight 1.
    """
    scores = torch.cat((split.hi.float().norm(dim=1) * SPLIT_RATIO, split.lo.float().norm(dim=1)))
    if extra is not None:
        scores = scores * extra.repeat(2)
    n = split.hi.shape[0]
    if not (spec.lss and sample):
        probs = (scores > 0).to(torch.float64)
    else:
        count = int((scores > 0).sum())
        if count == 0:
            probs = torch.zeros_like(scores, dtype=torch.float64)
        else:
            budget = spec.keep_fraction * LSS_BUDGETS[spec.budget](scores)
            probs = lss_probabilities(scores, budget).to(torch.float64)
            if power_of_two:
                positive = probs > 0
                rounded = torch.exp2(torch.log2(probs.clamp_min(torch.finfo(torch.float64).tiny)).round())
                probs = torch.where(positive, rounded.clamp(max=1.0), probs)
    if spec.lss and sample:
        # float64 draws: a float32 u cannot resolve probabilities below about 6e-8
        kept = torch.rand(probs.shape, generator=generator, dtype=torch.float64, device=probs.device) < probs
    else:
        kept = probs > 0
    weights = torch.where(kept, 1.0 / probs.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(probs))
    hi, lo = torch.nonzero(kept[:n]).squeeze(1), torch.nonzero(kept[n:]).squeeze(1)
    return _Rows(hi=hi, lo=lo, weight_hi=weights[:n][hi], weight_lo=weights[n:][lo])


def _input_side(split: BitSplit, w_codes: torch.Tensor, step_w: torch.Tensor, spec: Int4Spec,
                generator: torch.Generator) -> torch.Tensor:
    """``∂L/∂Q(X̃) ≈ G · Q(W̃)`` (N x D, float32) from one integer product of the kept ``[hi; lo]`` rows.

    Each kept row's product is an output row of its own, so its ``14/p`` or ``1/p`` is applied after the GEMM."""
    out = torch.zeros(split.hi.shape[0], w_codes.shape[1], dtype=torch.float32, device=w_codes.device)
    rows = _stacked_rows(split, None, spec, generator, sample=spec.lss_input, power_of_two=False)
    parts = rows.hi.numel()
    if parts + rows.lo.numel():
        product = int_mm(torch.cat((split.hi[rows.hi], split.lo[rows.lo])), w_codes,
                         bits_a=_SPLIT_BITS, bits_b=_LSQ_BITS).to(torch.float32)
        out.index_add_(0, rows.hi, product[:parts] * (SPLIT_RATIO * rows.weight_hi).float().unsqueeze(1))
        out.index_add_(0, rows.lo, product[parts:] * rows.weight_lo.float().unsqueeze(1))
        out.mul_(split.scale_lo.float() * step_w)
    return out


def _weight_side(split: BitSplit, x_codes: torch.Tensor, step_x: torch.Tensor, spec: Int4Spec,
                 generator: torch.Generator) -> torch.Tensor:
    """``∂L/∂Q(W̃) ≈ Gᵀ · Q(X̃)`` (O x D, float32) from integer products of the kept ``[hi; lo]`` rows.

    Here the kept rows are the terms of the sum the GEMM contracts over, so a ``1/p`` per row cannot be
    applied after it. The probabilities are powers of two: the rows that share one ``1/p = 2^k`` make one
    INT4 x INT4 product, scaled by ``2^k`` (exact), and hi rows carry their factor 14 the same way."""
    out = torch.zeros(split.hi.shape[1], x_codes.shape[1], dtype=torch.float32, device=x_codes.device)
    x_norms = x_codes.to(torch.float32).norm(dim=1)  # s_x is common to all rows: not needed
    rows = _stacked_rows(split, x_norms, spec, generator, sample=True, power_of_two=True)
    for part, index, weight, factor in ((split.hi, rows.hi, rows.weight_hi, SPLIT_RATIO),
                                        (split.lo, rows.lo, rows.weight_lo, 1)):
        for level in weight.unique().tolist():
            chosen = index[weight == level]
            product = int_mm(part[chosen].t(), x_codes[chosen], bits_a=_SPLIT_BITS, bits_b=_LSQ_BITS)
            out.add_(product.to(torch.float32), alpha=factor * level)
    return out.mul_(split.scale_lo.float() * step_x)


class Int4LinearFunction(torch.autograd.Function):
    """INT4 linear layer: Hadamard quantizer forward, bit splitting and leverage-score sampling backward.

    ``apply(x, weight, bias, spec, s_x, s_w, generator, frozen)``: ``weight`` is ``(out, in)``, ``spec`` an
    `Int4Spec` with a concrete ``block``, ``s_x`` and ``s_w`` the LSQ step sizes (0-d, normally Parameters,
    both receive LSQ gradients), ``frozen`` the already quantized ``W̃ = W H`` (`lsq_quantize` codes and
    scale) or None. With ``frozen`` the weight gradient is straight through (no clipping mask: the float
    ``W̃`` is not known) and ``s_w`` gets none. Which quantities are integer and which float is tabulated in
    the module docstring. Returns ``Y`` in ``x``'s dtype.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: Int4Spec,
                s_x: torch.Tensor, s_w: torch.Tensor, generator: torch.Generator,
                frozen: Quantized | None) -> torch.Tensor:
        if spec.block is None:
            raise ConfigError("Int4LinearFunction needs a concrete Hadamard block size (Int4Spec(block=k))")
        k = spec.block
        x2 = x.detach().reshape(-1, x.shape[-1]).float()
        step_x = _step(s_x, torch.float32).reshape(())
        v_x = block_hadamard(x2, k) / step_x
        x_codes = v_x.round().clamp_(CODE_MIN, CODE_MAX).to(torch.int8)
        if frozen is None:
            step_w = _step(s_w, torch.float32).reshape(())
            v_w = block_hadamard(weight.detach().float(), k) / step_w
            w_codes = v_w.round().clamp_(CODE_MIN, CODE_MAX).to(torch.int8)
        else:
            step_w, v_w, w_codes = frozen.scale.float().reshape(()), None, frozen.q.to(torch.int8)
        acc = int_mm(x_codes, w_codes.t(), bits_a=_LSQ_BITS, bits_b=_LSQ_BITS)
        y = acc.to(torch.float32).mul_(step_x * step_w)
        if bias is not None:
            y.add_(bias.detach().float())
        ctx.save_for_backward(x_codes, v_x, w_codes, v_w, step_x, step_w)
        ctx.spec, ctx.generator, ctx.x_shape, ctx.has_bias = spec, generator, x.shape, bias is not None
        ctx.s_x_meta, ctx.s_w_meta = (s_x.shape, s_x.dtype), (s_w.shape, s_w.dtype)
        return y.reshape(*x.shape[:-1], weight.shape[0]).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_codes, v_x, w_codes, v_w, step_x, step_w = ctx.saved_tensors
        spec: Int4Spec = ctx.spec
        needs = ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1]).float()
        grad_x = grad_w = grad_b = grad_sx = grad_sw = None
        want_sw = needs[5] and v_w is not None
        # one split of the whole G (its scale from G itself), shared by both products
        split = bit_split(g, ctx.generator) if needs[0] or needs[4] or needs[1] or want_sw else None
        if needs[0] or needs[4]:
            d_qx = _input_side(split, w_codes, step_w, spec, ctx.generator)
            if needs[0]:
                grad_x = block_hadamard(d_qx * _inside(v_x), spec.block).reshape(ctx.x_shape).to(grad.dtype)
            if needs[4]:
                total = (d_qx * _lsq_step_terms(v_x)).sum() * _grad_scale(v_x.numel())
                grad_sx = total.reshape(ctx.s_x_meta[0]).to(ctx.s_x_meta[1])
        if needs[1] or want_sw:
            d_qw = _weight_side(split, x_codes, step_x, spec, ctx.generator)
            if needs[1]:
                masked = d_qw if v_w is None else d_qw * _inside(v_w)
                grad_w = block_hadamard(masked, spec.block).to(grad.dtype)
            if want_sw:
                total = (d_qw * _lsq_step_terms(v_w)).sum() * _grad_scale(v_w.numel())
                grad_sw = total.reshape(ctx.s_w_meta[0]).to(ctx.s_w_meta[1])
        if ctx.has_bias and needs[2]:
            grad_b = g.sum(0).to(grad.dtype)
        return grad_x, grad_w, grad_b, None, grad_sx, grad_sw, None, None


# ---------------------------------------------------------------------------------------------------------------------
# modules


class Int4Linear(_Swapped):
    """A linear layer on the int4 path (`Int4LinearFunction`), holding the LSQ step sizes as Parameters.

    ``spec`` (a `TensorSpec`) is kept for the common interface; the int4 mode is 4-bit by definition, so
    its bits are not used. ``int4`` gives the mode's own settings (default ``Int4Spec()``: block chosen on
    the first batch, every non-zero gradient row kept). ``s_w`` is initialised at construction (with
    ``k = 1`` when the block is not known yet, then again once it is chosen, before any step can have
    changed it) and ``s_x`` on the first batch. The chosen block lives in the float buffer
    ``block_size`` (0 until chosen; float so that checkpoint code keeping the float entries of the state
    dict keeps it), so a loaded state dict restores it and nothing is chosen again.
    """

    def __init__(self, original: nn.Module, spec: TensorSpec, generator: torch.Generator, *,
                 transposed: bool = False, int4: Int4Spec | None = None) -> None:
        super().__init__(original, spec, generator, transposed=transposed)
        self.int4 = int4 if int4 is not None else Int4Spec()
        matrix = self.matrix().detach()
        block = self.int4.block
        if block is not None and matrix.shape[1] % block:
            raise ConfigError(f"Hadamard block size {block} does not divide the {matrix.shape[1]} in-features "
                              f"of a {tuple(matrix.shape)} weight")
        device = matrix.device
        self.register_buffer("block_size", torch.tensor(float(block or 0), device=device))
        self.s_x = nn.Parameter(torch.zeros((), device=device))
        self.s_w = nn.Parameter(lsq_init(block_hadamard(matrix.float(), block or 1)))
        self._ready = False
        self.ranks_share_batch = False
        self._int4_cache: tuple[tuple[int, int, int], Quantized] | None = None

    @property
    def block(self) -> int | None:
        """The Hadamard block size in use, or None before the first batch chose it."""
        return int(self.block_size) or None

    def _require_block(self) -> int:
        block = self.block
        if block is None:
            raise ConfigError("the Hadamard block size is not chosen yet: run a batch through the layer, load "
                              "its state dict, or pass Int4Spec(block=k)")
        return block

    def _prepare(self, x: torch.Tensor) -> None:
        """Choose the block and initialise the step sizes on the first batch (not again after a load). With
        ``ranks_share_batch`` (a run on several ranks) they are chosen from every rank's share of it, so that
        the ranks choose alike (the rows one process sees, but for the padding of each share)."""
        if self._ready:
            return
        with torch.no_grad():
            matrix = self.matrix().detach().float()
            if self.ranks_share_batch and (self.block is None or not bool(self.s_x > 0)):
                rows = gather_objects(x.detach().reshape(-1, x.shape[-1]).cpu())
                x = torch.cat(rows).to(x.device)
            if self.block is None:
                block = choose_block(x.detach().float(), matrix)
                self.block_size.fill_(block)
                self.s_w.copy_(lsq_init(block_hadamard(matrix, block)))
            if not bool(self.s_x > 0):
                rows = x.detach().reshape(-1, x.shape[-1]).float()
                self.s_x.copy_(lsq_init(block_hadamard(rows, self._require_block())))
        self._ready = True

    def quantized_weight(self) -> Quantized:
        """The 4-bit LSQ codes of ``W H`` (int8, ``-8..7``, ``(out, in)``) and ``s_w``: frozen, cached or fresh."""
        if self._frozen is not None:
            return self._frozen
        block = self._require_block()
        key = (self.weight._version, self.s_w._version, block)
        if self._int4_cache is None or self._int4_cache[0] != key:
            self._int4_cache = (key, lsq_quantize(block_hadamard(self.matrix().detach().float(), block), self.s_w))
        return self._int4_cache[1]

    def freeze(self, quantized: Quantized) -> None:
        """Use ``quantized`` (codes of ``W H``) from now on and write the float weight it stands for,
        ``dequantize(codes) · Hᵀ``, into ``self.weight``."""
        block = self._require_block()
        shape = tuple(self.matrix().shape)
        if quantized.bits != 4 or tuple(quantized.q.shape) != shape or quantized.rows_per_group is not None:
            raise ConfigError(f"an int4 layer freezes 4-bit per-tensor codes of shape {shape}, not "
                              f"{quantized.bits}-bit codes of shape {tuple(quantized.q.shape)}")
        self._frozen = quantized
        with torch.no_grad():
            values = block_hadamard(quantized.dequantize().float(), block).to(self.weight.dtype)
            self.weight.copy_(values.t() if self.transposed else values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._prepare(x)
        spec = replace(self.int4, block=self.block)
        return Int4LinearFunction.apply(x, self.matrix(), self.bias, spec, self.s_x, self.s_w, self.generator,
                                        self._weight_for_forward())

    def extra_repr(self) -> str:
        lss = f"LSS keep {self.int4.keep_fraction:g} of {self.int4.budget}" if self.int4.lss else "LSS off"
        return f"INT4 Hadamard quantizer, block {self.block or 'auto'}, bit splitting, {lss}"


class Int4Embedding(_Swapped):
    """An embedding whose outputs are LSQ fake-quantized to 4 bits (the paper quantizes embedding outputs).

    An output row is a table row, so quantizing outputs with one step ``s_out`` per tensor is quantizing
    the table itself: ``quantized_weight()`` gives the 4-bit codes of the table with ``s_out``, a packed
    checkpoint stores them, and a frozen layer looks its outputs up in them (the same values as training's
    fake-quantized outputs). ``s_out`` is initialised from the whole table at construction (every output
    is one of its rows) and learned with LSQ's gradient; the table receives straight-through gradients.
    ``spec`` is kept for the common interface; its bits are not used.
    """

    def __init__(self, original: nn.Embedding, spec: TensorSpec, generator: torch.Generator) -> None:
        super().__init__(original, spec, generator)
        self.padding_idx = original.padding_idx
        self.s_out = nn.Parameter(lsq_init(self.weight))
        self._int4_cache: tuple[tuple[int, int], Quantized] | None = None

    def quantized_weight(self) -> Quantized:
        """The 4-bit LSQ codes of the table with step ``s_out``: frozen, cached or fresh."""
        if self._frozen is not None:
            return self._frozen
        key = (self.weight._version, self.s_out._version)
        if self._int4_cache is None or self._int4_cache[0] != key:
            self._int4_cache = (key, lsq_quantize(self.weight, self.s_out))
        return self._int4_cache[1]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        table = self._weight_for_forward()
        if table is not None:
            return (table.q[ids].to(table.scale.dtype) * table.scale).to(self.weight.dtype)
        return LSQQuantize.apply(F.embedding(ids, self.weight, self.padding_idx), self.s_out)

    def extra_repr(self) -> str:
        return "INT4 LSQ outputs"
