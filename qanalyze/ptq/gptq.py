"""GPTQ (Frantar et al. 2023): quantize a linear layer's weight column by column, spreading each column's
rounding error over the columns not yet quantized so that the layer's output ``W X`` moves least.

Given the layer Hessian ``H = 2 XᵀX`` of the calibration inputs ``X`` (tokens x in):

1. dead columns (``H_jj = 0``: an input that is always zero) get ``H_jj = 1`` and weight 0, as the authors'
   code does, so that H stays invertible and the column's (unused) weights quantize to zero;
2. with ``act_order`` the columns are taken by descending ``H_jj`` (the most active inputs first);
3. ``damp · mean(diag H)`` is added to the diagonal (``damp`` default 0.01);
4. ``U`` = the upper Cholesky factor of ``H⁻¹``; for each column ``j`` in turn: quantize it with its group's
   scale, ``err = (w_j − q_j) / U_jj``, and subtract ``err · U_j,k`` from every later column ``k``;
5. the updates are applied lazily: within a block of ``block_size`` columns at once, to the rest of the
   matrix once per block (the same arithmetic, regrouped: it only changes floating-point rounding).

Group scales are computed when a group's first column is reached, from the group's columns as they are
at that moment, that is, with every earlier column's error already spread over them. (The authors' code and
GPTQModel compute them from the weights as they stood at the start of the current 128-column block, which
for groups smaller than a block leaves out the updates of the block's earlier columns; here the scales are
those of the unblocked algorithm, so the blocked and the plain algorithm give the same codes.)

With ``static_groups`` (always with ``act_order``) every group's scale is computed once, before any update, from
the original weights in their original column order: the groups stay contiguous runs of columns in storage
(no per-column group index), whatever order the columns are quantized in.

The codes come back in the original column order, in the same `ColumnQuantized` structure as RTN.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from qanalyze.errors import ConfigError
from qanalyze.quant.columns import (
    ColumnQuantized,
    ColumnSpec,
    code_dtype,
    column_codes,
    group_params,
)
from qanalyze.quant.primitives import is_positive_int

RETRY_DAMP_FACTOR = 10.0
"""When H plus the dampening is not positive definite, the dampening is raised this many times, once."""


class HessianError(ConfigError):
    """A layer Hessian that stays not positive definite after the raised dampening (exit 2, naming the layer)."""


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ's settings: ``damp`` (fraction of mean diag H added to the diagonal), ``block_size`` (columns
    per lazy block), ``act_order`` (columns by descending diag H) and ``static_groups`` (group scales
    fixed before any update, in the original column order; None: the same as ``act_order``)."""

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    static_groups: bool | None = None

    def __post_init__(self) -> None:
        if isinstance(self.damp, bool) or not isinstance(self.damp, int | float) or not (
                math.isfinite(self.damp) and self.damp >= 0):
            raise ConfigError(f"damp must be a finite number >= 0 (a fraction of mean diag H), not {self.damp!r}")
        if not is_positive_int(self.block_size):
            raise ConfigError(f"block_size must be a positive number of columns, not {self.block_size!r}")
        if not isinstance(self.act_order, bool):
            raise ConfigError(f"act_order must be True or False, not {self.act_order!r}")
        if self.static_groups is not None and not isinstance(self.static_groups, bool):
            raise ConfigError(f"static_groups must be True, False or None, not {self.static_groups!r}")
        if self.act_order and self.static_groups is False:
            raise ConfigError("act_order needs static groups: groups formed in activation order would not be "
                              "contiguous columns in storage")

    @property
    def static(self) -> bool:
        """Whether group scales are fixed before any update (``static_groups``, defaulting to ``act_order``)."""
        return self.act_order if self.static_groups is None else self.static_groups


@dataclass(frozen=True)
class GPTQResult:
    """One layer's GPTQ outcome: the codes and scales, GPTQ's own error estimate
    ``loss = ½ Σ (w − q)² / U_jj²`` (the increase of ``½·tr(ΔW H ΔWᵀ)`` the algorithm tracks), the absolute
    dampening added to the diagonal, the number of dead columns, and whether the dampening was raised."""

    quantized: ColumnQuantized
    loss: float
    damp: float
    dead_columns: int
    damp_raised: bool


def _check_inputs(weight: torch.Tensor, hessian: torch.Tensor, where: str) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.numel() == 0:
        raise ConfigError(f"{where}: GPTQ quantizes a non-empty 2-d weight (out, in)")
    columns = weight.shape[1]
    if not isinstance(hessian, torch.Tensor) or tuple(hessian.shape) != (columns, columns):
        shape = tuple(hessian.shape) if isinstance(hessian, torch.Tensor) else type(hessian).__name__
        raise ConfigError(f"{where}: the Hessian must be ({columns}, {columns}) for {columns} input columns, "
                          f"not {shape}")
    if not bool(torch.isfinite(hessian).all()) or not bool(torch.isfinite(weight).all()):
        raise ConfigError(f"{where}: the weight or its Hessian holds inf or nan")


def _upper_cholesky_of_inverse(hessian: torch.Tensor, damp: float) -> torch.Tensor | None:
    """Upper Cholesky factor of ``(H + damp·I)⁻¹``, or None when ``H + damp·I`` is not positive definite."""
    damped = hessian.clone()
    damped.diagonal().add_(damp)
    lower, info = torch.linalg.cholesky_ex(damped)
    if int(info):
        return None
    upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    return None if int(info) else upper


def _inverse_factor(hessian: torch.Tensor, damp: float, where: str) -> tuple[torch.Tensor, float, bool]:
    upper = _upper_cholesky_of_inverse(hessian, damp)
    if upper is not None:
        return upper, damp, False
    raised = damp * RETRY_DAMP_FACTOR if damp > 0 else 1e-2 * float(hessian.diagonal().mean())
    warnings.warn(f"{where}: the layer Hessian is not positive definite with dampening {damp:.3g}; "
                  f"retrying once with {raised:.3g}", RuntimeWarning, stacklevel=3)
    upper = _upper_cholesky_of_inverse(hessian, raised)
    if upper is None:
        raise HessianError(f"{where}: the layer Hessian is not positive definite even with dampening {raised:.3g}; "
                           "raise --damp or calibrate on more windows")
    return upper, raised, True


def _static_params(weight: torch.Tensor, spec: ColumnSpec,
                   width: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Every group's (scale, zero point), from ``weight`` in its original column order."""
    return [group_params(weight[:, start:start + width], spec) for start in range(0, weight.shape[1], width)]


def gptq_quantize(weight: torch.Tensor, spec: ColumnSpec, hessian: torch.Tensor, config: GPTQConfig | None = None,
                  *, where: str = "the weight") -> GPTQResult:
    """Quantize ``weight`` ``(out, in)`` to ``spec``'s column groups by GPTQ with the layer Hessian ``hessian``
    ``(in, in)`` (``2 XᵀX`` up to a positive factor, which changes nothing). Works in float64 when the
    Hessian is float64, else float32; neither input is modified. See the module docstring for the steps."""
    config = config or GPTQConfig()
    _check_inputs(weight, hessian, where)
    with _one_thread():
        return _gptq(weight, spec, hessian, config, where)


def _gptq(weight: torch.Tensor, spec: ColumnSpec, hessian: torch.Tensor, config: GPTQConfig,
          where: str) -> GPTQResult:
    out_features, columns = weight.shape
    width = spec.width(columns, where=where)
    dtype = torch.float64 if hessian.dtype == torch.float64 else torch.float32
    work = weight.detach().to(dtype).clone()
    h = hessian.detach().to(dtype).clone()

    dead = (h.diagonal() == 0).nonzero().flatten()
    h[dead, dead] = 1
    work[:, dead] = 0
    static = _static_params(work, spec, width) if config.static else None

    perm = torch.argsort(h.diagonal(), descending=True, stable=True) if config.act_order else None
    if perm is not None:
        work = work[:, perm]
        h = h[perm][:, perm]
    upper, damp, raised = _inverse_factor(h, config.damp * float(h.diagonal().mean()), where)

    codes = torch.zeros(out_features, columns, dtype=dtype)
    scales = torch.empty(out_features, spec.groups(columns), dtype=dtype)
    zeros = None if spec.symmetric else torch.empty_like(scales)
    if static is not None:
        for index, (scale, zero) in enumerate(static):
            scales[:, index:index + 1] = scale
            if zeros is not None:
                zeros[:, index:index + 1] = zero
    loss = torch.zeros((), dtype=dtype)
    scale = zero = None
    for first in range(0, columns, config.block_size):
        last = min(first + config.block_size, columns)
        block = work[:, first:last].clone()
        errors = torch.zeros_like(block)
        factor = upper[first:last, first:last]
        for i in range(last - first):
            column = first + i
            if static is not None:
                original = int(perm[column]) if perm is not None else column
                scale, zero = static[original // width]
            elif column % width == 0:
                scale, zero = group_params(_current(work, block, errors, upper, first, i, width), spec)
                scales[:, column // width:column // width + 1] = scale
                if zeros is not None:
                    zeros[:, column // width:column // width + 1] = zero
            w = block[:, i:i + 1]
            code = column_codes(w, scale, zero, spec.bits)
            q = (code if zero is None else code - zero.to(code.dtype)) * scale.to(dtype)
            codes[:, column:column + 1] = code
            d = factor[i, i]
            err = (w - q.to(dtype)) / d
            loss += err.square().sum()
            block[:, i:] -= err * factor[i:i + 1, i:]
            errors[:, i:i + 1] = err
        work[:, last:] -= errors @ upper[first:last, last:]

    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    int_dtype = code_dtype(spec)
    quantized = ColumnQuantized(q=codes.to(int_dtype), scale=scales.to(_scale_dtype(weight)),
                                zero_point=None if zeros is None else zeros.to(int_dtype), spec=spec)
    return GPTQResult(quantized=quantized, loss=float(loss) / 2, damp=damp, dead_columns=int(dead.numel()),
                      damp_raised=raised)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run GPTQ on one thread: its thousands of per-column steps are small ops, and with two OpenMP threads each
    pays a fork and join, far more when another process holds a core. A 576 x 1536 layer on a 2-core machine
    under load: 0.6 s on one thread every time, 2 to 9 s on two (and 0.9 to 10 s with two threads kept for the
    block updates only)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _scale_dtype(weight: torch.Tensor) -> torch.dtype:
    # the primitives' convention: float64 scales for a float64 weight, else float32
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _current(work: torch.Tensor, block: torch.Tensor, errors: torch.Tensor, upper: torch.Tensor,
             first: int, i: int, width: int) -> torch.Tensor:
    """The group starting at column ``first + i`` as the unblocked algorithm sees it: its columns inside the
    current block are up to date in ``block``; those beyond it still lack the block's pending updates."""
    inside = block[:, i:i + width]
    missing = width - inside.shape[1]
    if missing <= 0:
        return inside
    last = first + block.shape[1]
    beyond = work[:, last:last + missing] - errors @ upper[first:last, last:last + missing]
    return torch.cat([inside, beyond], dim=1)
