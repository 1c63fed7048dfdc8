"""Thin modules that hold a swapped layer's parameters and quantization settings and call a Function.

Each module takes over the original layer's ``weight`` and ``bias`` Parameters (the same objects),
so the optimizer, the state dict keys and ``save_pretrained`` see the model unchanged: the master
weights stay FP32 and are updated in FP32. ``quantized_weight()`` gives the integer codes and scales
a packed checkpoint stores; ``freeze(quantized)`` makes the module use given codes (a loaded
checkpoint) instead of quantizing its float weight.

With ``spec.weight_range == "mse"`` a module keeps its clipping ratios in the buffer ``clip_ratio``, found once
from the weight it starts from (`weight_clip`): fine-tuning moves weights by little, a fresh search over every
weight each step would cost more than the step, and a checkpoint restores the buffer with the weights.
"""

from __future__ import annotations

import torch
from torch import nn

from qanalyze.distributed import all_reduce_max
from qanalyze.engine.functions import (
    IntEmbeddingFunction,
    IntLayerNormFunction,
    IntLinearFunction,
    TensorSpec,
    fake_quantize_ste,
    quantize_tokens,
    quantize_weight,
    straight_through,
    weight_clip,
)
from qanalyze.quant.columns import ColumnQuantized
from qanalyze.quant.ggml import GGMLQuantized
from qanalyze.quant.layouts import quantize_layout
from qanalyze.quant.primitives import Quantized, qmax

EMA_DECAY = 0.9999
"""Q8BERT's decay of the exponential moving average of activation ranges."""


class _Swapped(nn.Module):
    """What every swapped module shares: the original parameters, the spec, a generator, frozen codes."""

    def __init__(self, original: nn.Module, spec: TensorSpec, generator: torch.Generator, *,
                 transposed: bool = False) -> None:
        super().__init__()
        self.weight = original.weight
        self.bias = getattr(original, "bias", None)
        self.spec = spec
        self.generator = generator
        self.transposed = transposed
        self._frozen: Quantized | None = None
        self._cache: tuple[int, Quantized] | None = None
        self.clip_ratio: torch.Tensor | None
        self.register_buffer("clip_ratio", weight_clip(self.matrix(), spec))

    def matrix(self) -> torch.Tensor:
        """The weight as ``(out, in)`` (GPT-2's Conv1D stores it ``(in, out)``)."""
        return self.weight.t() if self.transposed else self.weight

    def quantized_weight(self) -> Quantized:
        """The integer codes and scales the forward pass uses now (frozen, cached, or fresh)."""
        if self._frozen is not None:
            return self._frozen
        version = self.weight._version
        if self._cache is None or self._cache[0] != version:
            self._cache = (version, quantize_weight(self.matrix(), self.spec, self.clip_ratio))
        return self._cache[1]

    def freeze(self, quantized: Quantized) -> None:
        """Use ``quantized`` as the weight from now on (evaluation of a packed checkpoint)."""
        self._frozen = quantized
        with torch.no_grad():
            values = quantized.dequantize().to(self.weight.dtype)
            self.weight.copy_(values.t() if self.transposed else values)

    def _weight_for_forward(self) -> Quantized | None:
        # in training the weight changes every step, so it is quantized inside the Function (unless it is
        # clipped: the Functions know only the max rule); in evaluation the cached codes are reused until
        # the weight changes
        if self._frozen is not None:
            return self._frozen
        return None if self.training and self.clip_ratio is None else self.quantized_weight()

    def extra_repr(self) -> str:
        spec = self.spec
        groups = "tensor" if spec.rows_per_group is None else f"{spec.rows_per_group} rows"
        inputs = ", input per token" if spec.per_token else ""
        clipped = ", mse-clipped" if spec.weight_range == "mse" else ""
        return (f"W{spec.weight_bits} A{spec.activation_bits} G{spec.gradient_bits}, groups of {groups}{inputs}, "
                f"{spec.quantizer}{clipped}")


class IntLinear(_Swapped):
    """A linear layer on the integer path (`IntLinearFunction`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return IntLinearFunction.apply(x, self.matrix(), self.bias, self.spec, self.generator,
                                       self._weight_for_forward())


class IntEmbedding(_Swapped):
    """An embedding on the integer path (`IntEmbeddingFunction`)."""

    def __init__(self, original: nn.Embedding, spec: TensorSpec, generator: torch.Generator) -> None:
        super().__init__(original, spec, generator)
        self.padding_idx = original.padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return IntEmbeddingFunction.apply(ids, self.weight, self.spec, self.generator, self.padding_idx,
                                          self._weight_for_forward())


class IntLayerNorm(_Swapped):
    """A layer norm with integer statistics (`IntLayerNormFunction`)."""

    def __init__(self, original: nn.LayerNorm, spec: TensorSpec, generator: torch.Generator) -> None:
        super().__init__(original, spec, generator)
        self.eps = original.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return IntLayerNormFunction.apply(x, self.weight, self.bias, self.spec, self.generator, self.eps)

class QATLinear(_Swapped):
    """Q8BERT quantization-aware training: fake-quantized weight (per the plan's groups) and input
    (EMA range, decay 0.9999), straight-through gradients, float GEMM.

    With ``spec.per_token`` (a plan's ``activation_group: token``) the input takes one scale per token, each
    token's own max|x| at every step (LLM-QAT's per-token activations; what the integer path and dynamic PTQ
    use), and no EMA range: BERT's residual stream has a few outlier tokens that one range must cover.

    ``ranks_share_batch`` (set by the trainer of a run on several ranks, `qanalyze.engine.data_parallel`): the
    range is updated with max|x| over every rank's share of the batch, the maximum one process would see.
    """

    def __init__(self, original: nn.Module, spec: TensorSpec, generator: torch.Generator, *,
                 transposed: bool = False) -> None:
        super().__init__(original, spec, generator, transposed=transposed)
        self.register_buffer("activation_range", torch.zeros((), device=original.weight.device))
        self.ranks_share_batch = False

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.per_token:
            return straight_through(x, quantize_tokens(x, self.spec).dequantize().reshape(x.shape))
        if self.training:
            current = x.detach().abs().amax().float()
            if self.ranks_share_batch:
                all_reduce_max(current)
            with torch.no_grad():
                first = bool(self.activation_range == 0)
                self.activation_range.copy_(current if first else
                                            EMA_DECAY * self.activation_range + (1 - EMA_DECAY) * current)
        if not bool(self.activation_range > 0):
            return fake_quantize_ste(x, self.spec.activation_bits)
        scale = self.activation_range / qmax(self.spec.activation_bits)
        return fake_quantize_ste(x, self.spec.activation_bits, scale=scale.to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.matrix()
        fake = quantize_weight(weight, self.spec, self.clip_ratio).dequantize()
        return nn.functional.linear(self._input(x), straight_through(weight, fake), self.bias)


class QATColumnLinear(QATLinear):
    """Quantization-aware training of a weight-only PTQ plan: the weight fake-quantized in its column layout
    (``spec.column_group``: column groups with float16 scales and zero points, or a GGML type's blocks, exactly as
    ``qanalyze quantize --method rtn`` rounds it), straight-through gradients, float GEMM. The input stays float
    unless the plan gives it fewer than 16 bits."""

    def column_quantized(self) -> ColumnQuantized | GGMLQuantized:
        """The weight's codes in its column layout now (what the run's packed checkpoint stores)."""
        spec = self.spec
        assert spec.column_group is not None
        return quantize_layout(self.matrix().detach(), spec.weight_bits, spec.column_group,
                               symmetric=spec.column_symmetric)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.matrix()
        fake = self.column_quantized().dequantize().to(weight.dtype)
        inputs = self._input(x) if self.spec.activation_bits < 16 else x
        return nn.functional.linear(inputs, straight_through(weight, fake), self.bias)

    def extra_repr(self) -> str:
        scheme = "sym" if self.spec.column_symmetric else "asym"
        return f"W{self.spec.weight_bits} {self.spec.column_group} ({scheme}), straight-through"


class QATEmbedding(_Swapped):
    """Q8BERT's fake-quantized embedding table (straight-through gradients)."""

    def __init__(self, original: nn.Embedding, spec: TensorSpec, generator: torch.Generator) -> None:
        super().__init__(original, spec, generator)
        self.padding_idx = original.padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        fake = quantize_weight(self.weight, self.spec, self.clip_ratio).dequantize()
        return nn.functional.embedding(ids, straight_through(self.weight, fake), self.padding_idx)
