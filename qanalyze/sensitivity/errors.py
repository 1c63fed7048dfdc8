"""Quantization error of weights, activations and gradients, measured on real batches through hooks.

For each module and bit-width:
- weight error ``‖Q_b(W) − W‖²`` per candidate group layout (pure, from `qanalyze.quant.primitives`);
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

from qanalyze.models import ModuleInfo
from qanalyze.quant.primitives import fake_quantize


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


def _relative(error: torch.Tensor, reference: torch.Tensor) -> float:
    denominator = torch.linalg.vector_norm(reference.double())
    return float(torch.linalg.vector_norm(error.double()) / denominator) if denominator > 0 else 0.0


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

    def _on_input(self, name: str):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0]
            if not torch.is_floating_point(x):  # embeddings take token ids: nothing to quantize
                return
            examples = x.shape[0] if x.ndim > 1 else 1
            sums = self.sums[name]
            with torch.no_grad():
                flat = x.detach().reshape(-1)
                for b in self.bits:
                    err = fake_quantize(flat, b) - flat
                    sums.activation[b] += float(err.double().square().sum()) / examples
                    sums.activation_relative[b] += _relative(err, flat)
            if self.infos[name].kind == "linear":
                self._inputs[name] = x.detach()
            if x.requires_grad:
                x.register_hook(self._on_input_grad(name, x.detach(), examples))

        return hook

    def _on_input_grad(self, name: str, x: torch.Tensor, examples: int):
        def hook(grad: torch.Tensor) -> None:
            with torch.no_grad():
                flat, g2 = x.reshape(-1), grad.detach().reshape(-1).double().square()
                for b in self.bits:
                    err = (fake_quantize(flat, b) - flat).double()
                    self.sums[name].activation_weighted[b] += float((g2 * err.square()).sum()) / examples

        return hook

    def _on_output_grad(self, name: str):
        def hook(module: nn.Module, grad_input: tuple, grad_output: tuple) -> None:
            x = self._inputs.pop(name, None)
            if x is None or grad_output[0] is None:
                return
            with torch.no_grad():
                g = grad_output[0].detach().reshape(-1, grad_output[0].shape[-1])
                xs = x.reshape(-1, x.shape[-1])
                w = _linear_weight(module, self.infos[name]).detach()
                weight_grad, input_grad = g.t() @ xs, g @ w
                sums = self.sums[name]
                for b in self.gradient_bits:
                    mean_dw = torch.zeros_like(weight_grad)
                    mean_dx = torch.zeros_like(input_grad)
                    for _ in range(self.draws):
                        dg = fake_quantize(g, b, rounding="stochastic", generator=self.generator) - g
                        dw, dx = dg.t() @ xs, dg @ w  # linear in G: the error of each product
                        sums.weight_grad[b] += _relative(dw, weight_grad) / self.draws
                        sums.input_grad[b] += _relative(dx, input_grad) / self.draws
                        mean_dw += dw / self.draws
                        mean_dx += dx / self.draws
                    sums.weight_grad_bias[b] += _relative(mean_dw, weight_grad)
                    sums.input_grad_bias[b] += _relative(mean_dx, input_grad)

        return hook

    def end_batch(self) -> None:
        """Close one batch: every module's sums now hold one more batch."""
        for sums in self.sums.values():
            sums.batches += 1
        self._inputs.clear()
