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

`forward_sweep`, `agreed_loss`, `backward_sweep` and `sum_tied_table` are the steps of a batch's sweeps, shared
with the Fisher passes (`qanalyze.sensitivity.pipeline_fisher`).
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

FORWARD, BACKWARD, TIED = 1, 2, 3
"""Message tags: activations and tangents sent on, gradients sent back, a tied head's part sent to rank 0."""


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


def send(tensor: Tensor, to: int, tag: int) -> None:
    """Send ``tensor`` (detached) to rank ``to`` (gloo point-to-point)."""
    import torch.distributed as dist

    dist.send(tensor.detach().contiguous(), dst=to, tag=tag)


def receive(shape: torch.Size, source: int, tag: int) -> Tensor:
    """A float32 tensor of ``shape`` from rank ``source`` (what its `send` with ``tag`` sent)."""
    import torch.distributed as dist

    buffer = torch.empty(shape, dtype=torch.float32)
    dist.recv(buffer, src=source, tag=tag)
    return buffer


def stage_params(stage: Stage, modules: Sequence[str] | None = None) -> dict[str, Tensor]:
    """Module name -> weight of each of ``modules`` (whole-model names; default: every quantizable module) whose
    weight this stage holds (`Stage.weights`, a tied head's copy of the table included), in model order."""
    weights = stage.weights()
    chosen = list(weights) if modules is None else [name for name in modules if name in weights]
    return {name: weights[name] for name in chosen}


def forward_sweep(stage: Stage, input_ids: Tensor) -> tuple[Tensor | None, Tensor]:
    """This rank's part of a forward sweep on ``input_ids`` (one window): the activation received from the
    previous rank (None on rank 0; it requires grad) and this stage's last layer's output, sent on to the next
    rank unless this is the last. Run it under `differentiable`."""
    split = stage.split
    shape = torch.Size((*input_ids.shape, stage.config.hidden_size))
    hidden = None if split.first else receive(shape, split.rank - 1, FORWARD).requires_grad_()
    output = stage.layers(stage.embed(input_ids) if split.first else hidden)
    if not split.last:
        send(output, split.rank + 1, FORWARD)
    return hidden, output


def agreed_loss(stage: Stage, loss: Tensor, where: str) -> float:
    """The last rank's ``loss`` on every rank (the other ranks' ``loss`` is ignored); NonFiniteError on every
    rank when it is NaN or infinite, so that no rank waits for a sweep another has left."""
    value = float(all_reduce_sum(torch.tensor([float(loss.detach()) if stage.split.last else 0.0],
                                              dtype=torch.float64))[0])
    if value != value or abs(value) == float("inf"):
        raise NonFiniteError(f"the loss on {where} is {value}")
    return value


def backward_sweep(stage: Stage, hidden: Tensor | None, output: Tensor, params: Iterable[Tensor], *,
                   create_graph: bool = False) -> list[Tensor]:
    """This rank's part of a backward sweep after `forward_sweep`: the gradients of the loss (``output`` on the
    last rank) by ``hidden`` (first, when not None) and by each of ``params``, from the gradient by ``output``
    the next rank sends back; the one by ``hidden`` is sent to the previous rank. With ``create_graph`` they keep
    their graph."""
    split = stage.split
    inputs = ([] if hidden is None else [hidden]) + list(params)
    delta = None if split.last else receive(output.shape, split.rank + 1, BACKWARD)
    grads = weighted_grads([output], inputs, [delta], create_graph=create_graph)
    if hidden is not None:
        send(grads[0], split.rank - 1, BACKWARD)
    return grads


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
        self.names = [name for name in self.params if not (stage.lends_table and name == EMBEDDING)]
        self.shapes = {name: p.shape for name, p in self.params.items()}
        self.count = 0
        self._hidden, self._output, self._vjp = hidden, output, list(vjp)
        self._dummy, self._jvp = dummy, list(jvp)

    @classmethod
    def build(cls, stage: Stage, batch: Mapping[str, Tensor], modules: Sequence[str] | None = None) -> PipelinedHVP:
        """The products on ``batch`` (``input_ids`` and ``labels``, one window) for the weights of ``modules``
        (whole-model module names; default: every quantizable module), of which this rank takes those its stage
        holds. Runs the batch's forward and backward sweeps. NonFiniteError (on every rank) when the loss is NaN
        or infinite."""
        params = stage_params(stage, modules)
        with differentiable(params.values()):
            hidden, output = forward_sweep(stage, batch["input_ids"])
            if stage.split.last:
                output = stage.head(output, batch["labels"])
            loss = agreed_loss(stage, output, "this batch")
            vjp = backward_sweep(stage, hidden, output, params.values(), create_graph=True)
            dummy, jvp = None, []
            if not stage.split.last:
                inputs = ([] if hidden is None else [hidden]) + list(params.values())
                dummy = torch.zeros_like(output, requires_grad=True)
                jvp = weighted_grads([output], inputs, [dummy], create_graph=True)
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
        tangent = None if split.first else receive(self._hidden.shape, split.rank - 1, FORWARD)
        directions = ([] if tangent is None else [tangent]) + vectors
        if not split.last:
            send(weighted_grads(self._jvp, [self._dummy], directions)[0], split.rank + 1, FORWARD)
        # S_k = h_k·w_k + <z_k, (u_{k-1}, v_k)>: its gradient is (w_{k-1}, (Hv)_k)
        if split.last:
            outputs, weights = self._vjp, directions
        else:
            adjoint = receive(self._output.shape, split.rank + 1, BACKWARD)
            outputs, weights = [self._output, *self._vjp], [adjoint, *directions]
        inputs = ([] if self._hidden is None else [self._hidden]) + list(self.params.values())
        with differentiable(self.params.values()):
            grads = weighted_grads(outputs, inputs, weights)
        if self._hidden is not None:
            send(grads[0], split.rank - 1, BACKWARD)
        products = sum_tied_table(self.stage, dict(zip(self.params, grads[len(inputs) - len(self.params):])))
        self.count += 1
        bad = next((name for name, h in products.items() if not bool(torch.isfinite(h).all())), None)
        if bad is not None:
            raise NonFiniteError(f"the Hessian-vector product for {bad} holds NaN or infinity")
        return products


@contextmanager
def differentiable(params: Iterable[Tensor]) -> Iterator[None]:
    """Grad mode on, and ``params`` (a stage's weights) requiring grad while a sweep differentiates them; their
    flags come back afterwards."""
    flags = [(p, p.requires_grad) for p in params]
    try:
        for p, _ in flags:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def weighted_grads(outputs: Sequence[Tensor], inputs: Sequence[Tensor], weights: Sequence[Tensor | None], *,
                   create_graph: bool = False) -> list[Tensor]:
    """Σ_i weights_iᵀ ∂outputs_i/∂x for each x of ``inputs`` (a None weight: a scalar output's 1), zeros where
    nothing depends on x; detached unless ``create_graph``. Terms whose output does not depend on the inputs add
    nothing (their rows of the product are 0)."""
    live = [(o, w) for o, w in zip(outputs, weights) if o.requires_grad]
    if not live:
        return [torch.zeros_like(x) for x in inputs]
    grads = torch.autograd.grad([o for o, _ in live], list(inputs), grad_outputs=[w for _, w in live],
                                retain_graph=True, create_graph=create_graph, allow_unused=True,
                                materialize_grads=True)
    return list(grads) if create_graph else [g.detach() for g in grads]


def sum_tied_table(stage: Stage, parts: dict[str, Tensor]) -> dict[str, Tensor]:
    """``parts`` (module name -> this rank's tensor of that module's weight: a gradient or a product) with a tied
    table's two uses summed on rank 0: the last rank sends its head copy's part there and drops it, rank 0 adds
    it to the table's own, as autograd sums both uses of one shared tensor. Both ranks must hold the table's part
    (the same module selection on every rank) or neither."""
    if EMBEDDING not in parts:
        return parts
    if stage.lends_table:
        send(parts.pop(EMBEDDING), 0, TIED)
    elif stage.receives_table:
        parts[EMBEDDING] = parts[EMBEDDING] + receive(parts[EMBEDDING].shape, stage.split.size - 1, TIED)
    return parts


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

