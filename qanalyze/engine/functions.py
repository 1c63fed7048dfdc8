"""Autograd Functions of the integer engine: the maths of one quantized op, forward and backward.

No policy and no state: every Function takes tensors, a frozen spec (bits, groups, quantizer) and
the ``torch.Generator`` that stochastic rounding draws from, and saves what backward needs with
``save_for_backward``. Which module gets which spec is decided in `qanalyze.engine.apply`.

Integer linear (the integer fine-tuning paper, with the plan's bits per tensor)::

    forward    X_q = Q_a(X), W_q = Q_w(W)            Y   = s_x s_w ⊙ (X_q · W_qᵀ) + b
    backward   G_x = Q_g(G ⊙ s_w), G_w = Q_g(G ⊙ s_x)  ∇X  = s_gx (G_x · W_q),  ∇W = s_gw (G_wᵀ · X_q)

Every product is an integer GEMM (`qanalyze.engine.kernels.int_mm_scaled`, which also applies the product's
scales). The weight has one scale per group of output rows and the activation one per tensor or per token,
so those scales vary along the dimension a backward product sums over; they are folded into the output gradient
*before* it is quantized (one scale per tensor), which keeps both backward products purely integer and exact in
the maths: Σ_n g[m,n] s_w[n] W_q[n,k] = Σ_n (g ⊙ s_w)[m,n] W_q[n,k].

Where `qanalyze.engine.kernels.fused_quantize_selected` holds (a CPU without fast int8 GEMMs, where the compiled
library builds) each quantization is one compiled pass (`qanalyze.engine.kernels.fused_codes`): the same codes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from qanalyze.engine.kernels import fused_codes, fused_layer_norm, fused_quantize_selected, int_mm_scaled
from qanalyze.errors import ConfigError
from qanalyze.quant.primitives import (
    GRADIENT_GROUPS,
    Quantized,
    check_weight_range,
    dfp_scale,
    dynamic_fixed_point,
    mse_clip,
    qmax,
    quantize_symmetric,
    random_bytes,
    symmetric_scale,
    uniform_noise,
)

Quantize = Callable[..., Quantized]
"""``quantize(x, bits, rows_per_group, rounding, generator, clip=None) -> Quantized``; ``clip`` holds clipping
ratios per group (see `weight_clip`)."""


@dataclass(frozen=True)
class Quantizer:
    """A quantizer the engine runs: how it quantizes, and the step it takes for a (clipped) range ``max|x|`` at
    given bits (what `weight_clip` searches with, so the search sees the steps the quantizer will use)."""

    quantize: Quantize
    step: Callable[[torch.Tensor, int], torch.Tensor]


QUANTIZERS: dict[str, Quantizer] = {
    # integer fine-tuning: power-of-two scales, so rescaling is a shift
    "dfp": Quantizer(
        quantize=lambda x, bits, rows, rounding, generator, clip=None: dynamic_fixed_point(
            x, bits, rows_per_group=rows, rounding=rounding, generator=generator, clip=clip),
        step=dfp_scale),
    # Q-BERT / Q8BERT: max-calibrated scales, rounded up to float16 so a checkpoint stores them exactly
    "symmetric": Quantizer(
        quantize=lambda x, bits, rows, rounding, generator, clip=None: quantize_symmetric(
            x, bits, rows_per_group=rows, rounding=rounding, generator=generator, scale_format="float16",
            clip=clip),
        step=lambda amax, bits: symmetric_scale(amax, bits, "float16")),
}
"""Quantizer name -> `Quantizer`."""


def _registered(name: str) -> Quantizer:
    if name not in QUANTIZERS:
        raise ConfigError(f"unknown quantizer {name!r}; known: {', '.join(QUANTIZERS)}")
    return QUANTIZERS[name]


def get_quantizer(name: str) -> Quantize:
    """The quantize function of the quantizer registered under ``name``; ConfigError lists the known ones."""
    return _registered(name).quantize


@dataclass(frozen=True)
class TensorSpec:
    """How one op quantizes its tensors: weight, activation (input) and gradient bits, weight rows
    per group (None: one scale per tensor), activation scale per token or per tensor, quantizer, and how the
    weight's range is set (`WEIGHT_RANGES`: ``max``, or ``mse`` clipping, see `weight_clip`)."""

    weight_bits: int
    activation_bits: int
    gradient_bits: int
    rows_per_group: int | None = None
    per_token: bool = False
    quantizer: str = "dfp"
    weight_range: str = "max"
    gradient_group: str = "tensor"
    """`GRADIENT_GROUPS`: ``row`` gives the output gradient one scale per token for the input gradient and one
    per output channel for the weight gradient (the scale then factors out of each product's rows); linear
    layers only: embeddings and layer norms keep one scale per tensor."""
    column_group: str | None = None
    """A weight-only column layout (``g128``, ``row``, a GGML type such as ``Q4_K``; `qanalyze.quant.layouts`) in
    place of ``rows_per_group``: quantization-aware training of a PTQ plan
    (`qanalyze.engine.modules.QATColumnLinear`)."""
    column_symmetric: bool = False
    """Whether the column layout is symmetric (no zero points); a GGML type's own rule decides for it."""

    def __post_init__(self) -> None:
        for name in ("weight_bits", "activation_bits", "gradient_bits"):
            qmax(getattr(self, name))  # raises ConfigError outside 2..16
        get_quantizer(self.quantizer)
        check_weight_range(self.weight_range)
        if self.gradient_group not in GRADIENT_GROUPS:
            raise ConfigError(f"gradient_group {self.gradient_group!r} is not one of {', '.join(GRADIENT_GROUPS)}")


def row_scales(quantized: Quantized, rows: int) -> torch.Tensor:
    """The scale of each of the ``rows`` rows of a quantized 2-D tensor: shape ``(rows,)``, or 0-d per tensor."""
    if quantized.rows_per_group is None:
        return quantized.scale
    return quantized.scale.reshape(-1).repeat_interleave(quantized.rows_per_group, output_size=rows)


def quantize_weight(weight: torch.Tensor, spec: TensorSpec, clip: torch.Tensor | None = None, *,
                    fused: bool = False) -> Quantized:
    """The weight's integer codes and scales as ``spec`` says (nearest rounding, rows of dim 0 grouped),
    each group clipped at its ratio in ``clip`` when given (`weight_clip`). ``fused``: through `fused_quantized`
    where it applies (float32 matrix, one scale per tensor or per row, no clipping): the same result."""
    fits = clip is None and weight.dtype == torch.float32 and weight.dim() == 2 and spec.rows_per_group in (None, 1)
    if fused and fits:
        return fused_quantized(weight, spec.weight_bits, spec.quantizer, per_row=spec.rows_per_group == 1)
    return get_quantizer(spec.quantizer)(weight.detach(), spec.weight_bits, spec.rows_per_group, "nearest", None,
                                         clip=clip)


def weight_clip(weight: torch.Tensor, spec: TensorSpec) -> torch.Tensor | None:
    """The clipping ratios ``spec.weight_range`` sets for ``weight`` (``(out, in)``): None for ``max``, the
    per-group `mse_clip` ratios for ``mse``, searched with the steps ``spec.quantizer`` takes (`Quantizer.step`:
    float16 steps, or powers of two for ``dfp``, where fewer ratios give distinct steps)."""
    if spec.weight_range == "max":
        return None
    return mse_clip(weight.detach(), spec.weight_bits, rows_per_group=spec.rows_per_group,
                    scale_rule=_registered(spec.quantizer).step)


def quantize_tokens(x: torch.Tensor, spec: TensorSpec, *, fused: bool = False) -> Quantized:
    """``x`` flattened to ``(tokens, features)``, each token quantized with its own scale (``spec``'s activation
    bits and quantizer, nearest rounding): the per-token input of the integer linear and of per-token QAT.
    ``fused``: through `fused_quantized` (float32 input): the same result."""
    if fused and x.dtype == torch.float32:
        return fused_quantized(x.reshape(-1, x.shape[-1]), spec.activation_bits, spec.quantizer, per_row=True)
    return get_quantizer(spec.quantizer)(x.detach().reshape(-1, x.shape[-1]).float(), spec.activation_bits, 1,
                                         "nearest", None)


def tensor_scale(x: torch.Tensor, bits: int, quantizer: str) -> torch.Tensor:
    """The one scale ``quantizer`` gives the whole of ``x`` (0-d): computed by quantizing the single
    value ``max|x|``, so it is by construction the scale the full quantizer would choose."""
    low, high = torch.aminmax(x.detach())
    amax = torch.maximum(high, -low).float().reshape(1)
    return get_quantizer(quantizer)(amax, bits, None, "nearest", None).scale


def line_scales(x: torch.Tensor, bits: int, quantizer: str, dim: int) -> torch.Tensor:
    """One scale per row (``dim=1``: reduce along each row) or per column (``dim=0``) of the 2-D ``x``, shaped to
    broadcast against it: what ``quantizer`` gives each line on its own (like `tensor_scale`, by quantizing
    the lines' ``max|x|``)."""
    amax = x.detach().abs().amax(dim=dim).float().reshape(-1, 1)
    scale = get_quantizer(quantizer)(amax, bits, 1, "nearest", None).scale.reshape(-1)
    return scale.unsqueeze(1) if dim == 1 else scale.unsqueeze(0)


def integer_codes(x: torch.Tensor, scale: torch.Tensor, bits: int, noise: torch.Tensor | None = None, *,
                  fused: bool = False) -> torch.Tensor:
    """``clamp(round(x / scale), -qmax, qmax)`` as int8 (<= 8 bits) or int16: nearest rounding, or with
    ``noise`` (uniform [0, 1) draws of x's shape) stochastic rounding ``floor(x/s) + [u < frac(x/s)]``.

    The hot path of the engine: the same values as `qanalyze.quant.primitives` for a per-tensor scale,
    with in-place steps so that no more temporaries than needed are made. ``fused`` (only where
    `qanalyze.engine.kernels.fused_quantize_selected` holds; ``scale`` one value or one per row): the same codes
    from one compiled pass (`fused_codes`), ``noise`` then being the int16 levels of ``draw_noise(...,
    levels=True)``.
    """
    if fused:
        return fused_codes(x, scale, bits, noise)
    limit = qmax(bits)
    values = x.detach().float() / scale
    if noise is None:
        values.round_()
    else:
        low = values.floor()
        values.sub_(low)  # the fraction
        values = low.add_(noise < values)
    values.clamp_(-limit, limit)
    return values.to(torch.int8 if bits <= 8 else torch.int16)


def draw_noise(shape: torch.Size, generator: torch.Generator, device: torch.device, *,
               levels: bool = False) -> torch.Tensor:
    """Uniform [0, 1) float32 draws for stochastic rounding, from ``generator``: the draws of
    `qanalyze.quant.primitives.uniform_noise`, so the codes equal the reference quantizers'. ``levels``: the
    same draws as the int16 levels k that ``uniform_noise`` maps to ``(k + 2**15 + 1/2) / 2**16``, for
    ``integer_codes(..., fused=True)`` (the conversion then happens inside its one pass)."""
    if levels:  # uniform_noise's own draw: 2 bytes per value from random_bytes, read as int16
        return random_bytes(2 * math.prod(shape), generator, device).view(torch.int16).reshape(tuple(shape))
    return uniform_noise(shape, generator, device=device)


def fused_quantized(x: torch.Tensor, bits: int, quantizer: str, *, per_row: bool,
                    levels: torch.Tensor | None = None) -> Quantized:
    """What ``get_quantizer(quantizer)(x, bits, 1 if per_row else None, rounding, generator)`` gives a float32
    matrix ``x`` (nearest rounding, or stochastic from the ``levels`` of ``draw_noise(..., levels=True)`` drawn
    from that generator): the same scales (`tensor_scale`, or the quantizer on each row's ``max|x|``, in its
    ``(rows, 1, 1)`` shape) and the same codes, quantized in one compiled pass (`fused_codes`)."""
    if per_row:
        amax = x.detach().abs().amax(dim=1).reshape(-1, 1)
        scale = get_quantizer(quantizer)(amax, bits, 1, "nearest", None).scale
    else:
        scale = tensor_scale(x, bits, quantizer)
    return Quantized(q=fused_codes(x, scale, bits, levels), scale=scale, zero_point=None, bits=bits,
                     rows_per_group=1 if per_row else None)


class IntLinearFunction(torch.autograd.Function):
    """Integer linear layer: integer GEMMs forward and for both gradients (see the module docstring).

    ``apply(x, weight, bias, spec, generator, frozen)``: ``weight`` is ``(out, in)``; ``frozen`` is an
    already quantized weight (a loaded checkpoint, or a cached one in evaluation) or None. The two
    output-gradient quantizations of one backward share their uniform draws (each product stays
    unbiased; drawing is the most expensive step), and when both the activation and the weight have
    one scale per tensor they are the same quantization, done once.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: TensorSpec,
                generator: torch.Generator, frozen: Quantized | None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        fused = fused_quantize_selected(spec.activation_bits, spec.weight_bits, x.device)
        if spec.per_token:
            xq = quantize_tokens(x2, spec, fused=fused)
            x_codes, s_x = xq.q, row_scales(xq, x2.shape[0]).float().unsqueeze(1)
        else:
            s_x = tensor_scale(x2, spec.activation_bits, spec.quantizer).float().reshape(())
            x_codes = integer_codes(x2, s_x, spec.activation_bits, fused=fused)
        wq = frozen if frozen is not None else quantize_weight(weight, spec, fused=fused)
        s_w = row_scales(wq, weight.shape[0]).float()
        # the scale s_x * s_w of each output, as torch's broadcast forms it: per tensor one vector over columns
        row, col = (None, s_x * s_w) if s_x.dim() == 0 else (s_x, s_w)
        y = int_mm_scaled(x_codes, wq.q.t(), bits_a=spec.activation_bits, bits_b=spec.weight_bits, row_scale=row,
                          col_scale=col, bias=None if bias is None else bias.detach().float())
        ctx.save_for_backward(x_codes, s_x, wq.q, s_w)
        ctx.spec, ctx.generator, ctx.x_shape, ctx.has_bias = spec, generator, x.shape, bias is not None
        return y.reshape(*x.shape[:-1], weight.shape[0]).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_q, s_x, w_q, s_w = ctx.saved_tensors
        spec: TensorSpec = ctx.spec
        bits = spec.gradient_bits
        g2 = grad.reshape(-1, grad.shape[-1]).float()
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        rows = spec.gradient_group == "row"
        # per-column scales (rows: the weight gradient's) take the torch ops, and so the float draws
        fused = fused_quantize_selected(bits, spec.weight_bits, g2.device) and not rows
        noise = draw_noise(g2.shape, ctx.generator, g2.device, levels=fused) if want_x or want_w else None
        shared = s_x.dim() == 0 and s_w.dim() == 0 and not rows
        grad_x = grad_w = grad_b = None
        if shared and want_x and want_w:
            scale = tensor_scale(g2, bits, spec.quantizer)
            codes_x = codes_w = integer_codes(g2, scale, bits, noise, fused=fused)
            scale_x, scale_w = scale * s_w, scale * s_x
        else:
            # per row, the input gradient's scales are per token (rows of G) and the weight gradient's per output
            # channel (columns of G): each product's scale then multiplies whole rows of its result
            if want_x:
                folded = g2 * s_w
                scale_x = line_scales(folded, bits, spec.quantizer, 1) if rows else \
                    tensor_scale(folded, bits, spec.quantizer)
                codes_x = integer_codes(folded, scale_x, bits, noise, fused=fused)
            if want_w:
                folded = g2 * s_x
                scale_w = line_scales(folded, bits, spec.quantizer, 0) if rows else \
                    tensor_scale(folded, bits, spec.quantizer)
                codes_w = integer_codes(folded, scale_w, bits, noise, fused=fused)
                scale_w = scale_w.reshape(-1, 1) if rows else scale_w
        if want_x:
            product = int_mm_scaled(codes_x, w_q, bits_a=bits, bits_b=spec.weight_bits, **_scales(scale_x))
            grad_x = product.reshape(ctx.x_shape).to(grad.dtype)
        if want_w:
            grad_w = int_mm_scaled(codes_w.t(), x_q, bits_a=bits, bits_b=spec.activation_bits,
                                   **_scales(scale_w)).to(grad.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0).to(grad.dtype)
        return grad_x, grad_w, grad_b, None, None, None


def _scales(scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """A product's scale, (rows, 1) or one value, as `int_mm_scaled`'s keyword."""
    return {"row_scale": scale} if scale.dim() == 2 else {"col_scale": scale}


class IntEmbeddingFunction(torch.autograd.Function):
    """Integer embedding: rows of the integer table looked up and rescaled; the gradient is an integer
    scatter-add of the quantized output gradient (int32 accumulation, one scale per tensor).

    ``apply(ids, weight, spec, generator, padding_idx, frozen)``; the padding row gets no gradient,
    as in ``nn.Embedding``. With one scale per tensor or per row only the looked-up rows are
    quantized (the same codes as quantizing the whole table, for a fraction of the work: a batch
    touches a few thousand of 30,522 rows).
    """

    @staticmethod
    def forward(ctx: Any, ids: torch.Tensor, weight: torch.Tensor, spec: TensorSpec, generator: torch.Generator,
                padding_idx: int | None, frozen: Quantized | None) -> torch.Tensor:
        if frozen is None and spec.rows_per_group is None:
            scale = tensor_scale(weight, spec.weight_bits, spec.quantizer)
            out = integer_codes(weight[ids], scale, spec.weight_bits).to(torch.float32).mul_(scale)
        elif frozen is None and spec.rows_per_group == 1:
            rows = get_quantizer(spec.quantizer)(weight.detach()[ids.reshape(-1)].float(), spec.weight_bits, 1,
                                                 "nearest", None)
            out = rows.dequantize().float().reshape(*ids.shape, weight.shape[1])
        else:
            wq = frozen if frozen is not None else quantize_weight(weight, spec)
            scales = row_scales(wq, weight.shape[0]).float()
            out = wq.q[ids].to(torch.float32) * (scales if scales.dim() == 0 else scales[ids].unsqueeze(-1))
        ctx.save_for_backward(ids)
        ctx.spec, ctx.generator, ctx.padding_idx, ctx.weight_shape = spec, generator, padding_idx, weight.shape
        return out.to(weight.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (ids,) = ctx.saved_tensors
        spec: TensorSpec = ctx.spec
        grad_w = None
        if ctx.needs_input_grad[1]:
            g2 = grad.reshape(-1, grad.shape[-1]).float()
            scale = tensor_scale(g2, spec.gradient_bits, spec.quantizer)
            fused = fused_quantize_selected(spec.gradient_bits, spec.gradient_bits, g2.device)
            noise = draw_noise(g2.shape, ctx.generator, g2.device, levels=fused)
            codes = integer_codes(g2, scale, spec.gradient_bits, noise, fused=fused)
            # accumulate over the distinct ids only; int32 holds the sum: a row repeated n times sums to
            # at most n * 32767, and n < 65536 tokens per batch
            distinct, position = torch.unique(ids.reshape(-1), return_inverse=True)
            sums = torch.zeros(len(distinct), g2.shape[1], dtype=torch.int32, device=grad.device)
            sums.index_add_(0, position, codes.to(torch.int32))
            grad_w = torch.zeros(ctx.weight_shape, dtype=torch.float32, device=grad.device)
            grad_w[distinct] = sums.to(torch.float32).mul_(scale)
            if ctx.padding_idx is not None:
                grad_w[ctx.padding_idx] = 0
            grad_w = grad_w.to(grad.dtype)
        return None, grad_w, None, None, None, None


class IntLayerNormFunction(torch.autograd.Function):
    """Layer norm on integer inputs: the mean and variance come from exact integer sums of the
    quantized input (Σq, Σq² in int64, one scale per token); the division and square root, and the backward formula
    applied to the quantized output gradient and quantized gain, are float.

    ``apply(x, weight, bias, spec, generator, eps)``.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: TensorSpec,
                generator: torch.Generator, eps: float) -> torch.Tensor:
        quantize = get_quantizer(spec.quantizer)
        width = x.shape[-1]
        x2 = x.reshape(-1, width).detach().float()
        gain = get_quantizer(spec.quantizer)(weight.detach().float(), spec.weight_bits, None, "nearest", None)
        gamma = gain.dequantize().float()
        # one scale per token: the statistics are per token, so a token's own exponent costs nothing and
        # keeps the tokens whose residual stream is small from being flattened by the loudest one
        if fused_quantize_selected(spec.activation_bits, spec.activation_bits, x.device):
            xq = fused_quantized(x2, spec.activation_bits, spec.quantizer, per_row=True)
            xhat, y, rstd = fused_layer_norm(xq.q, xq.scale, gamma, bias, eps)  # the same values as below
        else:
            xq = quantize(x2, spec.activation_bits, 1, "nearest", None)
            scale = xq.scale.reshape(-1, 1).double()
            q = xq.q.to(torch.int64)
            sum1 = q.sum(-1, keepdim=True)
            sum2 = (q * q).sum(-1, keepdim=True)
            mean_q = sum1.double() / width
            var = (sum2.double() / width - mean_q * mean_q) * scale**2
            rstd64 = torch.rsqrt(var + eps)
            xhat = ((q.double() - mean_q) * scale * rstd64).float()
            rstd = rstd64.float()
            y = xhat * gamma
            if bias is not None:
                y = y + bias.detach().float()
        ctx.save_for_backward(xhat, gamma, rstd)
        ctx.spec, ctx.generator, ctx.x_shape, ctx.has_bias = spec, generator, x.shape, bias is not None
        return y.reshape(x.shape).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xhat, gamma, rstd = ctx.saved_tensors
        spec: TensorSpec = ctx.spec
        g2 = grad.reshape(-1, grad.shape[-1]).float()
        if fused_quantize_selected(spec.gradient_bits, spec.gradient_bits, g2.device):
            levels = draw_noise(g2.shape, ctx.generator, g2.device, levels=True)
            gq = fused_quantized(g2, spec.gradient_bits, spec.quantizer, per_row=False, levels=levels)
        else:
            gq = get_quantizer(spec.quantizer)(g2, spec.gradient_bits, None, "stochastic", ctx.generator)
        g = gq.dequantize().float()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            dxhat = g * gamma
            grad_x = rstd * (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True))
            grad_x = grad_x.reshape(ctx.x_shape).to(grad.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (g * xhat).sum(0).to(grad.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0).to(grad.dtype)
        return grad_x, grad_w, grad_b, None, None, None


def straight_through(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` in the forward pass, the identity to ``x`` in the backward (the straight-through estimator)."""
    return x + (value.to(x.dtype) - x).detach()


def fake_quantize_ste(x: torch.Tensor, bits: int, rows_per_group: int | None = None,
                      scale: torch.Tensor | None = None) -> torch.Tensor:
    """Q8BERT fake quantization with a straight-through estimator: forward ``Q(x)``, backward identity.

    With ``scale`` (an EMA-calibrated activation scale) values beyond ``±qmax·scale`` are clipped;
    without it the scale is ``max|x|/qmax`` per group.
    """
    if scale is None:
        quantized = quantize_symmetric(x.detach(), bits, rows_per_group=rows_per_group).dequantize()
    else:
        limit = qmax(bits)
        quantized = torch.round(x.detach() / scale).clamp(-limit, limit) * scale
    return straight_through(x, quantized)
