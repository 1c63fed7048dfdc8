"""The quantized checkpoint of a run: packed integer weights and their scales, and a loader.

A quantized run directory holds, beside ``metrics.json`` and the logs:

- ``config.json`` and the tokenizer files (what ``from_pretrained`` needs to build the model);
- ``plan.json``: the plan the run followed (``mode`` is in ``metrics.json``);
- ``weights.safetensors``: every planned module's weight, packed to its bit-width with one float16
  scale per group, and the weights the plan keeps in float (float32). Its size is the plan's
  ``totals.weight_bytes`` plus the safetensors header;
- ``extra.safetensors``: everything else in the state dict (biases, layer-norm shifts, QAT
  activation ranges), float32.

`load_quantized_run` rebuilds the model, swaps the planned modules as the run did, and makes them
use exactly the stored integer codes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from qanalyze.engine.apply import AppliedPlan, apply_plan, swapped_modules
from qanalyze.engine.packing import PackedTensor, load_packed, save_packed
from qanalyze.errors import RecordError
from qanalyze.models import _quiet_transformers, is_causal_lm_config
from qanalyze.quant.primitives import Quantized
from qanalyze.records import BitPlan, atomic_path

PLAN_FILE = "plan.json"
WEIGHTS_FILE = "weights.safetensors"
EXTRA_FILE = "extra.safetensors"


def _packed(quantized: Quantized) -> PackedTensor:
    groups = 1 if quantized.rows_per_group is None else quantized.scale.numel()
    return PackedTensor(q=quantized.q, scale=quantized.scale.reshape(groups), bits=quantized.bits, signed=True,
                        meta={"rows_per_group": quantized.rows_per_group or 0})


def _quantized(packed: PackedTensor) -> Quantized:
    rows = int(packed.meta.get("rows_per_group", 0)) or None
    dims = (1,) * packed.q.dim()
    scale = packed.scale.float().reshape(()) if rows is None else packed.scale.float().reshape(-1, *dims)
    return Quantized(q=packed.q, scale=scale, zero_point=None, bits=packed.bits, rows_per_group=rows)


def save_quantized_run(run: Path, model: torch.nn.Module, tokenizer: Any, plan: BitPlan, mode: str) -> None:
    """Write the quantized checkpoint of ``model`` (swapped by `apply_plan` with ``plan``) into ``run``."""
    swapped = swapped_modules(model)
    weights: dict[str, PackedTensor | torch.Tensor] = {}
    covered: set[str] = set()
    for name, entry in plan.entries.items():
        module = model.get_submodule(name)
        key = f"{name}.weight"
        covered.add(key)
        if name in swapped:
            weights[key] = _packed(swapped[name].quantized_weight())
        elif entry.quantized:
            raise RecordError(f"module {name} is planned but was not swapped: cannot save its integer weight")
        else:
            weights[key] = module.weight.detach().float().cpu().contiguous()
    for name, module in swapped.items():
        if name not in plan.modules:  # the output projection tied to a planned embedding: its own codes
            covered.add(f"{name}.weight")
            weights[f"{name}.weight"] = _packed(module.quantized_weight())
    extra = {key: value.detach().float().cpu().contiguous() for key, value in model.state_dict().items()
             if key not in covered and value.is_floating_point()}
    plan.save(run / PLAN_FILE)
    save_packed(run / WEIGHTS_FILE, weights, {"mode": mode})
    with atomic_path(run / EXTRA_FILE) as tmp:
        safetensors.torch.save_file(extra, str(tmp), metadata={"mode": mode})
    model.config.save_pretrained(run)
    tokenizer.save_pretrained(run)


def is_quantized_run(run: Path) -> bool:
    """True when ``run`` holds a quantized checkpoint (rather than a float model)."""
    return (run / WEIGHTS_FILE).is_file() and (run / PLAN_FILE).is_file()


def load_quantized_run(run: str | Path, *, device: str | torch.device = "cpu") -> tuple[
        torch.nn.Module, Any, BitPlan, AppliedPlan]:
    """Rebuild the model of a quantized run: float parts from ``extra``, planned weights frozen to the
    stored integer codes. Returns (model in eval mode, tokenizer, plan, what apply_plan did)."""
    run = Path(run)
    if not is_quantized_run(run):
        raise RecordError(f"{run} holds no quantized checkpoint ({WEIGHTS_FILE} and {PLAN_FILE})")
    tensors, metadata = load_packed(run / WEIGHTS_FILE)
    mode = metadata.get("mode")
    plan = BitPlan.load(run / PLAN_FILE)
    with _quiet_transformers(hide_progress=True):
        config = AutoConfig.from_pretrained(str(run), local_files_only=True)
        # A causal LM trained on the lm task keeps its LM head; anything else was a classifier.
        auto = AutoModelForCausalLM if is_causal_lm_config(config) else AutoModelForSequenceClassification
        model = auto.from_config(config)
        tokenizer = AutoTokenizer.from_pretrained(str(run), local_files_only=True)
    model.to(device)
    applied = apply_plan(model, plan, mode or "int")
    extra = safetensors.torch.load_file(str(run / EXTRA_FILE), device=str(device))
    state = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    missing, unexpected = model.load_state_dict({**extra, **state}, strict=False)
    frozen = {k: v for k, v in tensors.items() if isinstance(v, PackedTensor)}
    missing = [k for k in missing if k not in frozen and not k.endswith("position_ids")]
    if missing or unexpected:
        raise RecordError(f"the checkpoint in {run} does not fit its config: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}")
    swapped = swapped_modules(model)
    for key, packed in frozen.items():
        name = key.removesuffix(".weight")
        if name not in swapped:
            raise RecordError(f"{run}: packed weight {key} belongs to no quantized module of the plan")
        quantized = _quantized(packed)
        swapped[name].freeze(Quantized(q=quantized.q.to(device), scale=quantized.scale.to(device), zero_point=None,
                                       bits=quantized.bits, rows_per_group=quantized.rows_per_group))
    model.eval()
    return model, tokenizer, plan, applied
