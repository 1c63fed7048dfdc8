"""Reloading a qdylora run: the saved model holds the frozen (dequantized) base under the original
weight names and the adapters' A and B; ``lora.json`` holds their settings. Any rank 1..r can then
be evaluated or exported from the one run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from qanalyze.engine.lora import DyLoRALinear, LoRAConfig, apply_qdylora
from qanalyze.errors import RecordError
from qanalyze.models import _quiet_transformers

LORA_FILE = "lora.json"


def is_qdylora_run(run: str | Path) -> bool:
    """True when ``run`` holds a qdylora run (its ``lora.json``)."""
    return (Path(run) / LORA_FILE).is_file()


def load_qdylora_run(run: str | Path, *, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Any,
                                                                                      dict[str, DyLoRALinear]]:
    """Rebuild a qdylora run: (model in eval mode at full rank, tokenizer, adapters by module name)."""
    run = Path(run)
    try:
        settings = json.loads((run / LORA_FILE).read_text(encoding="utf-8"))
        config = LoRAConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()})
    except (OSError, json.JSONDecodeError, TypeError) as exc:
        raise RecordError(f"{run / LORA_FILE} is not a readable LoRA record ({exc.__class__.__name__})") from None
    with _quiet_transformers(hide_progress=True):
        # the saved base weights are already the quantized values: they load as a float base
        model = AutoModelForSequenceClassification.from_pretrained(str(run))
        tokenizer = AutoTokenizer.from_pretrained(str(run))
    built = apply_qdylora(model, None, dataclasses.replace(config, base="plan", double_quant=False))
    state = safetensors.torch.load_file(str(run / "model.safetensors"))
    adapters = {k: v for k, v in state.items() if ".lora_" in k}
    missing, unexpected = model.load_state_dict(adapters, strict=False)
    expected = {k for k in model.state_dict() if ".lora_" in k}
    if unexpected or expected - set(adapters):
        raise RecordError(f"{run} does not hold the adapters its lora.json describes")
    del missing  # every other weight came from from_pretrained
    model.to(device).eval()
    return model, tokenizer, built
