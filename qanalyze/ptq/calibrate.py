"""Layer-by-layer calibration of a decoder: each linear module's input statistics ``Σ XᵀX``, gathered from
the model whose earlier decoder layers are already quantized (GPTQ's sequential order).

The calibration windows run through the embeddings once, up to the first decoder layer, whose inputs (hidden
states and the keyword arguments the model passes it: rotary embeddings, mask, positions) are kept. Then,
for each decoder layer in order: forward hooks on its target linear modules add ``XᵀX`` of every batch to a
float64 sum per module (``in x in``: the inputs themselves are not kept, so memory does not grow with the
number of windows); the caller quantizes the layer from those sums; the layer runs again, now quantized,
and its outputs become the next layer's inputs. Two passes per layer, one model forward in all for each.

Modules that share one input tensor (q/k/v of an attention, gate/up of an MLP) share one product.

Under torchrun each rank runs its share of the batches (`qanalyze.distributed.shard`: batch i on rank i mod N),
and every module's ``Σ XᵀX`` and row count are summed over the ranks before the layer is quantized, so every rank
quantizes it from the same H as one process and the next layer's inputs are those one process computes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from qanalyze.distributed import all_reduce_floats, all_reduce_sum, shard
from qanalyze.errors import ConfigError, DataError
from qanalyze.lm_data import Windows, window_batches


@dataclass
class InputStats:
    """``xtx = Σ XᵀX`` (float64, ``in x in``) over the ``rows`` input rows (tokens) a module has seen."""

    xtx: torch.Tensor
    rows: int = 0

    def hessian(self) -> torch.Tensor:
        """GPTQ's layer Hessian ``H = 2 XᵀX / rows`` (float64): the mean over tokens, which only rescales H."""
        if self.rows == 0:
            raise DataError("no calibration rows reached this module")
        return self.xtx * (2.0 / self.rows)

    def output_error(self, delta: torch.Tensor) -> float:
        """Mean over calibration tokens of ``‖ΔW x‖²``: the squared change of the module's output that a weight
        change ``delta`` ``(out, in)`` causes, ``tr(ΔW XᵀX ΔWᵀ) / rows``."""
        d = delta.to(torch.float64)
        return float(((d @ self.xtx) * d).sum()) / max(self.rows, 1)


@dataclass
class _Accumulator:
    """Forward hooks adding each target module's ``XᵀX`` to its `InputStats`; a product is reused for
    modules whose input is the very same tensor (the cache holds the tensor, so its id is never reused)."""

    stats: dict[str, InputStats] = field(default_factory=dict)
    _last: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def hook(self, name: str) -> Callable[..., None]:
        def add(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
            x = args[0]
            product = next((p for seen, p in self._last if seen is x), None)
            if product is None:
                rows = x.detach().reshape(-1, x.shape[-1]).float()
                # float32 products of one batch summed in float64: the sum over thousands of tokens is where
                # float32 would lose digits, not one batch's GEMM
                product = (rows.T @ rows).double()
                self._last.append((x, product))
            entry = self.stats.setdefault(name, InputStats(torch.zeros_like(product)))
            entry.xtx += product
            entry.rows += x.numel() // x.shape[-1]
        return add

    def end_batch(self) -> None:
        """Forget the batch's shared products (and release its tensors)."""
        self._last.clear()


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's list of decoder layers: the `ModuleList` with ``config.num_hidden_layers`` entries
    (``model.layers`` of LLaMA-like models). ConfigError when there is none."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and count is not None and len(module) == count:
            return module
    raise ConfigError(f"{type(model).__name__}: no list of {count} decoder layers found for layer-by-layer calibration")


def _check_uniform_layers(model: torch.nn.Module) -> None:
    # the first layer's keyword arguments (its attention mask) are reused for every layer
    types = set(getattr(model.config, "layer_types", None) or ())
    if len(types) > 1:
        raise ConfigError(f"{type(model).__name__} mixes decoder layer types {sorted(types)} (sliding-window "
                          "attention); layer-by-layer calibration reuses one attention mask and does not support it")


class _Stop(Exception):
    """Raised by the first layer's pre-hook: the rest of the model is not needed."""


CalibrationData = Any
"""What calibration runs on: the ``lm`` task's `Windows`, or a classification task's `qanalyze.data.Encoded`
examples (each run as its own batch, unpadded, so that no padding token enters ``XᵀX``)."""

LayerInputs = list[tuple[torch.Tensor, tuple[Any, ...], dict[str, Any]]]
"""Per batch: the hidden states a decoder layer receives, its other positional arguments and its keyword
arguments (rotary embeddings, mask, positions)."""


def calibration_size(data: CalibrationData) -> int:
    """How many windows or examples ``data`` holds."""
    return len(data)


def _model_inputs(data: CalibrationData, batch_size: int, device: torch.device) -> Iterator[dict[str, Any]]:
    if isinstance(data, Windows):
        for batch in window_batches(data, batch_size):
            yield {"input_ids": batch.to(device), "use_cache": False}
        return
    from qanalyze.data import Encoded

    if not isinstance(data, Encoded):
        raise ConfigError(f"calibration runs on lm windows or encoded examples, not {type(data).__name__}")
    for features in data.features:
        yield {key: torch.tensor([value], device=device) for key, value in features.items()}


def draw_calibration(data: CalibrationData, count: int, *, seed: int) -> CalibrationData:
    """``count`` windows (or examples) of ``data`` drawn without replacement by a generator seeded with
    ``seed``, kept in their original order; all of ``data`` when it holds no more than ``count``."""
    total = calibration_size(data)
    if total == 0:
        raise DataError("calibration needs at least one window or example, and the training split has none")
    if total <= count:
        return data
    generator = torch.Generator().manual_seed(seed)
    chosen = sorted(torch.randperm(total, generator=generator)[:count].tolist())
    if isinstance(data, Windows):
        return Windows(input_ids=data.input_ids[chosen], text_tokens=data.text_tokens,
                       indices=tuple(data.indices[i] for i in chosen), where=data.where)
    from qanalyze.data import Encoded

    return Encoded([data.features[i] for i in chosen], data.labels[chosen])


def batch_count(data: CalibrationData, batch_size: int) -> int:
    """How many batches `first_layer_inputs` makes of ``data``: of ``batch_size`` windows, or one per example."""
    return -(-len(data) // batch_size) if isinstance(data, Windows) else calibration_size(data)


def first_layer_inputs(model: torch.nn.Module, data: CalibrationData, *, batch_size: int = 4,
                       batches: Sequence[int] | None = None) -> LayerInputs:
    """The hidden states and other arguments the model passes its first decoder layer, one triple per batch
    of ``batch_size`` windows (or per example of encoded examples); only the batches of index ``batches``
    when given (a rank's share)."""
    layers = decoder_layers(model)
    if calibration_size(data) == 0:
        raise DataError("calibration needs at least one window or example")
    captured: LayerInputs = []

    def catch(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        captured.append((hidden, rest, dict(kwargs)))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    device = next(model.parameters()).device
    wanted = None if batches is None else set(batches)
    try:
        with torch.no_grad():
            for index, inputs in enumerate(_model_inputs(data, batch_size, device)):
                if wanted is not None and index not in wanted:
                    continue
                with contextlib.suppress(_Stop):
                    model(**inputs)
    finally:
        handle.remove()
    return captured


def _run_layer(layer: torch.nn.Module, inputs: LayerInputs,
               on_batch: Callable[[], None] | None = None) -> list[torch.Tensor]:
    outputs = []
    with torch.no_grad():
        for hidden, rest, kwargs in inputs:
            out = layer(hidden, *rest, **kwargs)
            outputs.append(out[0] if isinstance(out, tuple) else out)
            if on_batch is not None:
                on_batch()
    return outputs


LayerCallback = Callable[[int, dict[str, tuple[torch.nn.Module, InputStats]]], None]
"""Called once per decoder layer with targets: (layer index, {module name: (module, its input stats)});
it quantizes those modules in place before the layer's outputs are computed."""


def sequential_calibration(model: torch.nn.Module, windows: CalibrationData, targets: Sequence[str],
                           on_layer: LayerCallback, *, batch_size: int = 4) -> None:
    """Run ``model`` on ``windows`` layer by layer, calling ``on_layer`` with the input statistics of the
    ``targets`` (module names) of each decoder layer, in order, each gathered with the earlier layers as
    ``on_layer`` left them. ConfigError for a target outside the decoder layers."""
    _check_uniform_layers(model)
    layers = decoder_layers(model)
    names = {module: name for name, module in model.named_modules()}
    prefix = {index: names[layer] + "." for index, layer in enumerate(layers)}
    wanted = set(targets)
    by_layer: dict[int, dict[str, torch.nn.Module]] = {}
    for index, layer in enumerate(layers):
        for sub, module in layer.named_modules():
            if prefix[index] + sub in wanted:
                by_layer.setdefault(index, {})[prefix[index] + sub] = module
    outside = wanted - {name for found in by_layer.values() for name in found}
    if outside:
        raise ConfigError(f"layer-by-layer calibration reaches modules inside decoder layers only, not "
                          f"{', '.join(sorted(outside))}")
    mine = shard(batch_count(windows, batch_size), "calibration batches (--calib-windows windows, --calib-batch "
                                                   "per batch)")
    inputs = first_layer_inputs(model, windows, batch_size=batch_size, batches=mine)
    last = max(by_layer, default=-1)
    for index, layer in enumerate(layers[: last + 1]):
        modules = by_layer.get(index)
        if modules:
            accumulator = _Accumulator()
            handles = [m.register_forward_hook(accumulator.hook(n)) for n, m in modules.items()]
            try:
                _run_layer(layer, inputs, accumulator.end_batch)
            finally:
                for handle in handles:
                    handle.remove()
            _reduce_stats(accumulator.stats)
            on_layer(index, {name: (module, accumulator.stats[name]) for name, module in modules.items()})
        if index < last:
            inputs = [(out, rest, kwargs) for out, (_, rest, kwargs) in zip(_run_layer(layer, inputs), inputs)]


def _reduce_stats(stats: dict[str, InputStats]) -> None:
    """Every module's ``Σ XᵀX`` and rows summed over all ranks (nothing when not distributed)."""
    names = sorted(stats)
    for name in names:
        all_reduce_sum(stats[name].xtx)
    for name, rows in zip(names, all_reduce_floats([stats[name].rows for name in names])):
        stats[name].rows = round(rows)
