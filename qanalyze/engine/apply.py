"""``apply_plan(model, plan, mode)``: swap the planned modules for quantized ones, by name.

The policy layer of the engine: which module becomes what is decided here, from the plan and the
mode's registry entry. Modules the plan keeps in float are not touched. Like torchao's
``quantize_``, the model is changed in place (the swapped modules take over the original
Parameters, so an optimizer built before or after sees the same tensors).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from qanalyze.engine.functions import TensorSpec
from qanalyze.engine.int4 import Int4Embedding, Int4Linear, Int4Spec
from qanalyze.engine.kernels import forced_kernel
from qanalyze.engine.modules import (
    IntEmbedding,
    IntLayerNorm,
    IntLinear,
    QATColumnLinear,
    QATEmbedding,
    QATLinear,
    _Swapped,
)
from qanalyze.errors import ConfigError
from qanalyze.models import NORM_KINDS, ModuleInfo, head_dim, inventory, module_generator, parent_module
from qanalyze.plan.architecture import check_plan
from qanalyze.plan.entries import QuantizedEntry
from qanalyze.quant.layouts import column_fits, parse_layout, takes_columns
from qanalyze.quant.primitives import (
    ACTIVATION_GROUPS,
    GRADIENT_GROUPS,
    Quantized,
    module_weight_range,
    rows_per_group,
)
from qanalyze.records import BitPlan

DEFAULT_BITS = 16
"""Bits of a tensor the plan leaves unconstrained (an activation or gradient with no bits): the widest."""

Builder = Callable[..., nn.Module]
"""``builder(module, info, spec, generator, **options) -> swapped module``; ``options`` are the mode's
own settings (`apply_plan`'s ``options``, e.g. ``lss`` and ``block`` for int4)."""


def _linear(cls: type[_Swapped]) -> Builder:
    return lambda module, info, spec, generator, **_: cls(module, spec, generator, transposed=info.transposed)


def _qat_linear(module: nn.Module, info: ModuleInfo, spec: TensorSpec, generator: torch.Generator,
                **_: Any) -> nn.Module:
    cls = QATLinear if spec.column_group is None else QATColumnLinear
    return cls(module, spec, generator, transposed=info.transposed)


def _plain(cls: type[_Swapped]) -> Builder:
    return lambda module, info, spec, generator, **_: cls(module, spec, generator)


def _int4_linear(module: nn.Module, info: ModuleInfo, spec: TensorSpec, generator: torch.Generator,
                 **options: Any) -> nn.Module:
    return Int4Linear(module, spec, generator, transposed=info.transposed, int4=Int4Spec(**options))


def _int4_embedding(module: nn.Module, info: ModuleInfo, spec: TensorSpec, generator: torch.Generator,
                    **_: Any) -> nn.Module:
    return Int4Embedding(module, spec, generator)


@dataclass(frozen=True)
class Mode:
    """An engine mode: how each module kind is swapped, which quantizer it uses, and why a kind it cannot
    run is refused. The methods of `qanalyze.methods` that swap modules each name one."""

    name: str
    quantizer: str
    builders: Mapping[str, Builder]
    refused: Mapping[str, str] = field(default_factory=dict)
    fixed_bits: int | None = None
    """The weight and activation bits a mode always trains at (``int4``: 4). A plan asking for other bits is
    refused rather than silently run at these."""
    weight_ranges: bool = True
    """Whether the mode sets weight ranges as a plan entry's ``weight_range`` says (`WEIGHT_RANGES`); ``int4``
    learns its step sizes (LSQ) and ignores it."""
    activation_groups: tuple[str, ...] = ("tensor",)
    """The activation scale layouts (a plan's ``activation_group``) the mode can run: ``tensor`` (one scale)
    and ``token`` (one scale per row of the input, each row's own at every step)."""
    gradient_groups: tuple[str, ...] = ("tensor",)
    """The output-gradient scale layouts (a plan's ``gradient_group``, `GRADIENT_GROUPS`) the mode can run."""
    column_layouts: bool = False
    """Whether the mode runs weight-only column layouts (a PTQ plan's ``column_group``: ``g128``, ``Q4_K``...) on
    linear layers: ``qat`` fake-quantizes them as the PTQ methods round them."""


MODES: dict[str, Mode] = {
    "int": Mode("int", "dfp",
                {"linear": _linear(IntLinear), "embedding": _plain(IntEmbedding), "layernorm": _plain(IntLayerNorm)},
                {"rmsnorm": "the integer engine has no RMSNorm kernel (LLaMA-family norms run in float); mark it "
                            "float (--keep-float rmsnorm)"},
                activation_groups=ACTIVATION_GROUPS, gradient_groups=GRADIENT_GROUPS),
    "qat": Mode("qat", "symmetric", {"linear": _qat_linear, "embedding": _plain(QATEmbedding)},
                {"layernorm": "Q8BERT keeps layer norms in float; mark it float in the plan (--keep-float layernorm)",
                 "rmsnorm": "QAT keeps norms in float; mark it float in the plan (--keep-float rmsnorm)"},
                activation_groups=ACTIVATION_GROUPS, column_layouts=True),
    "ptq-dynamic": Mode("ptq-dynamic", "symmetric", {"linear": _linear(IntLinear), "embedding": _plain(IntEmbedding)},
                        {kind: "dynamic quantization covers GEMMs and embeddings only; mark it float"
                         for kind in NORM_KINDS},
                        # no training, so no output gradient is ever quantized: any layout is accepted
                        activation_groups=ACTIVATION_GROUPS, gradient_groups=GRADIENT_GROUPS),
    "int4": Mode("int4", "symmetric", {"linear": _int4_linear, "embedding": _int4_embedding},
                 {kind: "4-bit training keeps norms in float (Xi et al.); mark it float" for kind in NORM_KINDS},
                 fixed_bits=4, weight_ranges=False),
}
"""Engine modes by name: the module swaps of the methods `int`, `qat`, `ptq-dynamic` and `int4`."""


def get_mode(name: str) -> Mode:
    """The mode registered under ``name``; ConfigError lists the known ones."""
    if name not in MODES:
        raise ConfigError(f"unknown mode {name!r}; known: {', '.join(MODES)}")
    return MODES[name]


@dataclass
class AppliedPlan:
    """What `apply_plan` did: the mode, each swapped module's spec, and the generators it created
    (saved in checkpoints so a resumed run draws the same stochastic roundings)."""

    mode: str
    specs: dict[str, TensorSpec]
    generators: dict[str, torch.Generator]


def _group(entry: QuantizedEntry, name: str, mode: Mode, key: str, known: tuple[str, ...],
           runs: tuple[str, ...], what: str) -> str:
    """A plan entry's scale layout ``key``, checked against the known ones and the mode's."""
    group = getattr(entry, key)
    if group not in known:
        raise ConfigError(f"plan module {name}: {key} {group!r} is not one of {', '.join(known)}")
    if group not in runs:
        raise ConfigError(f"mode {mode.name} cannot quantize {what} of {name} per {group}: it runs {key} "
                          f"{' or '.join(runs)}")
    return group


def _spec(name: str, entry: QuantizedEntry, info: ModuleInfo, model: nn.Module, mode: Mode) -> TensorSpec:
    column = entry.column_group is not None
    rows = rows_per_group(info.shape[0], entry.group, head_dim=head_dim(model, info)) \
        if info.kind not in NORM_KINDS and not column else None
    activation_group = _group(entry, name, mode, "activation_group", ACTIVATION_GROUPS, mode.activation_groups,
                              "the input")
    gradient_group = _group(entry, name, mode, "gradient_group", GRADIENT_GROUPS, mode.gradient_groups,
                            "the output gradient")
    try:
        return TensorSpec(
            weight_bits=entry.weight_bits,
            activation_bits=entry.activation_bits or DEFAULT_BITS,
            gradient_bits=entry.gradient_bits or DEFAULT_BITS,
            rows_per_group=None if rows == info.shape[0] else rows,
            # layer norms always take one scale per token (their statistics are per token)
            per_token=activation_group == "token" and info.kind == "linear",
            gradient_group=gradient_group if info.kind == "linear" else "tensor",
            quantizer=mode.quantizer,
            weight_range=module_weight_range(info.kind, entry.weight_range) if mode.weight_ranges and not column
            else "max",
            column_group=entry.column_group,
            column_symmetric=entry.scheme == "symmetric",
        )
    except ConfigError as exc:
        raise ConfigError(f"plan module {name}: {exc}") from None


def validate_plan(model: nn.Module, plan: BitPlan, mode: str) -> dict[str, TensorSpec]:
    """Check, without changing the model, that ``mode`` can run ``plan`` on it; return each planned
    module's spec. Refuses a plan for another architecture and a module kind the mode cannot run,
    naming the module and the reason."""
    chosen = get_mode(mode)
    infos = inventory(model)
    check_plan(plan, {info.name: list(info.shape) for info in infos})
    specs: dict[str, TensorSpec] = {}
    columns = any(isinstance(e, QuantizedEntry) and e.column_group is not None for e in plan.entries.values())
    for info in infos:
        entry = plan.entry(info.name)
        if not isinstance(entry, QuantizedEntry):
            continue
        if info.kind not in chosen.builders:
            why = chosen.refused.get(info.kind, f"mode {mode} has no {info.kind} module")
            raise ConfigError(f"mode {mode} cannot quantize {info.name} ({info.kind}): {why}")
        if entry.column_group is not None:
            _check_column_entry(info, entry, chosen)
        elif columns:
            raise ConfigError(f"the plan gives {info.name} a row layout ({entry.group}) beside column layouts: a "
                              "column plan quantizes linear weights only (keep it float, --keep-float embedding)")
        _check_fixed_bits(info.name, entry, chosen)
        specs[info.name] = _spec(info.name, entry, info, model, chosen)
    return specs


def _check_column_entry(info: ModuleInfo, entry: QuantizedEntry, mode: Mode) -> None:
    """A column-layout entry must be a linear layer stored (out, in) whose width the layout takes, in a mode
    that runs column layouts."""
    if not mode.column_layouts:
        # the engine's weights have row scales; running a column plan would quietly be another plan
        raise ConfigError(f"mode {mode.name} cannot run {info.name} in column groups ({entry.column_group}): column "
                          "layouts run in qanalyze quantize --method rtn|gptq, or train --mode qat")
    if not takes_columns(info.kind, info.transposed):
        raise ConfigError(f"{info.name} ({info.kind}) takes no column layout ({entry.column_group}): only linear "
                          "layers stored (out, in) do")
    if not column_fits(entry.weight_bits, entry.column_group, info.shape[1]):
        size = parse_layout(entry.column_group)
        raise ConfigError(f"{info.name}: {entry.weight_bits}-bit {size} does not fit its {info.shape[1]} input "
                          "columns")


def _check_fixed_bits(name: str, entry: QuantizedEntry, mode: Mode) -> None:
    if mode.fixed_bits is None:
        return
    asked = {"weight": entry.weight_bits, "activation": entry.activation_bits}
    wrong = {tensor: bits for tensor, bits in asked.items() if bits is not None and bits != mode.fixed_bits}
    if wrong:
        shown = ", ".join(f"{tensor} {bits}" for tensor, bits in wrong.items())
        raise ConfigError(f"mode {mode.name} trains weights and activations at {mode.fixed_bits} bits, but the plan "
                          f"gives {name} {shown} bits: use --plan uniform:{mode.fixed_bits} or a "
                          f"{mode.fixed_bits}-bit plan")


def apply_plan(model: nn.Module, plan: BitPlan, mode: str, *, seed: int = 0,
               options: Mapping[str, Any] | None = None) -> AppliedPlan:
    """Swap every module the plan quantizes for the ``mode`` version of it; return what was done.

    The plan must be for this architecture (names and shapes, `qanalyze.plan.make.check_plan`). A
    module kind the mode cannot run is refused with the module's name and the reason. Each swapped
    module gets its own ``torch.Generator`` (on the weight's device) seeded from ``seed`` and its
    position, so stochastic rounding is reproducible. ``options`` go to the mode's builders (int4:
    ``lss``, ``block``, ``keep_fraction`` of `qanalyze.engine.int4.Int4Spec`). ConfigError for a
    ``QANALYZE_KERNEL`` that names no integer GEMM path (`qanalyze.engine.kernels.forced_kernel`).
    """
    chosen = get_mode(mode)
    planned = validate_plan(model, plan, mode)
    forced_kernel()  # a bad QANALYZE_KERNEL is refused now, before a model is changed or a run begins
    infos = inventory(model)
    # (position, module, spec): the position seeds the module's generator, so it is the inventory's
    swaps = [(index, info, planned[info.name]) for index, info in enumerate(infos) if info.name in planned]
    tied = tied_output_embedding(model, infos)
    if tied is not None and tied[0].name in planned:
        # One tensor serves as input embedding and output projection (LLaMA, GPT-2): planned once, it is
        # quantized in both places, as the deployed model that stores it once computes with it.
        swaps.append((len(infos), tied[1], planned[tied[0].name]))
    specs: dict[str, TensorSpec] = {}
    generators: dict[str, torch.Generator] = {}
    for index, info, spec in swaps:
        parent, child = parent_module(model, info.name)
        original = getattr(parent, child)
        generator = module_generator(seed, index, original.weight.device)
        setattr(parent, child, chosen.builders[info.kind](original, info, spec, generator, **(options or {})))
        specs[info.name], generators[info.name] = spec, generator
    return AppliedPlan(mode=mode, specs=specs, generators=generators)


def tied_output_embedding(model: nn.Module, infos: list[ModuleInfo]) -> tuple[ModuleInfo, ModuleInfo] | None:
    """The input embedding and the output projection that shares its weight tensor (as a linear module's
    info), or None when the model has no such tie."""
    get_input, get_output = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if get_input is None or get_output is None:
        return None
    embedding, output = get_input(), get_output()
    if embedding is None or output is None or getattr(output, "weight", None) is not embedding.weight:
        return None
    names = {id(module): name for name, module in model.named_modules()}
    info = next((i for i in infos if i.name == names.get(id(embedding))), None)
    if info is None or id(output) not in names:
        return None
    return info, replace(info, name=names[id(output)], kind="linear", transposed=False)


def swapped_modules(model: nn.Module) -> dict[str, _Swapped]:
    """Every swapped module of ``model`` by name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, _Swapped)}


def quantized_weights(model: nn.Module) -> dict[str, Quantized]:
    """The integer codes and scales of every swapped module's weight, as its forward pass uses them."""
    return {name: module.quantized_weight() for name, module in swapped_modules(model).items()}
