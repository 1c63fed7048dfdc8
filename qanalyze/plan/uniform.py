"""Uniform plans made on the fly (``--plan uniform:8``) and ``--plan`` resolution.

The seed papers' settings need no sensitivity analysis: every weight, activation and gradient at
the same bits with one scale per tensor (Q8BERT, integer fine-tuning). Which module kinds are
quantized depends on what the engine mode can run (integer fine-tuning also puts layer norms on
the integer path; Q8BERT keeps them in float); the task head stays float, as in the papers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from qanalyze.errors import ConfigError
from qanalyze.models import architecture_fingerprint, inventory
from qanalyze.plan.budget import SCALE_BITS
from qanalyze.quant.primitives import BITS_RANGE
from qanalyze.records import BitPlan

UNIFORM = re.compile(r"uniform:(\d+)")
FLOAT_BITS = 32


def uniform_plan(model: nn.Module, bits: int, *, kinds: Sequence[str] = ("linear", "embedding")) -> BitPlan:
    """Every module of a kind in ``kinds`` outside the task head at ``bits`` (W, A and G), per tensor."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS_RANGE:
        raise ConfigError(f"uniform plans take bits from {BITS_RANGE.start} to {BITS_RANGE.stop - 1}, not {bits!r}")
    infos = inventory(model)
    modules: dict[str, dict] = {}
    quantized_bits = float_bits = 0.0
    quantized_params = all_params = 0
    for info in infos:
        weights = math.prod(info.shape)
        all_params += weights
        if info.kind not in kinds or info.stage == "head":
            modules[info.name] = {"float": True}
            float_bits += FLOAT_BITS * weights
            continue
        modules[info.name] = {"weight_bits": bits, "group": "tensor", "groups": 1, "activation_bits": bits,
                              "gradient_bits": bits, "scheme": "symmetric", "rounding": "nearest"}
        quantized_bits += bits * weights + SCALE_BITS
        quantized_params += weights
    if not quantized_params:
        raise ConfigError(f"the model has no {' or '.join(kinds)} module outside its task head to quantize")
    totals = {
        "weight_bits_mean": bits,
        "weight_bits_mean_all_scales": quantized_bits / quantized_params,
        "weight_bytes": math.ceil((quantized_bits + float_bits) / 8),
        "compression": FLOAT_BITS * all_params / (quantized_bits + float_bits),
        "planned_modules": sum(not m.get("float") for m in modules.values()),
        "float_modules": sum(bool(m.get("float")) for m in modules.values()),
        "activation_bits_mean": bits, "gradient_bits_mean": bits,
    }
    return BitPlan(
        model={"fingerprint": architecture_fingerprint(infos), "modules": {i.name: list(i.shape) for i in infos}},
        budget={"text": f"uniform:{bits}", "kind": "uniform", "value": bits},
        objective="uniform", totals=totals, modules=modules, baseline="uniform",
        settings={"kinds": list(kinds)},
    )


def resolve_plan(spec: str, model: nn.Module, *, kinds: Sequence[str] = ("linear", "embedding")) -> BitPlan:
    """``uniform:N`` -> `uniform_plan`; anything else is the path of a plan.json."""
    match = UNIFORM.fullmatch(spec.strip())
    if match:
        return uniform_plan(model, int(match.group(1)), kinds=kinds)
    if spec.startswith("uniform"):
        raise ConfigError(f"--plan {spec!r}: write uniform:N with N from 2 to 16 (uniform:8, uniform:16)")
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"plan file {spec} not found (give a plan.json from `qanalyze plan`, or uniform:8)")
    return BitPlan.load(path)
