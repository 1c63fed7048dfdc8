"""Quantization error of weights, activations and gradients, measured on real batches through hooks.

For each module and bit-width:
- weight error ``‖Q_b(W) − W‖²`` per candidate group layout (pure, from `qanalyze.quant.primitives` for row
  layouts and `qanalyze.quant.columns` for column layouts, `qanalyze.quant.layouts`);
- activation error ``E‖Q_b(X) − X‖²`` of the module input X (per-tensor symmetric, nearest
  rounding, as dynamic activation quantization does), per example, averaged over batches; with it
  the relative error and ``E[Σ (∂L/∂X)² (Q_b(X) − X)²]``, the second-order loss change the planner
  weighs activation bits by;
- gradient error of a linear layer when its output gradient G is quantized to b bits with
  stochastic rounding: relative error of the weight gradient Gᵀ·X and of the input gradient G·W,
  and their bias: the relative norm of the mean error over ``draws`` roundings. Stochastic
  rounding is unbiased, so that mean shrinks like 1/√draws; ``bias_floor`` (the error divided by
  √draws) is recorded beside it, and a bias well above its floor means clipping or a bug.

One forward and one backward pass per batch serve every module and bit-width: the hooks compute
the errors at once and keep only running sums, never the tensors.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from qanalyze.errors import ConfigError
from qanalyze.models import ModuleInfo
from qanalyze.quant.layouts import column_fits, is_column_layout, parse_layout, quantize_layout
from qanalyze.quant.primitives import (
    check_bits,
    fake_quantize,
    qmax,
    rows_per_group,
    symmetric_scale,
    weight_errors,
)

WEIGHT_ERROR_CHUNK = 1 << 18
"""`all_weight_errors` works through a weight in blocks of rows of about this many elements, so every bit-width
and group layout reads a block while it is in cache. Measured on minilm-l6 (54 weights, 15 bit-widths, 6 layouts,
2 cores shared with other jobs, AVX2 emulated): 1.0 s, against 99 s for one `weight_errors` call per weight, which
streams the 11.7M-entry word-embedding table through memory in float32 and float64 for each of 75 candidates.
Blocks of 2^16 elements were far slower when another process held a core (many small parallel ops wait on
each other), whole tensors 5 to 10 times slower (out of cache)."""


@dataclass
class ErrorSums:
    """Running sums of one module's activation and gradient errors over batches."""

    batches: int = 0
    draws: int = 1
    activation: dict[int, float] = field(default_factory=lambda: defaultdict(float))
    activation_relative: dict[int, float] = field(default_factory=lambda: defaultdict(float))
    activation_weighted: dict[int, float] = field(default_factory=lambda: defaultdict(float))
    weight_grad: dict[int, float] = field(default_factory=lambda: defaultdict(float))
    input_grad: dict[int, float] = field(default_factory=lambda: defaultdict(float))
    weight_grad_bias: dict[int, float] = field(default_factory=lambda: defaultdict(float))
    input_grad_bias: dict[int, float] = field(default_factory=lambda: defaultdict(float))

    def summary(self) -> dict[str, dict[str, object]]:
        """Means over batches, keyed as in sensitivity.json (bits as strings)."""
        n = max(self.batches, 1)
        result: dict[str, dict[str, object]] = {
            "activation_error": {str(b): v / n for b, v in sorted(self.activation.items())},
            "activation_relative_error": {str(b): v / n for b, v in sorted(self.activation_relative.items())},
            "activation_weighted_error": {str(b): v / n for b, v in sorted(self.activation_weighted.items())},
        }
        if self.weight_grad:
            result["gradient_error"] = {
                str(b): {"weight_grad": self.weight_grad[b] / n, "input_grad": self.input_grad[b] / n,
                         "weight_grad_bias": self.weight_grad_bias[b] / n,
                         "input_grad_bias": self.input_grad_bias[b] / n,
                         "draws": self.draws, "bias_floor": self.weight_grad[b] / n / math.sqrt(self.draws)}
                for b in sorted(self.weight_grad)
            }
        return result


ACTIVATION_FIELDS = ("activation", "activation_relative", "activation_weighted")
GRADIENT_FIELDS = ("weight_grad", "input_grad", "weight_grad_bias", "input_grad_bias")


def reduce_error_sums(sums: dict[str, ErrorSums], bits: Sequence[int], gradient_bits: Sequence[int]) -> None:
    """Replace every module's sums by their totals over all ranks (`qanalyze.distributed`; nothing when not
    distributed). A field no rank measured stays empty, as it would in one process."""
    from qanalyze.distributed import all_reduce_floats, world

    if not world().distributed:
        return
    layout = [(name, fld, tuple(bits) if fld in ACTIVATION_FIELDS else tuple(gradient_bits))
              for name in sorted(sums) for fld in (*ACTIVATION_FIELDS, *GRADIENT_FIELDS)]
    flat: list[float] = [float(sums[name].batches) for name in sorted(sums)]
    for name, fld, keys in layout:
        values = getattr(sums[name], fld)
        flat += [1.0 if values else 0.0, *(values.get(b, 0.0) for b in keys)]
    total = iter(all_reduce_floats(flat))
    for name in sorted(sums):
        sums[name].batches = round(next(total))
    for name, fld, keys in layout:
        present = next(total) > 0
        values = [next(total) for _ in keys]
        setattr(sums[name], fld, defaultdict(float, zip(keys, values)) if present else defaultdict(float))


def all_weight_errors(
    weight: torch.Tensor,
    bits_list: Sequence[int],
    groups: Sequence[str | int],
    *,
    head_dim: int | None = None,
    weight_range: str = "max",
) -> dict[int, dict[str, float]]:
    """``{bits: {group: ||Q(W) - W||^2}}`` of every candidate: row layouts by `row_weight_errors`, column layouts
    (``g32``, ``g64``, ``g128``, ``row``) by `column_weight_errors`; layouts that do not fit are left out."""
    names = list(dict.fromkeys(parse_layout(group) for group in groups))
    rows = [g for g in names if not is_column_layout(g)]
    columns = [g for g in names if is_column_layout(g)]
    found = row_weight_errors(weight, bits_list, rows, head_dim=head_dim, weight_range=weight_range) if rows else \
        {bits: {} for bits in bits_list}
    for bits, errors in column_weight_errors(weight, bits_list, columns).items():
        found[bits].update(errors)
    return found


def column_weight_errors(weight: torch.Tensor, bits_list: Sequence[int],
                         groups: Sequence[str]) -> dict[int, dict[str, float]]:
    """``{bits: {layout: ||ΔW||^2}}`` of the column candidates, ΔW = ``quantize_columns(W, ColumnSpec(bits, G,
    symmetric=False)).dequantize() - W`` (float16 scales, zero points), or a GGML type's own (`quantize_layout`),
    squared and summed in float64.

    A 2-d weight only (columns = dim 1); a layout whose G does not divide the width, or bits outside 2..8, is
    left out (`qanalyze.quant.layouts.column_fits`). Which modules take column layouts is the caller's choice."""
    for bits in bits_list:
        check_bits(bits)
    found: dict[int, dict[str, float]] = {bits: {} for bits in bits_list}
    if weight.dim() != 2 or weight.numel() == 0:
        return found
    x = weight.detach()
    x = x if x.dtype in (torch.float32, torch.float64) else x.float()
    for group in groups:
        for bits in bits_list:
            if column_fits(bits, group, x.shape[1]):
                difference = quantize_layout(x, bits, group).dequantize().to(x.dtype).sub_(x)
                found[bits][group] = float(torch.sum(difference.to(torch.float64).square_()))
    return found


def row_weight_errors(
    weight: torch.Tensor,
    bits_list: Sequence[int],
    groups: Sequence[str | int],
    *,
    head_dim: int | None = None,
    weight_range: str = "max",
) -> dict[int, dict[str, float]]:
    """`qanalyze.quant.primitives.weight_errors` for many row-layout candidates at once: ``{bits: {group:
    ||Q(W) - W||^2}}``.

    With ``weight_range="max"`` and a float32 or float64 weight, each group's max|w| is taken once from the
    rows' maxima, and the weight is read in blocks of rows (`WEIGHT_ERROR_CHUNK`) that serve every bit-width
    and layout while they are in cache. The quantized values are the same as `weight_errors`' (the same
    scale, division, rounding and clamp); the difference Q(w) - w is exact in the weight's dtype (Sterbenz:
    |Q(w) - w| <= s / 2 puts Q(w) within a factor 2 of w), and squared and summed in float64, so the
    results agree with it up to the order of summation. Other cases go to `weight_errors`.
    """
    if weight_range != "max" or weight.dtype not in (torch.float32, torch.float64) or weight.dim() < 1:
        return weight_errors(weight, bits_list, groups, head_dim=head_dim, weight_range=weight_range)
    for bits in bits_list:
        check_bits(bits)
    x = weight.detach()
    rows = x.shape[0]
    if x.numel() == 0:
        return weight_errors(weight, bits_list, groups, head_dim=head_dim, weight_range=weight_range)
    x = x.reshape(rows, -1)
    row_max = x.abs().amax(dim=1)
    # per layout and bit-width, each row's step (rows of one group share it), as `quantize_symmetric` sets it
    steps: dict[str, dict[int, torch.Tensor]] = {}
    for name in dict.fromkeys(parse_layout(group) for group in groups):
        try:
            per_group = rows_per_group(rows, name, head_dim=head_dim)
        except ConfigError:
            continue  # this layout does not fit this weight: `weight_errors` leaves it out too
        group_max = row_max.amax() if per_group is None else row_max.view(-1, per_group).amax(dim=1)
        steps[name] = {}
        for bits in bits_list:
            scale = symmetric_scale(group_max, bits)
            scale = scale.expand(rows) if per_group is None else scale.repeat_interleave(per_group)
            steps[name][bits] = scale.unsqueeze(1)
    sums = torch.zeros(len(bits_list), len(steps), dtype=torch.float64, device=x.device)
    block = max(1, WEIGHT_ERROR_CHUNK // x.shape[1])
    for start in range(0, rows, block):
        part = x[start:start + block]
        for j, by_bits in enumerate(steps.values()):
            for i, bits in enumerate(bits_list):
                step = by_bits[bits][start:start + block]
                limit = qmax(bits)
                difference = torch.round(part / step).clamp_(-limit, limit).mul_(step).sub_(part).reshape(-1)
                # squared in float64, as `quantization_error` does (the difference itself is exact)
                difference = difference.to(torch.float64)
                sums[i, j] += torch.dot(difference, difference)
    values = sums.tolist()
    return {bits: dict(zip(steps, values[i])) for i, bits in enumerate(bits_list)}


def _norm(x: torch.Tensor) -> float:
    # Frobenius norm accumulated in float64 (no float64 copy of the tensor).
    return math.sqrt(float(torch.sum(x * x, dtype=torch.float64)))


def _ratio(error_norm: float, reference_norm: float) -> float:
    return error_norm / reference_norm if reference_norm > 0 else 0.0


def _relative(error: torch.Tensor, reference: torch.Tensor) -> float:
    return _ratio(_norm(error), _norm(reference))


def _linear_weight(module: nn.Module, info: ModuleInfo) -> torch.Tensor:
    # GPT-2's Conv1D stores (in, out); the maths below wants (out, in) like nn.Linear.
    return module.weight.t() if info.transposed else module.weight


class ErrorProbe:
    """Hooks on the chosen modules that accumulate activation and gradient errors per batch.

    Use as a context manager around a forward and backward pass; call `end_batch` after each.
    """

    def __init__(self, modules: dict[str, nn.Module], infos: dict[str, ModuleInfo], *, bits: Sequence[int],
                 gradient_bits: Sequence[int], generator: torch.Generator, draws: int = 4) -> None:
        self.modules, self.infos = modules, infos
        self.bits, self.gradient_bits = tuple(bits), tuple(gradient_bits)
        self.generator, self.draws = generator, draws
        self.sums = {name: ErrorSums(draws=draws) for name in modules}
        self._inputs: dict[str, torch.Tensor] = {}
        self._pending: dict[int, tuple[str, torch.Tensor, int]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> ErrorProbe:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._on_input(name)))
            if self.infos[name].kind == "linear" and self.gradient_bits:
                self._handles.append(module.register_full_backward_hook(self._on_output_grad(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._inputs.clear()
        self._pending.clear()

    def _on_input(self, name: str):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0]
            if not torch.is_floating_point(x):  # embeddings take token ids: nothing to quantize
                return
            examples = x.shape[0] if x.ndim > 1 else 1
            if self.infos[name].kind == "linear":
                self._inputs[name] = x.detach()
            if x.requires_grad:
                # Both activation errors in the backward hook: each Q_b(X) is computed once, not twice.
                # Until then the input waits in `_pending`, so `end_batch` can still measure an input
                # whose gradient never came (a module the loss does not depend on).
                key = len(self._pending)
                self._pending[key] = (name, x.detach(), examples)
                x.register_hook(self._on_input_grad(key))
            else:
                self._activation_errors(name, x.detach(), None, examples)

        return hook

    def _on_input_grad(self, key: int):
        def hook(grad: torch.Tensor) -> None:
            pending = self._pending.pop(key, None)
            if pending is not None:
                name, x, examples = pending
                self._activation_errors(name, x, grad.detach(), examples)

        return hook

    def _activation_errors(self, name: str, x: torch.Tensor, grad: torch.Tensor | None, examples: int) -> None:
        sums = self.sums[name]
        with torch.no_grad():
            flat = x.reshape(-1)
            g2 = None if grad is None else grad.reshape(-1).square()
            for b in self.bits:
                err = fake_quantize(flat, b) - flat
                squared = err * err
                sums.activation[b] += float(torch.sum(squared, dtype=torch.float64)) / examples
                sums.activation_relative[b] += _relative(err, flat)
                if g2 is not None:
                    sums.activation_weighted[b] += float(torch.sum(g2 * squared, dtype=torch.float64)) / examples

    def _on_output_grad(self, name: str):
        def hook(module: nn.Module, grad_input: tuple, grad_output: tuple) -> None:
            x = self._inputs.pop(name, None)
            if x is None or grad_output[0] is None:
                return
            with torch.no_grad():
                g = grad_output[0].detach().reshape(-1, grad_output[0].shape[-1])
                xs = x.reshape(-1, x.shape[-1])
                # Rows with a zero output gradient (padding, tokens the loss does not read) add nothing to
                # G^T X or G W, and stochastic rounding keeps a zero at zero, so they are left out: the
                # products shrink by the batch's padding. The per-tensor scale, max|G|, is the same.
                live = g.abs().amax(dim=1) > 0
                if not bool(live.all()):
                    g, xs = g[live], xs[live]
                w = _linear_weight(module, self.infos[name]).detach()
                weight_norm = _norm(g.t() @ xs)
                input_norm = _norm(g @ w)
                sums = self.sums[name]
                rows = g.shape[0]
                for b in self.gradient_bits:
                    # All draws of one bit-width in one product each way: G's errors stacked side by side.
                    dg = torch.stack([fake_quantize(g, b, rounding="stochastic", generator=self.generator) - g
                                      for _ in range(self.draws)])
                    dw = dg.transpose(1, 2).reshape(-1, rows) @ xs  # (draws * out, in)
                    dx = dg.reshape(-1, g.shape[1]) @ w  # (draws * rows, in)
                    sums.weight_grad[b] += sum(_ratio(_norm(d), weight_norm) for d in dw.chunk(self.draws)) / self.draws
                    sums.input_grad[b] += sum(_ratio(_norm(d), input_norm) for d in dx.chunk(self.draws)) / self.draws
                    # linear in G: the mean error of the products is the product of the mean error
                    mean_dg = dg.mean(dim=0)
                    sums.weight_grad_bias[b] += _ratio(_norm(mean_dg.t() @ xs), weight_norm)
                    sums.input_grad_bias[b] += _ratio(_norm(mean_dg @ w), input_norm)

        return hook

    def end_batch(self) -> None:
        """Close one batch: every module's sums now hold one more batch."""
        for name, x, examples in self._pending.values():
            self._activation_errors(name, x, None, examples)
        self._pending.clear()
        for sums in self.sums.values():
            sums.batches += 1
        self._inputs.clear()
