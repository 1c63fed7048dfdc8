"""Where Hessian answers come from on one batch: qanalyze's engine or PyHessian 0.1.

Each source answers the same three questions for the analysis (traces of every module, the top
eigenvalue of a set of modules, the spectral density), each from the generator it is given (one per unit of
work, `qanalyze.sensitivity.hessian_stage`), and counts the products it used;
`HESSIAN_ENGINES` maps ``--engine`` names to them.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from qanalyze.errors import ConfigError
from qanalyze.sensitivity.estimators import (
    Estimate,
    hutchinson_traces,
    lanczos,
    power_iteration,
    refined_lanczos,
    slq_density,
)
from qanalyze.sensitivity.hvp import HVP, pyhessian_adapter

if TYPE_CHECKING:
    from qanalyze.sensitivity.analyze import AnalyzeConfig

EIG_METHODS = {"lanczos": lanczos, "power": power_iteration}
"""Top-eigenvalue estimators by ``--eig-method`` name."""


class Restricted:
    """The diagonal block of an `HVP` for a subset of its parameters, on the same graph."""

    def __init__(self, op: HVP, indices: Sequence[int]) -> None:
        self.op, self.indices = op, list(indices)
        self.params = [op.params[i] for i in self.indices]
        self.names = [op.names[i] for i in self.indices]
        self.shapes = [op.shapes[i] for i in self.indices]
        self.sizes = [op.sizes[i] for i in self.indices]
        self.numel = sum(self.sizes)
        self.dtype, self.device = op.dtype, op.device

    @property
    def count(self) -> int:
        """Products computed on the shared graph so far."""
        return self.op.count

    def __call__(self, v: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """H_SS v_S, one tensor per parameter of the subset."""
        return self.op.restricted(self.indices, v)

    def flat(self, v: torch.Tensor) -> torch.Tensor:
        """H_SS v_S for a flat vector over the subset's parameters."""
        parts = [chunk.view(shape) for chunk, shape in zip(v.split(self.sizes), self.shapes)]
        return torch.cat([h.reshape(-1) for h in self(parts)])

    def gradient(self) -> torch.Tensor:
        """The loss gradient over the subset's parameters, flat (a Lanczos `hint`)."""
        gradient = self.op.gradient()
        return torch.cat([gradient[i].reshape(-1) for i in self.indices])


class NativeSource:
    """Hessian work on one batch with qanalyze's engine: one double-backward graph over every
    selected weight serves the one-pass traces and, restricted, every block's eigenvalue.

    With ``config.hvp_precision`` ``bfloat16`` (a resolved `AnalyzeConfig`) the traces and the density
    use a bfloat16 graph (`fast`), whose 2 % product error is small against a Hutchinson sample's
    spread; Lanczos eigenvalues start on it and are finished on the float32 graph (`exact`, built on
    first use) by `refined_lanczos`, so they keep the 1e-3 tolerance.

    Both graphs take the input embedding table as the rows the batch looks up (``sparse_embeddings``):
    traces and eigenvalues are the full table's, and a probe skips the other rows' millions of entries.
    With ``config.unpad`` they run the batch as length buckets without its shared padding (`LengthBuckets`).
    """

    def __init__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], weights: dict[str, torch.nn.Parameter],
                 config: AnalyzeConfig) -> None:
        self.model, self.batch, self.weights = model, batch, weights
        self.config = config
        self.fast = HVP.build(model, batch, weights, method=config.hvp_method, precision=config.hvp_precision,
                        sparse_embeddings=True, unpad=config.unpad)
        self._exact = self.fast if config.hvp_precision == "float32" else None
        self.eig = EIG_METHODS[config.eig_method]

    @property
    def exact(self) -> HVP:
        """The products in the parameters' own precision (the bfloat16 graph's partner)."""
        if self._exact is None:
            self._exact = HVP.build(self.model, self.batch, self.weights, method=self.config.hvp_method,
                              sparse_embeddings=True, unpad=self.config.unpad)
        return self._exact

    @property
    def products(self) -> int:
        """Hessian-vector products used so far, in either precision."""
        both = {id(op): op for op in (self.fast, self._exact) if op is not None}
        return sum(op.count for op in both.values())

    def traces(self, names: list[str], generator: torch.Generator) -> dict[str, tuple[Estimate, str]]:
        """One pass over all modules; then small modules the pass left imprecise, on their own.

        A one-pass sample for module i is Σ_j v_iᵀH_ij v_j: the cross terms vanish in expectation
        but add variance that swamps a small, strongly coupled block (a LayerNorm gain, the
        token-type embedding). Those get a Hutchinson estimate from products restricted to their
        block on the same graph (cheap: few parameters, one graph).
        """
        settings = {"generator": generator, "max_probes": self.config.trace_max_probes,
                    "min_probes": self.config.trace_min_probes, "rel_tol": self.config.trace_rel_tol}
        estimates = hutchinson_traces(self.fast, {n: [i] for i, n in enumerate(names)}, **settings)
        result = {name: (estimate, "one-pass") for name, estimate in estimates.items()}
        for index, name in enumerate(names):
            one_pass = estimates[name]
            if one_pass.converged or self.fast.sizes[index] > self.config.trace_refine_params:
                continue
            alone = hutchinson_traces(Restricted(self.fast, [index]), {name: [0]}, **settings)[name]
            if alone.stderr < one_pass.stderr:
                result[name] = (alone, "restricted")
        return result

    def top_eigenvalue(self, indices: list[int], generator: torch.Generator) -> Estimate:
        """Top eigenvalue (largest magnitude) of the diagonal block of the given parameters."""
        settings = {"generator": generator, "max_iter": self.config.eig_max_iter, "tol": self.config.eig_tol}
        exact = Restricted(self.exact, indices)
        if self.eig is not lanczos:
            return self.eig(exact, **settings)[0]
        # The block's gradient starts Lanczos near the top eigenvectors (see `lanczos`).
        if self.fast is self.exact:
            return lanczos(exact, hint=exact.gradient(), **settings)[0]
        fast = Restricted(self.fast, indices)
        return refined_lanczos(fast, exact, hint=fast.gradient(), **settings)[0]

    def density(self, generator: torch.Generator) -> dict[str, Any]:
        """Ritz nodes and weights of the whole weight Hessian (one SLQ probe).

        The embedding rows the batch does not look up span a null space of the Hessian. A Rademacher
        start over all weights puts exactly their share of its squared norm there, so they enter as a
        node at 0 with that weight, the Lanczos weights over the other entries scaled by the rest.
        """
        density = slq_density(self.fast, generator=generator, probes=1, steps=self.config.density_steps)
        if not self.fast.omitted:
            return {"nodes": density.nodes, "weights": density.weights}
        kept = self.fast.numel / (self.fast.numel + self.fast.omitted)
        return {"nodes": [[*nodes, 0.0] for nodes in density.nodes],
                "weights": [[*(w * kept for w in weights), 1.0 - kept] for weights in density.weights]}


class PyHessianSource:
    """The same questions answered by PyHessian 0.1, one block at a time (the reference and baseline)."""

    def __init__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], weights: dict[str, torch.nn.Parameter],
                 config: AnalyzeConfig) -> None:
        self.model, self.batch, self.config = model, batch, config
        self.weights = list(weights.values())
        self.products = 0

    def traces(self, names: list[str], generator: torch.Generator) -> dict[str, tuple[Estimate, str]]:
        """PyHessian's Hutchinson trace of each module's block, one module at a time."""
        seed = _seed(generator)
        result = {}
        for index, name in enumerate(names):
            oracle = pyhessian_adapter(self.model, self.batch, [self.weights[index]])
            samples = oracle.trace(max_iter=self.config.trace_max_probes, tol=self.config.trace_rel_tol,
                                   seed=seed + index)
            self.products += len(samples)
            stderr = statistics.stdev(samples) / math.sqrt(len(samples)) if len(samples) > 1 else math.inf
            result[name] = (Estimate(statistics.fmean(samples), stderr, len(samples),
                                     len(samples) < self.config.trace_max_probes), "pyhessian")
        return result

    def top_eigenvalue(self, indices: list[int], generator: torch.Generator) -> Estimate:
        """PyHessian's power iteration on the block of the given parameters."""
        oracle = pyhessian_adapter(self.model, self.batch, [self.weights[i] for i in indices])
        value = oracle.eigenvalues(max_iter=self.config.eig_max_iter, tol=self.config.eig_tol,
                                   seed=_seed(generator))[0]
        # PyHessian reports neither its iteration count nor a residual.
        return Estimate(value, math.nan, 0, True)

    def density(self, generator: torch.Generator) -> dict[str, Any]:
        """Not available: PyHessian 0.1's density needs torch.eig."""
        raise ConfigError("--metrics density needs --engine native: pyhessian 0.1's density() calls torch.eig, "
                          "which PyTorch 2 removed")


def _seed(generator: torch.Generator) -> int:
    # PyHessian draws from the global generator; its seeds come from ours so runs repeat.
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))


HESSIAN_ENGINES = {"native": NativeSource, "pyhessian": PyHessianSource}
"""Hessian sources by ``--engine`` name."""
