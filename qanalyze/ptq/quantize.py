"""`quantize_model`: weight-only PTQ of every linear module of a model at its planned bits and column groups.

Each module's weight is replaced by the dequantized codes (``(q − z)·s`` in float32: exactly what a loader
of the packed codes computes), so the model runs as before and scores what the packed format would. The
returned `PTQRecord` keeps every module's codes, scales and zero points, and its errors.

Methods are a registry (`PTQ_METHODS`): ``rtn`` needs no data; ``gptq`` needs calibration windows and
runs the decoder layer by layer (`qanalyze.ptq.calibrate`), so each layer is calibrated on the outputs of
the already quantized layers before it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from qanalyze.errors import ConfigError
from qanalyze.lm_data import Windows
from qanalyze.ptq.calibrate import InputStats, sequential_calibration
from qanalyze.ptq.gptq import GPTQConfig, gptq_quantize
from qanalyze.ptq.rtn import RTNConfig, rtn_quantize
from qanalyze.quant.columns import ColumnQuantized, ColumnSpec, parse_column_layout
from qanalyze.quant.ggml import GGMLQuantized, GGMLType, get_ggml_type, is_ggml_layout

WeightLayout = ColumnSpec | GGMLType
"""How one module's weight is stored: column groups (`ColumnSpec`) or a llama.cpp type (`GGMLType`)."""

Quantized = ColumnQuantized | GGMLQuantized
"""A quantized weight of either layout: ``dequantize()`` and ``storage_bits``."""

MethodRun = Callable[[torch.Tensor, WeightLayout, "torch.Tensor | None", Any, str], tuple[Quantized, dict]]


@dataclass(frozen=True)
class PTQMethod:
    """A PTQ method: its name, its config class, whether it needs calibration statistics, and ``run``
    ``(weight, spec, hessian or None, config, where) -> (codes, details)``."""

    name: str
    config_cls: type
    needs_calibration: bool
    run: MethodRun


def _run_rtn(weight: torch.Tensor, spec: WeightLayout, hessian: torch.Tensor | None, config: Any,
             where: str) -> tuple[Quantized, dict]:
    return rtn_quantize(weight, spec, hessian, config, where=where), {}


def _run_gptq(weight: torch.Tensor, spec: WeightLayout, hessian: torch.Tensor | None, config: Any,
              where: str) -> tuple[Quantized, dict]:
    if isinstance(spec, GGMLType):
        raise ConfigError(f"{where}: gptq runs column groups of scales and zero points, not GGML type {spec.name} "
                          "(quantize GGML plans with --method rtn, or train them with --mode qat)")
    result = gptq_quantize(weight, spec, hessian, config, where=where)
    return result.quantized, {"gptq_loss": result.loss, "damp": result.damp, "dead_columns": result.dead_columns,
                              "damp_raised": result.damp_raised}


PTQ_METHODS: dict[str, PTQMethod] = {
    "rtn": PTQMethod("rtn", RTNConfig, False, _run_rtn),
    "gptq": PTQMethod("gptq", GPTQConfig, True, _run_gptq),
}
"""The PTQ methods by name."""


def get_ptq_method(name: str) -> PTQMethod:
    """The registered method ``name``; ConfigError listing the known ones."""
    if name not in PTQ_METHODS:
        raise ConfigError(f"unknown PTQ method {name!r}; known: {', '.join(PTQ_METHODS)}")
    return PTQ_METHODS[name]


@dataclass
class ModuleOutcome:
    """One module's PTQ result: its codes, ``weight_error`` ``‖ΔW‖²``, ``output_error`` (mean over calibration
    tokens of ``‖ΔW x‖²``; None without calibration), seconds, and the method's details."""

    quantized: Quantized
    weight_error: float
    output_error: float | None
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """JSON-ready form without tensors."""
        if isinstance(self.quantized, GGMLQuantized):
            kind = self.quantized.type
            layout: dict[str, Any] = {"bits": kind.bits, "ggml_type": kind.name, "symmetric": not kind.minimum}
        else:
            spec = self.quantized.spec
            layout = {"bits": spec.bits, "group_size": spec.group_size, "symmetric": spec.symmetric}
        return {**layout, "storage_bits": self.quantized.storage_bits, "weight_error": self.weight_error,
                "output_error": self.output_error, "seconds": self.seconds, **self.details}


@dataclass
class PTQRecord:
    """What `quantize_model` did: the method, its config, every module's outcome, the calibration windows
    used and the total seconds."""

    method: str
    config: dict[str, Any]
    modules: dict[str, ModuleOutcome]
    calibration_windows: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no tensors)."""
        return {"method": self.method, "config": self.config, "calibration_windows": self.calibration_windows,
                "seconds": self.seconds, "storage_bits": self.storage_bits,
                "modules": {name: outcome.summary() for name, outcome in self.modules.items()}}

    @property
    def storage_bits(self) -> int:
        """Total storage of the quantized weights (codes, scales, zero points) in bits."""
        return sum(outcome.quantized.storage_bits for outcome in self.modules.values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Codes, scales and zero points as flat tensors: ``NAME.qweight``, ``NAME.scales``, ``NAME.qzeros`` (a
        GGML type's minima as ``NAME.biases``)."""
        tensors: dict[str, torch.Tensor] = {}
        for name, outcome in self.modules.items():
            found = outcome.quantized
            if isinstance(found, GGMLQuantized):
                parts = {"qweight": found.codes, "scales": found.scale, "biases": found.bias}
            else:
                parts = {"qweight": found.q, "scales": found.scale, "qzeros": found.zero_point}
            tensors.update({f"{name}.{key}": value for key, value in parts.items() if value is not None})
        return tensors


def linear_modules(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Every `torch.nn.Linear` of ``model`` by name except the output embeddings (the LM head)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name: module for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not head}


def module_specs(model: torch.nn.Module, plan_or_bits: Any, *, group_size: int | None = 128, symmetric: bool = True,
                 partial_last: bool = False,
                 overrides: Mapping[str, ColumnSpec | Mapping[str, Any]] | None = None) -> dict[str, WeightLayout]:
    """The `ColumnSpec` of every linear module to quantize (the LM head excluded).

    ``plan_or_bits`` is a bit width for all of them (with ``group_size`` and ``symmetric``), a mapping of
    module names to their `ColumnSpec` (exactly those modules; `qanalyze.methods.weight_ptq.plan_specs`), or a
    `qanalyze.records.BitPlan`: its quantized entries give ``weight_bits`` and ``scheme``, and a
    ``column_group`` key (``"g128"``, ``"row"``) the group size (a GGML type such as ``"Q4_K"``: that type), else
    ``group_size``; modules the plan keeps
    float stay float. ``partial_last`` allows a shorter last group where the group size does not divide a
    module's input width (`ColumnSpec`); without it such a module is refused, naming the sizes that fit.
    ``overrides`` maps a module name to a spec (or its fields) that replaces the result.
    """
    modules = linear_modules(model)
    specs: dict[str, WeightLayout] = {}
    if isinstance(plan_or_bits, int) and not isinstance(plan_or_bits, bool):
        specs = {name: _named_spec(name, bits=plan_or_bits, group_size=group_size, symmetric=symmetric,
                                   partial_last=partial_last) for name in modules}
    elif isinstance(plan_or_bits, Mapping):
        specs = {name: spec for name, spec in plan_or_bits.items()}
        outside = sorted(set(specs) - set(modules))
        if outside:
            raise ConfigError(f"{', '.join(outside)}: not a linear module of the model (the LM head excluded)")
    elif hasattr(plan_or_bits, "entries") and hasattr(plan_or_bits, "modules"):
        for name, entry in plan_or_bits.entries.items():
            if name not in modules or not entry.quantized:
                continue
            raw = plan_or_bits.modules[name]
            if is_ggml_layout(raw.get("column_group")):
                specs[name] = get_ggml_type(raw["column_group"])
                continue
            # a g128p entry was planned with a shorter last group (as `qanalyze.methods.weight_ptq.plan_specs` reads it)
            group, partial = parse_column_layout(raw["column_group"]) if "column_group" in raw else (group_size, False)
            specs[name] = _named_spec(name, bits=entry.weight_bits, group_size=group,
                                      symmetric=entry.scheme == "symmetric", partial_last=partial_last or partial)
    else:
        raise ConfigError(f"expected a number of bits, specs by module or a BitPlan, not {type(plan_or_bits).__name__}")
    for name, override in (overrides or {}).items():
        if name not in modules:
            raise ConfigError(f"override for {name}, which is not a linear module of the model")
        specs[name] = override if isinstance(override, ColumnSpec) else _named_spec(name, **override)
    for name, spec in specs.items():
        check_layout(spec, modules[name].in_features, name)
    return specs


def check_layout(spec: WeightLayout, in_features: int, where: str) -> None:
    """ConfigError naming ``where`` when ``spec`` cannot store rows of ``in_features`` columns."""
    if isinstance(spec, GGMLType):
        if not spec.fits(in_features):
            raise ConfigError(f"{where}: {spec.name} stores rows in blocks of {spec.row_multiple} columns, and it has "
                              f"{in_features} (llama.cpp would store another type there)")
        return
    spec.width(in_features, where=where)


def _named_spec(name: str, **fields: Any) -> ColumnSpec:
    try:
        return ColumnSpec(**fields)
    except (ConfigError, TypeError) as error:
        raise ConfigError(f"{name}: {error}") from None


def quantize_model(model: torch.nn.Module, plan_or_bits: Any, method: str = "gptq", windows: Windows | None = None,
                   *, group_size: int | None = 128, symmetric: bool = True, partial_last: bool = False,
                   overrides: Mapping[str, ColumnSpec | Mapping[str, Any]] | None = None, config: Any = None,
                   batch_size: int = 4, on_module: Callable[[str, ModuleOutcome], None] | None = None) -> PTQRecord:
    """Quantize every linear module of ``model`` (except the LM head) in place with ``method`` (`PTQ_METHODS`),
    at the bits and column groups `module_specs` gives, and return the `PTQRecord`.

    ``windows`` (the calibration windows of the ``lm`` task) are required by methods that calibrate
    (``gptq``); ``config`` is the method's config (default: its defaults); ``on_module`` is called after
    each module (progress). The weights become the dequantized codes, in their own dtype.
    """
    chosen = get_ptq_method(method)
    config = chosen.config_cls() if config is None else config
    if not isinstance(config, chosen.config_cls):
        raise ConfigError(f"method {method} takes a {chosen.config_cls.__name__}, not {type(config).__name__}")
    specs = module_specs(model, plan_or_bits, group_size=group_size, symmetric=symmetric, partial_last=partial_last,
                         overrides=overrides)
    if not specs:
        raise ConfigError("no linear module to quantize (the LM head is never quantized here)")
    modules = linear_modules(model)
    outcomes: dict[str, ModuleOutcome] = {}
    start = time.perf_counter()

    def quantize_one(name: str, stats: InputStats | None) -> None:
        began = time.perf_counter()
        module = modules[name]
        weight = module.weight.detach()
        # GPTQ runs in float32 as the authors' code does; the sums behind the Hessian are float64
        hessian = stats.hessian().float() if stats is not None else None
        quantized, details = chosen.run(weight, specs[name], hessian, config, name)
        dequantized = quantized.dequantize().to(weight.dtype)
        delta = dequantized.to(torch.float64) - weight.to(torch.float64)
        output_error = stats.output_error(delta) if stats is not None else None
        with torch.no_grad():
            module.weight.copy_(dequantized)
        outcomes[name] = ModuleOutcome(quantized, float(delta.square().sum()), output_error,
                                       time.perf_counter() - began, details)
        if on_module is not None:
            on_module(name, outcomes[name])

    if chosen.needs_calibration:
        if windows is None:
            raise ConfigError(f"method {method} needs calibration windows")

        def on_layer(index: int, found: dict[str, tuple[torch.nn.Module, InputStats]]) -> None:
            for name, (_, stats) in found.items():
                quantize_one(name, stats)

        sequential_calibration(model, windows, list(specs), on_layer, batch_size=batch_size)
    else:
        for name in specs:
            quantize_one(name, None)
    return PTQRecord(method=method, config=dataclasses.asdict(config), modules=outcomes,
                     calibration_windows=len(windows) if chosen.needs_calibration and windows is not None else 0,
                     seconds=time.perf_counter() - start)
