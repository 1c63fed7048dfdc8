"""Hessian-vector products and Hutchinson traces of a model split by decoder layers over the ranks
(`qanalyze.sensitivity.stages`): each rank holds one stage and passes activations, so a model that does not
fit one process is analysed by several.

`PipelinedHVP` computes H v exactly as one process would (Pearlmutter's R-operator, pipelined). Stage k maps
h_{k-1} to h_k = f_k(h_{k-1}, θ_k); the last stage ends in the loss.

- Per batch, a forward sweep (rank 0 to the last) sends h_k on, and a backward sweep sends δ_{k-1} = J_hᵀ δ_k
  back (δ = 1 at the loss), each rank keeping its vector-Jacobian product z_k = VJP_{f_k}(δ_k) with its graph.
- Per probe v, a forward sweep sends the tangent u_k = J_h u_{k-1} + J_θ v_k on (u = 0 at the input ids;
  taken as the derivative of a VJP in a dummy vector, the double-backward trick), and a backward sweep sends
  w_{k-1} = R{δ_{k-1}} back (w = 0 at the loss): with S_k = h_k·w_k + ⟨z_k, (u_{k-1}, v_k)⟩, δ, w, u and v held
  constant, ∇_{h_{k-1}} S_k = w_{k-1} and ∇_{θ_k} S_k = (H v)_k, this rank's part of the whole product, the
  cross-stage terms included.

A tied embedding table is used twice, by rank 0's lookup and the last rank's LM head: both draw the same
probe part for it, and the last rank sends its contribution to rank 0, which adds it, so the table's product
is the exact sum of both uses. Probe parts come from generators keyed by (seed, batch, probe, module)
(`draw_probe`): each rank draws only its own modules' parts and the probe is the same for any number of ranks.

`pipelined_traces` is `qanalyze.sensitivity.estimators.hutchinson_traces` on these products: the sample of
module m is v_mᵀ(H v)_m, summed into one vector over the ranks per probe so that every rank applies the same
stopping rule (`qanalyze.sensitivity.pipelined_analysis` runs it as the ``analyze`` verb's traces).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from qanalyze.distributed import all_reduce_sum, gather_objects, keyed_generator
from qanalyze.errors import ConfigError, NonFiniteError
from qanalyze.sensitivity.estimators import Estimate, mean_stderr, precise_enough, rademacher
from qanalyze.sensitivity.stages import EMBEDDING, Stage

PROBE_STREAM = "pipeline-probe"
"""The name in every probe generator's key (`draw_probe`)."""

_FORWARD, _BACKWARD, _TIED = 1, 2, 3  # message tags


@dataclass(frozen=True)
class _Flat:
    """What `rademacher` reads of a block: its size, dtype and device."""

    numel: int
    dtype: torch.dtype
    device: torch.device


def draw_probe(shapes: Mapping[str, torch.Size], *, seed: int, batch: int, probe: int,
               dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """A Rademacher probe part per module name of ``shapes``, each from a generator keyed by (``seed``,
    `PROBE_STREAM`, ``batch``, ``probe``, name): the same on whichever rank draws it."""
    parts = {}
    for name, shape in shapes.items():
        generator = keyed_generator(seed, PROBE_STREAM, batch, probe, name)
        flat = rademacher(_Flat(shape.numel(), dtype, torch.device("cpu")), generator)
        parts[name] = flat.view(shape)
    return parts


def _send(tensor: Tensor, to: int, tag: int) -> None:
    """Send ``tensor`` to rank ``to`` (gloo point-to-point)."""
    import torch.distributed as dist

    dist.send(tensor.detach().contiguous(), dst=to, tag=tag)


def _recv(shape: torch.Size, source: int, tag: int) -> Tensor:
    """A float32 tensor of ``shape`` from rank ``source``."""
    import torch.distributed as dist

    buffer = torch.empty(shape, dtype=torch.float32)
    dist.recv(buffer, src=source, tag=tag)
    return buffer


class PipelinedHVP:
    """H v on one batch for the weights of the whole model's selected modules, computed by the ranks
    together, each for the modules its stage owns. Made by `build`, which runs the batch's forward and backward
    sweeps; every rank calls `build` and then each product in the same order.

    Attributes: `stage`, `names` (the modules whose products this rank returns, in model order), `params`
    (module name -> the weight this rank differentiates, a tied head's copy included), `shapes`, `loss` (the
    batch's loss, on every rank), `count` (products so far).
    """

    def __init__(self, stage: Stage, params: Mapping[str, Tensor], hidden: Tensor | None, output: Tensor,
                 vjp: Sequence[Tensor], dummy: Tensor | None, jvp: Sequence[Tensor], loss: float) -> None:
        """Store what `build` computed: the stage's input activation `hidden` (None on rank 0) and `output`
        (the next activation, or the loss on the last rank) with their graph, `vjp` (z_k, with its graph), and
        the dummy vector whose VJP `jvp` gives tangents (None on the last rank)."""
        self.stage, self.params, self.loss = stage, dict(params), loss
        split = stage.split
        borrowed = stage.tied and split.last and not split.first and EMBEDDING in self.params
        self.names = [name for name in self.params if not (borrowed and name == EMBEDDING)]
        self.shapes = {name: p.shape for name, p in self.params.items()}
        self.count = 0
        self._borrowed = borrowed
        self._hidden, self._output, self._vjp = hidden, output, list(vjp)
        self._dummy, self._jvp = dummy, list(jvp)
        self._receives_tied = stage.tied and split.first and not split.last and EMBEDDING in self.params

    @classmethod
    def build(cls, stage: Stage, batch: Mapping[str, Tensor], modules: Sequence[str] | None = None) -> PipelinedHVP:
        """The products on ``batch`` (``input_ids`` and ``labels``, one window) for the weights of ``modules``
        (whole-model module names; default: every quantizable module), of which this rank takes those its stage
        holds. Runs the batch's forward and backward sweeps. NonFiniteError (on every rank) when the loss is NaN
        or infinite."""
        weights = stage.weights()
        chosen = list(weights) if modules is None else [name for name in modules if name in weights]
        params = {name: weights[name] for name in chosen}
        split = stage.split
        ids, labels = batch["input_ids"], batch["labels"]
        shape = torch.Size((*ids.shape, stage.config.hidden_size))
        with _differentiable(params.values()):
            hidden = None if split.first else _recv(shape, split.rank - 1, _FORWARD).requires_grad_()
            output = stage.layers(stage.embed(ids) if split.first else hidden)
            if split.last:
                output = stage.head(output, labels)
            else:
                _send(output, split.rank + 1, _FORWARD)
            inputs = ([] if hidden is None else [hidden]) + list(params.values())
            delta = None if split.last else _recv(shape, split.rank + 1, _BACKWARD)
            vjp = _grad([output], inputs, [delta], create_graph=True)
            if hidden is not None:
                _send(vjp[0], split.rank - 1, _BACKWARD)
            dummy, jvp = None, []
            if not split.last:
                dummy = torch.zeros_like(output, requires_grad=True)
                jvp = _grad([output], inputs, [dummy], create_graph=True)
        loss = float(all_reduce_sum(torch.tensor([float(output.detach()) if split.last else 0.0],
                                                 dtype=torch.float64))[0])
        if loss != loss or abs(loss) == float("inf"):
            raise NonFiniteError(f"the loss on this batch is {loss}")
        return cls(stage, params, hidden, output, vjp, dummy, jvp, loss)

    def probe(self, *, seed: int, batch: int, probe: int) -> dict[str, Tensor]:
        """This rank's parts of probe ``probe`` of batch ``batch`` (`draw_probe`), a borrowed tied table's
        included."""
        return draw_probe(self.shapes, seed=seed, batch=batch, probe=probe, dtype=torch.float32)

    def __call__(self, v: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """(H v)_m for each module m of `names`; ``v`` holds this rank's parts (every key of `params`). Every
        rank must call it with its parts of the same probe. NonFiniteError when a product holds NaN or
        infinity."""
        split = self.stage.split
        vectors = [v[name].to(torch.float32) for name in self.params]
        tangent = None if split.first else _recv(self._hidden.shape, split.rank - 1, _FORWARD)
        directions = ([] if tangent is None else [tangent]) + vectors
        if not split.last:
            _send(_grad(self._jvp, [self._dummy], directions)[0], split.rank + 1, _FORWARD)
        # S_k = h_k·w_k + <z_k, (u_{k-1}, v_k)>: its gradient is (w_{k-1}, (Hv)_k)
        if split.last:
            outputs, weights = self._vjp, directions
        else:
            adjoint = _recv(self._output.shape, split.rank + 1, _BACKWARD)
            outputs, weights = [self._output, *self._vjp], [adjoint, *directions]
        inputs = ([] if self._hidden is None else [self._hidden]) + list(self.params.values())
        with _differentiable(self.params.values()):
            grads = _grad(outputs, inputs, weights)
        if self._hidden is not None:
            _send(grads[0], split.rank - 1, _BACKWARD)
        products = dict(zip(self.params, grads[len(inputs) - len(self.params):]))
        if self._borrowed:
            _send(products.pop(EMBEDDING), 0, _TIED)
        elif self._receives_tied:
            products[EMBEDDING] = products[EMBEDDING] + _recv(self.shapes[EMBEDDING], split.size - 1, _TIED)
        self.count += 1
        bad = next((name for name, h in products.items() if not bool(torch.isfinite(h).all())), None)
        if bad is not None:
            raise NonFiniteError(f"the Hessian-vector product for {bad} holds NaN or infinity")
        return products


@contextmanager
def _differentiable(params: Iterable[Tensor]) -> Iterator[None]:
    # The stage's weights require grad while a sweep differentiates them; their flags come back afterwards.
    flags = [(p, p.requires_grad) for p in params]
    try:
        for p, _ in flags:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _grad(outputs: Sequence[Tensor], inputs: Sequence[Tensor], weights: Sequence[Tensor | None], *,
          create_graph: bool = False) -> list[Tensor]:
    # Terms whose output does not depend on the inputs add nothing (their rows of the product are 0).
    live = [(o, w) for o, w in zip(outputs, weights) if o.requires_grad]
    if not live:
        return [torch.zeros_like(x) for x in inputs]
    grads = torch.autograd.grad([o for o, _ in live], list(inputs), grad_outputs=[w for _, w in live],
                                retain_graph=True, create_graph=create_graph, allow_unused=True,
                                materialize_grads=True)
    return list(grads) if create_graph else [g.detach() for g in grads]


def module_order(op: PipelinedHVP) -> list[str]:
    """Every rank's `names` in rank order (the model's order), the same list on every rank."""
    return [name for names in gather_objects(op.names) for name in names]


def pipelined_traces(op: PipelinedHVP, *, seed: int, batch: int, max_probes: int = 12, min_probes: int = 8,
                     rel_tol: float = 0.05, order: Sequence[str] | None = None) -> dict[str, Estimate]:
    """The trace of every selected module's diagonal Hessian block on ``op``'s batch, one pipelined product per
    probe (the one-pass estimator of `hutchinson_traces`, with its stopping rule and `Estimate` fields), for
    the modules of every rank, on every rank. ``batch`` (the global batch index) and ``seed`` key the probes;
    ``order`` is `module_order` (computed when not given)."""
    if not 2 <= min_probes <= max_probes:
        raise ConfigError("trace probes: need 2 <= min probes <= max probes")
    names = list(order) if order is not None else module_order(op)
    position = {name: i for i, name in enumerate(names)}
    samples = torch.zeros(max_probes, len(names), dtype=torch.float64)
    probes, met = 0, torch.zeros(len(names), dtype=torch.bool)
    for probes in range(1, max_probes + 1):
        v = op.probe(seed=seed, batch=batch, probe=probes - 1)
        row = torch.zeros(len(names), dtype=torch.float64)
        for name, product in op(v).items():
            row[position[name]] = torch.dot(v[name].reshape(-1), product.reshape(-1)).double()
        samples[probes - 1] = all_reduce_sum(row)
        if probes >= min_probes:
            met = precise_enough(samples[:probes], rel_tol, 0.0)
            if bool(met.all()):
                break
    mean, stderr = mean_stderr(samples[:probes])
    return {name: Estimate(value=value, stderr=error, iterations=probes, converged=ok)
            for name, value, error, ok in zip(names, mean.tolist(), stderr.tolist(), met.tolist())}

