"""Uniform plans made on the fly (``--plan uniform:8``) and ``--plan`` resolution.

The seed papers' settings need no sensitivity analysis: every weight, activation and gradient at
the same bits with one scale per tensor (Q8BERT, integer fine-tuning). Which module kinds are
quantized depends on what the engine mode can run (integer fine-tuning also puts layer norms on
the integer path; Q8BERT keeps them in float); the task head stays float, as in the papers.

``uniform:8:channel`` keeps the bits and refines the scales: one per output channel of each weight
and one per token of each linear layer's input (what dynamic integer quantization of LLMs does,
e.g. LLM.int8's vector-wise scales), at the cost of one scale per weight row. ``uniform:8:rowwise``
also gives each linear layer's output gradient row scales (per token for the input gradient, as
SwitchBack does, and per output channel for the weight gradient).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from qanalyze.errors import ConfigError
from qanalyze.models import NORM_KINDS, architecture_fingerprint, inventory
from qanalyze.plan.budget import SCALE_BITS
from qanalyze.plan.entries import FloatEntry, PlanEntry, QuantizedEntry
from qanalyze.quant.columns import COLUMN_BITS, ColumnSpec, column_group_name, parse_column_layout
from qanalyze.quant.columns import storage_bits as column_storage_bits
from qanalyze.quant.ggml import GGML_TYPES, get_ggml_type, ggml_fallback, is_ggml_layout
from qanalyze.quant.primitives import BITS_RANGE
from qanalyze.records import BitPlan

UNIFORM = re.compile(r"uniform:(\d+)(?::(\w+))?")
GGML_UNIFORM = re.compile(r"uniform:([A-Za-z0-9_]+)")
COLUMN_UNIFORM = re.compile(r"uniform:(\d+):(g\d+p?|row)(?::(sym|asym))?")
FLOAT_BITS = 32

LAYOUTS: dict[str, dict[str, str]] = {
    "tensor": {"group": "tensor", "activation_group": "tensor", "gradient_group": "tensor"},
    "channel": {"group": "channel", "activation_group": "token", "gradient_group": "tensor"},
    "rowwise": {"group": "channel", "activation_group": "token", "gradient_group": "row"},
}
"""Scale layouts of a uniform plan (``uniform:N:LAYOUT``): the weight group, the linear input's scales, and the
linear output gradient's (``rowwise``: one per token for the input gradient, one per output channel for the
weight gradient; the integer mode only)."""


def uniform_plan(model: nn.Module, bits: int, *, kinds: Sequence[str] = ("linear", "embedding"),
                 layout: str = "tensor") -> BitPlan:
    """Every module of a kind in ``kinds`` outside the task head at ``bits`` (W, A and G), with the scales
    of ``layout`` (a key of `LAYOUTS`: one per tensor, or one per weight row and input token)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS_RANGE:
        raise ConfigError(f"uniform plans take bits from {BITS_RANGE.start} to {BITS_RANGE.stop - 1}, not {bits!r}")
    if layout not in LAYOUTS:
        raise ConfigError(f"uniform plan layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    scales_per_row = LAYOUTS[layout]["group"] == "channel"
    infos = inventory(model)
    entries: dict[str, PlanEntry] = {}
    quantized_bits = 0.0
    for info in infos:
        weights = math.prod(info.shape)
        if info.kind not in kinds or info.stage == "head":
            entries[info.name] = FloatEntry(info.name)
            continue
        # a layer norm's weight is one row; its input always has one scale per token (the engine's choice)
        groups = info.shape[0] if scales_per_row and info.kind not in NORM_KINDS else 1
        # only linear layers write their input layout, and their gradient layout when it is not one scale
        linear = info.kind == "linear"
        marks_gradient = linear and LAYOUTS[layout]["gradient_group"] != "tensor"
        entries[info.name] = QuantizedEntry(
            name=info.name, weight_bits=bits, group=LAYOUTS[layout]["group"] if groups > 1 else "tensor",
            groups=groups, activation_bits=bits, gradient_bits=bits, scheme="symmetric", rounding="nearest",
            activation_group=LAYOUTS[layout]["activation_group"] if linear else "tensor",
            gradient_group=LAYOUTS[layout]["gradient_group"] if marks_gradient else "tensor",
            omitted=frozenset({"weight_range", "predicted_damage", *(() if linear else ("activation_group",)),
                               *(() if marks_gradient else ("gradient_group",))}),
        )
        quantized_bits += bits * weights + SCALE_BITS * groups
    return _uniform_record(infos, entries, bits, quantized_bits, text=_text(bits, layout),
                           settings={"kinds": list(kinds), "layout": layout},
                           nothing=f"the model has no {' or '.join(kinds)} module outside its task head to quantize",
                           totals={"activation_bits_mean": bits, "gradient_bits_mean": bits})


def _uniform_record(infos: Sequence[Any], entries: dict[str, PlanEntry], bits: int, quantized_bits: float, *,
                    text: str, settings: dict[str, Any], nothing: str, totals: dict[str, Any] | None = None) -> BitPlan:
    """The `BitPlan` of a uniform plan: its ``entries``, with the quantized weights' storage ``quantized_bits``
    (every scale and zero point) and the float modules at 32 bits; ConfigError ``nothing`` when no module is
    quantized."""
    sizes = {info.name: math.prod(info.shape) for info in infos}
    quantized_params = sum(sizes[name] for name, entry in entries.items() if entry.quantized)
    if not quantized_params:
        raise ConfigError(nothing)
    float_bits = FLOAT_BITS * sum(sizes[name] for name, entry in entries.items() if not entry.quantized)
    totals = {
        "weight_bits_mean": bits,
        "weight_bits_mean_all_scales": quantized_bits / quantized_params,
        "weight_bytes": math.ceil((quantized_bits + float_bits) / 8),
        "compression": FLOAT_BITS * sum(sizes.values()) / (quantized_bits + float_bits),
        "planned_modules": sum(e.quantized for e in entries.values()),
        "float_modules": sum(not e.quantized for e in entries.values()),
        **(totals or {}),
    }
    return BitPlan(
        model={"fingerprint": architecture_fingerprint(infos), "modules": {i.name: list(i.shape) for i in infos}},
        budget={"text": text, "kind": "uniform", "value": bits},
        objective="uniform", totals=totals, modules={n: e.to_dict() for n, e in entries.items()}, baseline="uniform",
        settings=settings,
    )


def column_uniform_plan(model: nn.Module, bits: int, group_size: int | None, *, symmetric: bool = False,
                        partial_last: bool = False) -> BitPlan:
    """Every linear module outside the task head at ``bits`` in column groups of ``group_size`` input columns
    (None: one per row), asymmetric unless ``symmetric``: the weight-only plan of ``uniform:N:gG`` for the
    post-training methods (``rtn``, ``gptq``). Activations and gradients are not planned (they stay float).
    A group size that does not divide a module's input width is refused naming the module and the sizes that
    work, unless ``partial_last`` (a shorter last group, counted in the storage)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in COLUMN_BITS:
        raise ConfigError(f"column-group plans take bits from {COLUMN_BITS.start} to {COLUMN_BITS.stop - 1}, "
                          f"not {bits!r}")
    spec = ColumnSpec(bits, group_size, symmetric=symmetric, partial_last=partial_last)
    layout = column_group_name(group_size, partial_last and group_size is not None)  # g128p: shorter last groups
    infos = inventory(model)
    entries: dict[str, PlanEntry] = {}
    quantized_bits = 0.0
    omitted = frozenset({"weight_range", "predicted_damage", "activation_bits", "gradient_bits", "activation_group",
                         "gradient_group"})
    for info in infos:
        if info.kind != "linear" or info.stage == "head":
            entries[info.name] = FloatEntry(info.name)
            continue
        out_features, in_features = info.shape
        groups = out_features * spec.groups(in_features) if spec.width(in_features, where=info.name) else 0
        entries[info.name] = QuantizedEntry(
            name=info.name, weight_bits=bits, group="channel", groups=groups,
            scheme="symmetric" if symmetric else "asymmetric",
            column_group=layout,
            omitted=omitted)
        quantized_bits += column_storage_bits(out_features, in_features, spec)
    return _uniform_record(infos, entries, bits, quantized_bits,
                           text=f"uniform:{bits}:{layout}" + (":sym" if symmetric else ""),
                           settings={"kinds": ["linear"], "layout": layout,
                                     "scheme": "symmetric" if symmetric else "asymmetric",
                                     "partial_last": partial_last},
                           nothing="the model has no linear module outside its task head to quantize")


def ggml_uniform_plan(model: nn.Module, name: str) -> BitPlan:
    """Every linear module outside the task head in GGML type ``name`` (``uniform:Q4_K``), the weight-only plan
    ``llama-quantize`` makes of one type: where a module's rows are not whole blocks of it (a k-quant needs a
    multiple of 256 columns), the type llama.cpp falls back to (`qanalyze.quant.ggml.FALLBACK`), as it does."""
    chosen = get_ggml_type(name)
    infos = inventory(model)
    entries: dict[str, PlanEntry] = {}
    quantized_bits = 0.0
    fallbacks: dict[str, str] = {}
    for info in infos:
        if info.kind != "linear" or info.stage == "head":
            entries[info.name] = FloatEntry(info.name)
            continue
        out_features, in_features = info.shape
        kind = ggml_fallback(chosen, in_features)
        if kind is None:
            raise ConfigError(f"{info.name}: its {in_features} columns are no whole number of blocks of {chosen.name} "
                              "or of any type llama.cpp falls back to")
        if kind is not chosen:
            fallbacks[info.name] = kind.name
        entries[info.name] = QuantizedEntry(
            name=info.name, weight_bits=kind.bits, group="channel",
            groups=out_features * kind.groups_per_row(in_features),
            scheme="asymmetric" if kind.minimum else "symmetric", column_group=kind.name,
            omitted=frozenset({"weight_range", "predicted_damage", "activation_bits", "gradient_bits",
                               "activation_group", "gradient_group"}))
        quantized_bits += kind.storage_bits(out_features, in_features)
    return _uniform_record(infos, entries, chosen.bits, quantized_bits, text=f"uniform:{chosen.name}",
                           settings={"kinds": ["linear"], "layout": chosen.name, "fallbacks": fallbacks},
                           nothing="the model has no linear module outside its task head to quantize")


def _text(bits: int, layout: str) -> str:
    return f"uniform:{bits}" if layout == "tensor" else f"uniform:{bits}:{layout}"


def resolve_plan(spec: str, model: nn.Module, *, kinds: Sequence[str] = ("linear", "embedding"),
                 partial_last: bool = False) -> BitPlan:
    """``uniform:N[:LAYOUT]`` -> `uniform_plan`; ``uniform:N:gG[:sym]`` or ``uniform:N:row[:sym]`` ->
    `column_uniform_plan` (``partial_last`` passed on); anything else is the path of a plan.json."""
    ggml = GGML_UNIFORM.fullmatch(spec.strip())
    if ggml and is_ggml_layout(ggml.group(1)):
        return ggml_uniform_plan(model, ggml.group(1))
    column = COLUMN_UNIFORM.fullmatch(spec.strip())
    if column:
        size, partial = parse_column_layout(column.group(2))
        return column_uniform_plan(model, int(column.group(1)), size, symmetric=column.group(3) == "sym",
                                   partial_last=partial_last or partial)
    match = UNIFORM.fullmatch(spec.strip())
    if match and (match.group(2) or "tensor") in LAYOUTS:
        return uniform_plan(model, int(match.group(1)), kinds=kinds, layout=match.group(2) or "tensor")
    if spec.startswith("uniform"):
        raise ConfigError(f"--plan {spec!r}: write uniform:N with N from 2 to 16, optionally :LAYOUT with LAYOUT one "
                          f"of {', '.join(LAYOUTS)} (uniform:8, uniform:16, uniform:8:channel), or uniform:N:gG[:sym] "
                          "for column groups (uniform:4:g128, uniform:3:g64:sym, uniform:4:row), or uniform:TYPE for a "
                          f"llama.cpp type ({', '.join(GGML_TYPES)})")
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"plan file {spec} not found (give a plan.json from `qanalyze plan`, or uniform:8)")
    return BitPlan.load(path)
