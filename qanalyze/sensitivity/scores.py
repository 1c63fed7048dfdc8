"""One-pass, gradient-weighted quantization scores of every module from the same per-example passes.

Each calibration example (for task ``lm``: each window) runs one forward and one backward pass on its
own; from those passes, for every selected module and candidate (bits, group layout):

- ``fisher``: the empirical-Fisher weighted error ``Σ_i F_ii ΔW_i²``, with ``F_ii`` the mean over passes of
  the squared per-example gradient (the square of a batch gradient would be the Fisher of the mean,
  which cross-example cancellation makes far smaller than the Fisher itself);
- ``output-gradient`` (NVIDIA ModelOpt AutoQuantize's score): ``E[Σ (∂L/∂Y)² (Y − Y_q)²]``, the mean over
  passes of the sum over the module's outputs, where ``Y_q`` is the output with only this module's weight
  quantized. It costs no extra forward of the model: a module is linear in its weight, so ``Y − Y_q`` is
  the module applied to ``−ΔW`` (``X ΔWᵀ`` for a linear layer, the looked-up rows of ΔW for an embedding),
  and ∂L/∂Y comes from a hook on the output in the same backward pass. A norm's gain enters as
  ``module(X; Q(W)) − module(X; W)`` (Gemma's ``1 + w`` is not linear in w).

The labels of the passes are the data's (``score_labels="data"``: the empirical Fisher) or drawn from the
model's own next-token (class) distribution (``"sampled"``: a one-sample estimate of the true Fisher, which is
the Hessian of KL(p_ref ‖ p_quant) at the unquantized weights: the quantity llama.cpp and exllamav3 measure).

A tied weight (SmolLM2's embedding is its LM head) gets its Fisher from the full gradient of the shared
tensor; its output-gradient score counts the module's own output only (the embedding lookup).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from qanalyze.errors import ConfigError, NonFiniteError
from qanalyze.models import ModuleInfo
from qanalyze.sensitivity.candidates import CandidateSteps

SCORE_METRICS = ("fisher", "output-gradient")
"""The `AnalyzeConfig` metrics this module measures."""

PRODUCT_ELEMENTS = 1 << 24
"""Candidates of one linear layer are multiplied stacked, as many per GEMM as keep its output under this many
elements (64 MB in float32): fewer, larger GEMMs, and a bounded peak whatever the window length."""


def _linear_scores(module: nn.Module, info: ModuleInfo, steps: CandidateSteps, x: torch.Tensor, g2: torch.Tensor,
                   candidates: Sequence[tuple[int, str]]) -> list[float]:
    x = x.reshape(-1, x.shape[-1])
    g2 = g2.reshape(-1, g2.shape[-1])
    # Tokens whose output gradient is zero (padding, tokens the loss does not read) add nothing.
    live = g2.amax(dim=1) > 0
    if not bool(live.all()):
        x, g2 = x[live], g2[live]
    outputs = g2.shape[1]
    per_product = max(1, PRODUCT_ELEMENTS // max(1, x.shape[0] * outputs))
    scores: list[float] = []
    for start in range(0, len(candidates), per_product):
        chunk = candidates[start:start + per_product]
        # GPT-2's Conv1D stores (in, out): its ΔW's rows are inputs, so the output error is X ΔW.
        deltas = [steps.delta(b, g).to(x.dtype) for b, g in chunk]
        stacked = torch.cat([d.t() for d in deltas] if info.transposed else deltas)
        error = (x @ (stacked if info.transposed else stacked.t())).view(x.shape[0], len(chunk), outputs)
        weighted = error.square_().mul_(g2.unsqueeze(1))
        scores.extend(weighted.sum(dim=(0, 2), dtype=torch.float64).tolist())
    return scores


def _embedding_scores(module: nn.Module, info: ModuleInfo, steps: CandidateSteps, ids: torch.Tensor,
                      g2: torch.Tensor, candidates: Sequence[tuple[int, str]]) -> list[float]:
    # A row looked up several times contributes Σ_t g_t² once per candidate: gather the squared gradients by
    # row first, then only the rows the pass read are quantized.
    rows, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
    by_row = torch.zeros(rows.numel(), g2.shape[-1], dtype=torch.float64, device=g2.device)
    by_row.index_add_(0, inverse, g2.reshape(-1, g2.shape[-1]).to(torch.float64))
    return [float((steps.delta(b, g, rows).to(torch.float64).square_() * by_row).sum()) for b, g in candidates]


def _norm_scores(module: nn.Module, info: ModuleInfo, steps: CandidateSteps, x: torch.Tensor, g2: torch.Tensor,
                 candidates: Sequence[tuple[int, str]]) -> list[float]:
    weight = module.weight.detach()
    reference = module(x)
    scores = []
    for b, g in candidates:
        quantized = weight + steps.delta(b, g).reshape(weight.shape).to(weight.dtype)
        error = torch.func.functional_call(module, {"weight": quantized}, (x,)) - reference
        scores.append(float((error.to(torch.float64).square_() * g2).sum()))
    return scores


OUTPUT_SCORES: dict[str, Callable[..., list[float]]] = {
    "linear": _linear_scores,
    "embedding": _embedding_scores,
    "layernorm": _norm_scores,
    "rmsnorm": _norm_scores,
}
"""Module kind -> ``score(module, info, steps, input, squared output gradient, candidates)``: one
``Σ (∂L/∂Y)² (Y − Y_q)²`` per candidate, for one pass."""


Batch = Mapping[str, torch.Tensor]


def _data_labels(model: nn.Module, batch: Batch, generator: torch.Generator) -> Batch:
    return batch


def _sampled_labels(model: nn.Module, batch: Batch, generator: torch.Generator) -> Batch:
    labels = batch.get("labels")
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point():
        raise ConfigError("sampled score labels need class or next-token labels (not a regression)")
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
    causal = labels.dim() == 2 and labels.shape == batch["input_ids"].shape
    # A causal LM's loss reads the logits at t against the label at t + 1 (the model shifts them itself).
    predicted = logits[:, :-1] if causal else logits
    probabilities = torch.softmax(predicted.reshape(-1, predicted.shape[-1]), dim=-1)
    drawn = torch.multinomial(probabilities, 1, generator=generator).view(predicted.shape[:-1])
    sampled = torch.cat([labels[:, :1], drawn], dim=1) if causal else drawn
    return {**batch, "labels": sampled.to(labels.dtype)}


SCORE_LABELS: dict[str, Callable[[nn.Module, Batch, torch.Generator], Batch]] = {
    "data": _data_labels,
    "sampled": _sampled_labels,
}
"""``score_labels`` -> ``relabel(model, example, generator)``: the labels a score pass differentiates."""


@dataclass
class ScoreSums:
    """Running sums of one module over passes: squared gradients and output-gradient scores per candidate."""

    squared_gradient: torch.Tensor | None = None
    output: dict[tuple[int, str], float] = field(default_factory=dict)


class ScoreProbe:
    """Hooks on the chosen modules that add each pass's output-gradient scores to `sums`.

    Use as a context manager around per-example forward and backward passes. ``output_steps`` holds the
    candidates the output-gradient score is measured at (None: not measured).
    """

    def __init__(self, modules: Mapping[str, nn.Module], infos: Mapping[str, ModuleInfo],
                 output_steps: Mapping[str, CandidateSteps] | None) -> None:
        self.modules, self.infos, self.output_steps = modules, infos, output_steps
        self.sums = {name: ScoreSums() for name in modules}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> ScoreProbe:
        if self.output_steps is not None:
            for name, module in self.modules.items():
                if self.infos[name].kind in OUTPUT_SCORES:
                    self._handles.append(module.register_forward_hook(self._on_output(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _on_output(self, name: str):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if isinstance(output, torch.Tensor) and output.requires_grad:
                x = args[0].detach()
                output.register_hook(lambda grad: self._score(name, module, x, grad))

        return hook

    def _score(self, name: str, module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
        info, steps = self.infos[name], self.output_steps[name]
        candidates = list(steps.candidates())
        with torch.no_grad():
            scores = OUTPUT_SCORES[info.kind](module, info, steps, x, grad.detach().square(), candidates)
        totals = self.sums[name].output
        for candidate, score in zip(candidates, scores):
            totals[candidate] = totals.get(candidate, 0.0) + score


def single_examples(batch: Mapping[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
    """Each example of ``batch`` alone, cut to its own length when the batch is right-padded (the
    loss and its gradients are those of the example encoded alone; the pass skips the padding)."""
    mask = batch.get("attention_mask")
    rows = next(iter(batch.values())).shape[0]
    for row in range(rows):
        single = {key: value[row:row + 1] for key, value in batch.items()}
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            length = int(mask[row].sum())
            if 0 < length < mask.shape[1] and bool(mask[row, :length].all()):
                single = {key: value[:, :length] if value.dim() > 1 and value.shape[1] == mask.shape[1] else value
                          for key, value in single.items()}
        yield single


@dataclass(frozen=True)
class Scores:
    """What `measure_scores` found: ``fisher`` (the mean squared per-example gradient of each weight, or
    None when not asked), ``output`` (per module, ``{bits: {group: score}}``), and the passes run."""

    fisher: dict[str, torch.Tensor] | None
    output: dict[str, dict[str, dict[str, float]]]
    passes: int


def measure_scores(model: nn.Module, infos: Sequence[ModuleInfo], batches: Sequence[Mapping[str, torch.Tensor]], *,
                   fisher: bool, output_steps: Mapping[str, CandidateSteps] | None, labels: str = "data",
                   generator: torch.Generator | None = None,
                   progress: Callable[[str, int, int, str], None] | None = None,
                   indices: Sequence[int] | None = None,
                   generator_for: Callable[[int], torch.Generator] | None = None) -> Scores:
    """Per-example passes over ``batches``: the Fisher diagonal of every module's weight (when ``fisher``) and
    the output-gradient scores at the candidates of ``output_steps`` (when given), from the same passes, with
    the labels ``labels`` names (`SCORE_LABELS`; ``sampled`` draws them with ``generator``, or, when
    ``generator_for`` is given, those of batch ``indices[k]`` with ``generator_for(indices[k])``).

    Under torchrun ``batches`` are this rank's share (``indices``: their global indices, default 0, 1, ...):
    the sums are reduced over every rank before the means are taken (`qanalyze.distributed`).

    The model runs in eval mode; its parameters' ``requires_grad`` flags and gradients are as before.
    NonFiniteError when a pass's loss is NaN or infinite.
    """
    report = progress or (lambda *_: None)
    if labels not in SCORE_LABELS:
        raise ConfigError(f"unknown score labels {labels!r}; known: {', '.join(SCORE_LABELS)}")
    relabel = SCORE_LABELS[labels]
    generator = generator or torch.Generator().manual_seed(0)
    modules = dict(model.named_modules())
    chosen = {info.name: modules[info.name] for info in infos}
    weights = {name: module.weight for name, module in chosen.items()}
    probe = ScoreProbe(chosen, {info.name: info for info in infos}, output_steps)
    saved = [(p, p.requires_grad) for p in model.parameters()]
    wanted = {id(w) for w in weights.values()}
    passes = 0
    was_training = model.training
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(id(p) in wanted)
        with probe:
            for done, (index, batch) in enumerate(zip(indices or range(len(batches)), batches)):
                report("fisher/output-gradient", done, len(batches), f"batch {index + 1}")
                if generator_for is not None:  # the same draws whichever rank runs this batch
                    generator = generator_for(index)
                for single in single_examples(batch):
                    loss = model(**relabel(model, single, generator)).loss
                    if not torch.isfinite(loss):
                        raise NonFiniteError(f"the loss on an example of calibration batch {index + 1} is "
                                             f"{float(loss)}")
                    grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
                    if fisher:
                        for name, grad in zip(weights, grads):
                            if grad is not None:
                                _add_square(probe.sums[name], grad)
                    passes += 1
        report("fisher/output-gradient", len(batches), len(batches), "done")
    finally:
        model.train(was_training)
        for p, flag in saved:
            p.requires_grad_(flag)
    passes = _reduce_sums(probe, weights, output_steps, passes, fisher)
    count = max(passes, 1)
    fisher_diagonals = None
    if fisher:
        fisher_diagonals = {}
        for name, weight in weights.items():
            total = probe.sums[name].squared_gradient
            fisher_diagonals[name] = torch.zeros_like(weight) if total is None else total.div_(count)
    output: dict[str, dict[str, dict[str, float]]] = {}
    for name, sums in probe.sums.items():
        for (b, g), value in sums.output.items():
            output.setdefault(name, {}).setdefault(str(b), {})[g] = value / count
    return Scores(fisher_diagonals, output, passes)


def _reduce_sums(probe: ScoreProbe, weights: Mapping[str, torch.Tensor],
                output_steps: Mapping[str, CandidateSteps] | None, passes: int, fisher: bool) -> int:
    """Sum the probe's squared gradients and output scores, and the passes (returned), over every rank; nothing
    when not distributed. A module no rank scored keeps no output scores, as in one process."""
    from qanalyze.distributed import all_reduce_floats, all_reduce_sum, world

    if not world().distributed:
        return passes
    if fisher:
        for name, weight in sorted(weights.items()):
            sums = probe.sums[name]
            if sums.squared_gradient is None:
                sums.squared_gradient = torch.zeros_like(weight.detach())
            all_reduce_sum(sums.squared_gradient)
    layout = [(name, list(steps.candidates())) for name, steps in sorted((output_steps or {}).items())]
    flat = [float(passes)]
    for name, candidates in layout:
        totals = probe.sums[name].output
        flat += [1.0 if totals else 0.0, *(totals.get(c, 0.0) for c in candidates)]
    reduced = iter(all_reduce_floats(flat))
    passes = round(next(reduced))
    for name, candidates in layout:
        present = next(reduced) > 0
        values = [next(reduced) for _ in candidates]
        probe.sums[name].output = dict(zip(candidates, values)) if present else {}
    return passes


def _add_square(sums: ScoreSums, grad: torch.Tensor) -> None:
    # In the gradient's own dtype and in place: a float64 copy and its square would be two more tensors the size of
    # every weight (1.7 GB on SmolLM2-135M); a float32 sum of at most a few hundred positive terms is exact to ~1e-5.
    grad = grad.detach()
    if sums.squared_gradient is None:
        sums.squared_gradient = grad.square()
    else:
        sums.squared_gradient.addcmul_(grad, grad)
