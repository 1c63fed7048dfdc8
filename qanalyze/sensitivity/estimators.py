"""Estimators of a Hessian block's spectrum and trace, built on Hessian-vector products.

- `power_iteration`: the top eigenvalues (largest in magnitude) with PyHessian's semantics;
- `lanczos`: the same eigenvalues from a Krylov space, in far fewer products;
- `refined_lanczos`: Lanczos on cheap bfloat16 products, finished by a few exact ones;
- `hutchinson_traces`: the traces of many diagonal blocks at once, one product per probe;
- `slq_density`: stochastic Lanczos quadrature, the spectral density as nodes and weights.

Every random draw comes from the `torch.Generator` passed in (made on the device it should draw
on), so a seed fixes the result. Each estimate carries its standard error or error bound, the
number of products it used, and whether it met its tolerance. Krylov methods keep their basis:
memory is (steps x block size) elements of the block's dtype.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from qanalyze.errors import ConfigError
from qanalyze.quant.primitives import random_bytes
from qanalyze.sensitivity.hvp import HVP

NEGLIGIBLE_TRACE = 1e-3
"""Hutchinson: a group whose |trace| is under this fraction of the largest group's |trace| is held
to an absolute standard error, rel_tol x this fraction x the largest |trace|, instead of a relative
one (a trace near 0, like the attention key bias's, has no relative precision to reach)."""


@dataclass(frozen=True)
class Estimate:
    """One estimated quantity: `value`, its standard error (or error bound, per estimator),
    the Hessian-vector products it used, and whether it met its tolerance."""

    value: float
    stderr: float
    iterations: int
    converged: bool


@dataclass(frozen=True)
class Density:
    """Spectral density from stochastic Lanczos quadrature: per probe, Ritz values (`nodes`)
    and their quadrature `weights` (each probe's weights sum to 1)."""

    nodes: list[list[float]]
    weights: list[list[float]]

    def smooth(self, grid: Sequence[float] | Tensor, sigma: float) -> Tensor:
        """Gaussian-broadened density (float64) on `grid`, averaged over probes; it integrates to
        about 1 when the grid covers the nodes with a margin of a few `sigma`."""
        if not sigma > 0:
            raise ConfigError(f"sigma must be positive, got {sigma!r}")
        points = torch.as_tensor(grid, dtype=torch.float64)
        density = torch.zeros_like(points)
        for nodes, weights in zip(self.nodes, self.weights):
            centres = torch.tensor(nodes, dtype=torch.float64).unsqueeze(1)
            mass = torch.tensor(weights, dtype=torch.float64).unsqueeze(1)
            bumps = torch.exp(-0.5 * ((points - centres) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
            density += (mass * bumps).sum(dim=0)
        return density / max(len(self.nodes), 1)


def power_iteration(
    op: HVP, *, generator: torch.Generator, top_k: int = 1, max_iter: int = 100, tol: float = 1e-3
) -> list[Estimate]:
    """The `top_k` eigenvalues of largest magnitude by power iteration with deflation (PyHessian).

    Each starts from a normalized Gaussian vector, orthogonalized against the eigenvectors found
    before it; the Rayleigh quotient λ = vᵀHv is the estimate, and iteration stops when
    |λ_new − λ_old| / (|λ_old| + 1e-6) < tol or after `max_iter` products. `stderr` is the
    residual ‖Hv − λv‖, a bound on the distance from λ to an eigenvalue.
    """
    _check_count("top_k", top_k, limit=op.numel)
    _check_count("max_iter", max_iter)
    _check_tol("tol", tol)
    found: list[Tensor] = []
    estimates = []
    for _ in range(top_k):
        v = _unit(_gaussian(op, generator))
        value, residual, used, converged = math.nan, math.nan, 0, False
        for used in range(1, max_iter + 1):  # noqa: B007 - `used` is read after the loop
            v = _unit(_deflate(v, found))
            hv = _deflate(op.flat(v), found)
            rayleigh = torch.dot(hv, v)
            norms = [torch.linalg.vector_norm(hv - rayleigh * v), torch.linalg.vector_norm(hv)]
            # One host sync per product: the stopping test needs the value.
            new, residual, norm = torch.stack([rayleigh, *norms]).tolist()
            if norm == 0.0:
                # v lies in the null space of the deflated block: its remaining eigenvalues are 0.
                value, converged = 0.0, True
                break
            previous, value = value, new
            v = hv / norm
            if not math.isnan(previous) and abs(value - previous) / (abs(previous) + 1e-6) < tol:
                converged = True
                break
        found.append(v)
        estimates.append(Estimate(value=value, stderr=residual, iterations=used, converged=converged))
    return estimates


HINT_NOISE = 0.3
"""Norm of the Gaussian part of a Lanczos start made from a hint (the hint's part has norm 1): enough to
give every eigenvector a share of the start, small enough to keep the hint's head start."""


def lanczos(
    op: HVP, *, generator: torch.Generator, top_k: int = 1, max_iter: int = 100, tol: float = 1e-3,
    hint: Tensor | None = None,
) -> list[Estimate]:
    """The `top_k` eigenvalues of largest magnitude by Lanczos with full reorthogonalization.

    After each step the tridiagonal matrix T is diagonalized (`torch.linalg.eigh`); its Ritz
    values θ_i come with the residual bound |β · s_mi| (β the next off-diagonal, s_mi the last
    component of θ_i's eigenvector of T), which bounds |θ_i − λ| for some eigenvalue λ. It stops
    when each of the top-k Ritz values either changed by less than tol · |θ_i| since the last
    step (power iteration's test, so the two compare at equal `tol`) or has a bound under
    tol · |θ_i|; when the Krylov space is exhausted (exact Ritz values); or after `max_iter`
    products. `stderr` is the residual bound; all estimates share `iterations`, the products used.

    `hint` (flat, `op.numel` elements), when given, is a direction expected near the top eigenvectors:
    the start is its unit vector plus a Gaussian draw of norm `HINT_NOISE`. The block's gradient is
    one: the gradient of a trained network lies mostly in the top eigenspace of its Hessian (Gur-Ari
    et al. 2018); on two minilm-l6 batches it saved 7 % and 24 % of the layer blocks' products. A zero or
    non-finite hint is ignored.
    """
    _check_count("top_k", top_k, limit=op.numel)
    _check_count("max_iter", max_iter, minimum=top_k)
    _check_tol("tol", tol)
    return _lanczos(op, _start(op, generator, hint), top_k, max_iter, tol).estimates


FAST_MARGIN = 0.05
"""`refined_lanczos`: fast Ritz values whose magnitude is within this fraction of the top-k's are refined too
(bfloat16 products moved minilm-l6's top eigenvalues by up to 3 %)."""


def refined_lanczos(
    fast: HVP, exact: HVP, *, generator: torch.Generator, top_k: int = 1, max_iter: int = 100, tol: float = 1e-3,
    fast_tol: float | None = None, hint: Tensor | None = None,
) -> list[Estimate]:
    """`lanczos` in two precisions: Lanczos on the cheap operator `fast` (bfloat16 products) to `fast_tol`
    (default `tol`), then Lanczos on `exact` to `tol`, started from the sum of `fast`'s top Ritz vectors.

    bfloat16 products move a top eigenvalue by 0.4 % to 3 % on minilm-l6, too much for a 1e-3
    tolerance, but their Ritz vector is a start that `exact` refines in one or two products
    instead of seven to nine. Besides the top-k, every fast Ritz value whose magnitude is within
    `FAST_MARGIN` of the k-th largest joins the start: bfloat16 can swap two eigenvalues of nearly
    equal magnitude (often of opposite sign), and from both directions the exact stage picks the
    larger itself. Besides `lanczos`'s tests, the exact stage stops when the Kato–Temple bound r²/δ
    is under tol · |θ|: r is the residual bound, δ the distance from θ to the nearest other Ritz value
    of the fast stage (an estimate of the spectral gap: that stage converged on nearly the same
    operator). From a good start r is about the bfloat16 error, so r²/δ is often inside the tolerance
    after one product. `fast` and `exact` must be the same block (same sizes). The estimates' values
    and bounds are `exact`'s; `iterations` counts the products of both stages. `hint` starts the fast
    stage as in `lanczos`.
    """
    _check_count("top_k", top_k, limit=exact.numel)
    _check_count("max_iter", max_iter, minimum=top_k)
    _check_tol("tol", tol)
    # A looser first stage saves a cheap product or two but may stop before a larger eigenvalue of the
    # other sign shows up: on a minilm-l6 batch, 1e-2 disagreed with float32 Lanczos on 2 of 60 blocks,
    # tol (1e-3) on 1 (where float32 missed the larger one) and took no longer.
    fast_tol = tol if fast_tol is None else fast_tol
    _check_tol("fast_tol", fast_tol)
    if fast.sizes != exact.sizes:
        raise ConfigError(f"the fast and exact operators cover different blocks ({fast.numel} and {exact.numel} "
                          "elements)")
    rough = _lanczos(fast, _start(fast, generator, hint), top_k, max_iter, fast_tol)
    start = torch.stack(rough.ritz_vectors(FAST_MARGIN)).sum(dim=0).to(dtype=exact.dtype, device=exact.device)
    gaps = torch.tensor([rough.gap(e.value) for e in rough.estimates], dtype=torch.float64)
    refined = _lanczos(exact, start, top_k, max_iter, tol, gaps=gaps).estimates
    used = rough.estimates[0].iterations + refined[0].iterations
    return [replace(e, iterations=used) for e in refined]


def hutchinson_traces(
    op: HVP,
    groups: Mapping[str, Sequence[int]],
    *,
    generator: torch.Generator,
    max_probes: int = 200,
    min_probes: int = 8,
    rel_tol: float = 0.05,
    abs_tol: float = 0.0,
) -> dict[str, Estimate]:
    """The trace of each group's diagonal Hessian block, from one global product per probe.

    `groups` maps a name to indices into `op.params`. Each probe draws one Rademacher vector v
    over the whole block and computes Hv once; for group g, Σ_{p∈g} v_pᵀ(Hv)_p is an unbiased
    sample of tr(H_gg), since the cross terms vanish in expectation. After `min_probes`, it stops
    when every group's standard error (sample std / √n) is at most
    max(rel_tol · |mean|, abs_tol, rel_tol · NEGLIGIBLE_TRACE · largest |mean| of all groups),
    or after `max_probes`.
    Each Estimate: mean, standard error, probes used, and whether that group met the test.

    A group's sample variance, 2 Σ_{i∈g, j≠i} H_ij², counts its coupling to every parameter of
    `op`, not only to its own: a small group tied to the rest (an embedding LayerNorm) may need
    far more probes than `max_probes` for a tight trace; `op.restricted` gives H_gg v_g directly.
    """
    _check_count("min_probes", min_probes, minimum=2)
    _check_count("max_probes", max_probes, minimum=min_probes)
    _check_tol("rel_tol", rel_tol)
    if not abs_tol >= 0:
        raise ConfigError(f"abs_tol must be >= 0, got {abs_tol!r}")
    names = list(groups)
    if not names:
        raise ConfigError("no groups given")
    membership = torch.zeros(len(names), len(op.sizes), dtype=torch.float64, device=op.device)
    for row, name in enumerate(names):
        indices = list(groups[name])
        if not indices:
            raise ConfigError(f"group {name!r} is empty")
        for index in indices:
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(op.sizes):
                raise ConfigError(f"group {name!r}: {index!r} is not a parameter index in 0..{len(op.sizes) - 1}")
            membership[row, index] = 1.0
    samples = torch.zeros(max_probes, len(names), dtype=torch.float64, device=op.device)
    probes, met = 0, torch.zeros(len(names), dtype=torch.bool)
    for probes in range(1, max_probes + 1):
        v = _split(op, rademacher(op, generator))
        hv = op(v)
        per_param = torch.stack([torch.dot(a.reshape(-1), b.reshape(-1)) for a, b in zip(v, hv)])
        samples[probes - 1] = membership @ per_param.to(torch.float64)
        if probes >= min_probes:
            met = precise_enough(samples[:probes], rel_tol, abs_tol)
            # One host sync per probe: the stopping test needs it.
            if bool(met.all()):
                break
    mean, stderr = mean_stderr(samples[:probes])
    return {
        name: Estimate(value=value, stderr=error, iterations=probes, converged=ok)
        for name, value, error, ok in zip(names, mean.tolist(), stderr.tolist(), met.tolist())
    }


def slq_density(op: HVP, *, generator: torch.Generator, probes: int = 1, steps: int = 30) -> Density:
    """Spectral density by stochastic Lanczos quadrature.

    Per probe: a normalized Rademacher start, `steps` Lanczos steps with full reorthogonalization
    (fewer when the Krylov space is exhausted, then the Ritz values are exact), `torch.linalg.eigh`
    of the tridiagonal; the nodes are its eigenvalues, the weights the squared first components
    of its eigenvectors.
    """
    _check_count("probes", probes)
    _check_count("steps", steps)
    nodes, weights = [], []
    for _ in range(probes):
        tri = deque(_lanczos_steps(op, rademacher(op, generator), steps), maxlen=1)[0]
        theta, vectors = tri.eigh()
        nodes.append(theta.tolist())
        weights.append((vectors[0] ** 2).tolist())
    return Density(nodes=nodes, weights=weights)


# ---------------------------------------------------------------------------------------------
# Lanczos core


@dataclass(frozen=True)
class _Tridiagonal:
    """Lanczos coefficients so far: T has `alphas` on its diagonal and betas[:-1] beside it;
    betas[-1] couples T to the next basis vector (≈ 0 when `exhausted`)."""

    alphas: list[float]
    betas: list[float]
    exhausted: bool
    basis: Tensor
    """The orthonormal Lanczos vectors so far, one per row (a view of the run's buffer)."""

    def eigh(self) -> tuple[Tensor, Tensor]:
        """Ritz values (ascending) and eigenvectors (columns) of T, in float64."""
        t = torch.diag(torch.tensor(self.alphas, dtype=torch.float64))
        off = torch.tensor(self.betas[:-1], dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
        return torch.linalg.eigh(t)


@dataclass(frozen=True)
class _LanczosRun:
    """What one Lanczos run leaves: the top-k `estimates`, every Ritz value `theta` of its last step and
    the eigenvectors (columns) of that step's T, with the basis they combine (`refined_lanczos` needs them)."""

    estimates: list[Estimate]
    theta: Tensor
    vectors: Tensor
    basis: Tensor

    def ritz_vectors(self, near: float) -> list[Tensor]:
        """Unit Ritz vectors (flat), largest |θ| first, of every Ritz value whose |θ| is within the fraction
        ``near`` of the k-th largest estimate's."""
        floor = (1 - near) * min(abs(e.value) for e in self.estimates)
        order = torch.argsort(self.theta.abs(), descending=True)
        chosen = [int(i) for i in order if abs(float(self.theta[i])) >= floor]
        coefficients = self.vectors[:, chosen].to(self.basis.dtype)
        return [_unit(self.basis.T @ coefficients[:, i]) for i in range(len(chosen))]

    def gap(self, value: float) -> float:
        """Distance from ``value`` to the nearest other Ritz value (inf when it is the only one)."""
        distances = (self.theta - value).abs().sort().values  # the first is the value's own Ritz value
        return float(distances[1]) if distances.numel() > 1 else math.inf


def _lanczos(op: HVP, start: Tensor, top_k: int, max_iter: int, tol: float, *,
             gaps: Tensor | None = None) -> _LanczosRun:
    """`lanczos` from a given start vector. With ``gaps`` (one per top-k value), a value whose r²/gap is
    under tol · |θ| is settled too (see `refined_lanczos`)."""
    values = bounds = previous = torch.zeros(0, dtype=torch.float64)
    steps, converged = 0, False
    tri = theta = vectors = None
    for tri in _lanczos_steps(op, start, max_iter):
        steps = len(tri.alphas)
        if steps < top_k:
            continue
        theta, vectors = tri.eigh()
        order = torch.argsort(theta.abs(), descending=True)[:top_k]
        previous, values = values, theta[order]
        bounds = (tri.betas[-1] * vectors[-1, order]).abs()
        settled = bounds <= tol * values.abs()
        if gaps is not None:
            settled |= bounds**2 / gaps <= tol * values.abs()
        if previous.numel() == top_k:
            settled |= (values - previous).abs() < tol * values.abs()
        # An exhausted Krylov space is invariant: its Ritz values are exact eigenvalues.
        converged = tri.exhausted or bool(settled.all())
        if converged:
            break
    if tri is None or theta is None or vectors is None or values.numel() < top_k:
        raise ConfigError(f"the block has fewer than top_k={top_k} independent directions the start vector reaches")
    estimates = [
        Estimate(value=float(value), stderr=float(bound), iterations=steps, converged=converged)
        for value, bound in zip(values.tolist(), bounds.tolist())
    ]
    return _LanczosRun(estimates, theta, vectors, tri.basis)


def _lanczos_steps(op: HVP, start: Tensor, max_steps: int) -> Iterator[_Tridiagonal]:
    """Run Lanczos from `start`, yielding T after each step; ends after `max_steps`, at the block
    size, or when the next basis vector vanishes (the Krylov space is invariant)."""
    steps = min(max_steps, op.numel)
    basis = torch.empty(steps, op.numel, dtype=op.dtype, device=op.device)
    torch.div(start, torch.linalg.vector_norm(start), out=basis[0])
    alphas: list[float] = []
    betas: list[float] = []
    for j in range(steps):
        q = basis[j]
        w = op.flat(q)
        alpha = torch.dot(w, q)
        # The three-term recurrence removes the large components (along q_j and q_j-1); one classical
        # Gram-Schmidt pass against the whole basis then removes what rounding left along every earlier
        # one, which plain Lanczos loses after a few steps. That equals two full passes ("twice is
        # enough") to rounding and reads the basis half as often. The first update is out of place (the
        # operator may hand back a tensor it keeps), the others in place: on a 1.8M-weight layer each
        # fresh vector costs page faults, and the bookkeeping took a tenth of a product's time.
        w = torch.addcmul(w, q, alpha, value=-1)
        if j:
            w.sub_(basis[j - 1], alpha=betas[-1])
        known = basis[: j + 1]
        w.addmv_(known.T, known @ w, alpha=-1)
        beta = torch.linalg.vector_norm(w)
        # One host sync per step: T is rebuilt on the host from these.
        a, b = (float(x) for x in torch.stack([alpha, beta]))
        alphas.append(a)
        betas.append(b)
        scale = max(max(abs(x) for x in alphas), max(betas))
        exhausted = j + 1 == op.numel or b <= 100 * torch.finfo(op.dtype).eps * scale
        yield _Tridiagonal(list(alphas), list(betas), exhausted, basis[: j + 1])
        if exhausted or j + 1 == steps:
            return
        torch.div(w, beta, out=basis[j + 1])


# ---------------------------------------------------------------------------------------------
# Helpers


def _start(op: HVP, generator: torch.Generator, hint: Tensor | None) -> Tensor:
    draw = _gaussian(op, generator)
    if hint is None:
        return draw
    if hint.dim() != 1 or hint.numel() != op.numel:
        raise ValueError(f"the hint must be a flat vector of {op.numel} elements, got shape {tuple(hint.shape)}")
    hint = hint.to(dtype=op.dtype, device=op.device)
    norm = torch.linalg.vector_norm(hint)
    if not bool(torch.isfinite(norm)) or float(norm) == 0.0:
        return draw
    return hint / norm + HINT_NOISE * _unit(draw)


def _gaussian(op: HVP, generator: torch.Generator) -> Tensor:
    draw = torch.randn(op.numel, generator=generator, device=generator.device, dtype=op.dtype)
    return draw.to(op.device)


def rademacher(op: HVP, generator: torch.Generator) -> Tensor:
    """A flat vector of ±1 over ``op``'s parameters (``op.numel``, ``op.dtype``, ``op.device``) from ``generator``."""
    # Eight signs from each random byte, sixty-four per generator call: one draw per sign took a fifth
    # of a probe's time on minilm-l6 (22.7M weights), more than every dot product of the probe together.
    device = generator.device
    draws = random_bytes((op.numel + 7) // 8, generator)
    bits = (torch.arange(256, device=device).unsqueeze(1) >> torch.arange(8, device=device)) & 1
    signs = (1 - 2 * bits).to(op.dtype)
    return torch.nn.functional.embedding(draws.int(), signs).reshape(-1)[: op.numel].to(op.device)


def _split(op: HVP, flat: Tensor) -> list[Tensor]:
    return [chunk.view(shape) for chunk, shape in zip(flat.split(op.sizes), op.shapes)]


def _unit(v: Tensor) -> Tensor:
    return v / torch.linalg.vector_norm(v)


def _deflate(v: Tensor, found: Sequence[Tensor]) -> Tensor:
    for u in found:
        v = v - torch.dot(v, u) * u
    return v


def mean_stderr(samples: Tensor) -> tuple[Tensor, Tensor]:
    """The mean over the first dimension of ``samples`` and its standard error."""
    mean = samples.mean(dim=0)
    stderr = samples.std(dim=0, correction=1) / math.sqrt(samples.shape[0])
    return mean, stderr


def precise_enough(samples: Tensor, rel_tol: float, abs_tol: float) -> Tensor:
    """Per column of ``samples``: whether the standard error of the mean is within ``rel_tol`` of its size or
    under ``abs_tol``."""
    mean, stderr = mean_stderr(samples)
    size = mean.abs()
    floor = torch.clamp(NEGLIGIBLE_TRACE * size.max(), min=abs_tol / rel_tol)
    return (stderr <= rel_tol * torch.maximum(size, floor)).cpu()


def _check_count(name: str, value: int, *, minimum: int = 1, limit: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be a whole number of at least {minimum}, got {value!r}")
    if limit is not None and value > limit:
        raise ConfigError(f"{name}={value} exceeds the block size {limit}")


def _check_tol(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{name} must be a positive number, got {value!r}")
