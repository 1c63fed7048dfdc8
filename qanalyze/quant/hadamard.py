"""Block Hadamard transform (the Hadamard quantizer of the INT4 training paper, Xi et al. 2023): pure maths.

``H_k`` is the normalized Sylvester Hadamard matrix: ``H_1 = [1]``, ``H_2k = [[H_k, H_k], [H_k, -H_k]] / sqrt(2)``
for k a power of two up to 1024. It is orthonormal and symmetric, so ``H_k^{-1} = H_kᵀ = H_k``. The
block-diagonal ``H = diag(H_k, ..., H_k)`` acting on the last dimension of a tensor mixes each run of ``k``
consecutive features: an outlier feature is spread over its ``k`` neighbours, which shrinks the range a
4-bit quantizer must cover. Because ``H`` is orthonormal, ``X Wᵀ = (X H)(W H)ᵀ``: quantizing ``X H`` and
``W H`` and multiplying them approximates the original product with no inverse transform in the forward pass.

Nothing here keeps state or changes its inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from qanalyze.errors import ConfigError
from qanalyze.quant.primitives import quantization_error

MAX_BLOCK = 1024
"""Largest Hadamard block size."""

BLOCK_SIZES = tuple(2**e for e in range(11))
"""Every supported block size, 1 to 1024: the default candidates of `choose_block`."""


def check_block(k: int) -> None:
    """Raise ConfigError unless ``k`` is a power of two from 1 to 1024."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k > MAX_BLOCK or k & (k - 1):
        raise ConfigError(f"a Hadamard block size must be a power of two from 1 to {MAX_BLOCK}, not {k!r}")


def hadamard_matrix(k: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
                    ) -> torch.Tensor:
    """The normalized Sylvester Hadamard matrix ``H_k`` (k x k, entries ±1/sqrt(k)), orthonormal and symmetric."""
    check_block(k)
    matrix = torch.ones(1, 1, dtype=torch.float64, device=device)
    while matrix.shape[0] < k:
        matrix = torch.cat((torch.cat((matrix, matrix), 1), torch.cat((matrix, -matrix), 1)), 0)
    # the ±1 matrix is exact; one division at the end rounds each entry once instead of once per level
    return (matrix / math.sqrt(k)).to(dtype)


def block_hadamard(x: torch.Tensor, k: int) -> torch.Tensor:
    """``x @ diag(H_k, ..., H_k)`` along the last dimension, by a fast Walsh-Hadamard transform.

    ``log2(k)`` butterfly stages (``a + b``, ``a - b`` on pairs ``h`` apart, ``h = 1, 2, ..., k/2``: exactly
    the Sylvester recursion) then one scaling by ``1/sqrt(k)``: ``O(n log k)`` work against ``O(n k)`` for
    the dense product. The transform is orthonormal and symmetric, so it is its own inverse:
    ``block_hadamard(block_hadamard(x, k), k) == x`` up to rounding. Differentiable (plain tensor ops).

    ``k = 1`` is the identity and returns ``x`` itself. Half-precision inputs are transformed in float32 and
    returned in their own dtype. Raises ConfigError when ``k`` is not a power of two up to 1024, when the
    last dimension is not a multiple of ``k``, or for a non-floating-point tensor.
    """
    check_block(k)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ConfigError(f"the Hadamard transform needs a floating-point tensor, not {getattr(x, 'dtype', type(x))}")
    if x.dim() < 1 or x.shape[-1] % k:
        width = x.shape[-1] if x.dim() else "no"
        raise ConfigError(f"Hadamard block size {k} does not divide the last dimension ({width} features) "
                          f"of a tensor of shape {tuple(x.shape)}")
    if k == 1:
        return x
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    lead, width = work.shape[:-1], work.shape[-1]
    half = 1
    while half < k:
        # element (block, t, j) of this view is feature block * 2h + t * h + j: the pairs (t = 0, t = 1)
        # are h apart inside each run of 2h, which is one stage of the Sylvester recursion
        pairs = work.reshape(*lead, width // (2 * half), 2, half)
        a, b = pairs.select(-2, 0), pairs.select(-2, 1)
        work = torch.stack((a + b, a - b), dim=-2).reshape(*lead, width)
        half *= 2
    return (work * (1.0 / math.sqrt(k))).to(x.dtype)


def block_errors(x: torch.Tensor, w: torch.Tensor, candidates: Sequence[int] = BLOCK_SIZES, bits: int = 4
                 ) -> dict[int, float]:
    """``{k: ‖Q(XH)Hᵀ − X‖ · ‖Q(WH)Hᵀ − W‖}`` for every candidate ``k`` that divides the in-features.

    ``x`` is ``(..., in)`` (an activation batch), ``w`` is ``(out, in)``. ``Q`` is the symmetric ``bits``-bit
    quantizer with one scale per tensor taken from the **max abs** (`qanalyze.quant.primitives.quantize_symmetric`,
    nearest rounding): a deterministic, data-only criterion, where a learned step size would depend on the
    training that follows the choice. Since ``H`` is orthonormal, ``‖Q(XH)Hᵀ − X‖ = ‖Q(XH) − XH‖``, so no
    inverse transform is computed. Errors are accumulated in float64. Raises ConfigError when the in-features
    of ``x`` and ``w`` differ, a candidate is not a power of two up to 1024, or none divides the in-features.
    """
    if x.shape[-1] != w.shape[-1] or w.dim() != 2:
        raise ConfigError(f"x {tuple(x.shape)} and weight {tuple(w.shape)} must share their last dimension "
                          f"(in-features), with a 2-D weight")
    for k in candidates:
        check_block(k)
    width = w.shape[-1]
    fitting = sorted({k for k in candidates if width % k == 0})
    if not fitting:
        raise ConfigError(f"no Hadamard block size among {tuple(candidates)} divides the {width} in-features")
    x2 = x.detach().reshape(-1, width)
    w2 = w.detach()
    errors: dict[int, float] = {}
    for k in fitting:
        x_error = quantization_error(block_hadamard(x2, k), bits)
        w_error = quantization_error(block_hadamard(w2, k), bits)
        errors[k] = math.sqrt(x_error) * math.sqrt(w_error)
    return errors


def choose_block(x: torch.Tensor, w: torch.Tensor, candidates: Sequence[int] = BLOCK_SIZES, bits: int = 4) -> int:
    """The block size ``k`` that minimizes ``‖Q(XH)Hᵀ − X‖ · ‖Q(WH)Hᵀ − W‖`` (see `block_errors`) among the
    candidates that divide the in-features; ties go to the smallest ``k`` (the cheapest transform)."""
    errors = block_errors(x, w, candidates, bits)
    return min(errors, key=lambda k: (errors[k], k))
