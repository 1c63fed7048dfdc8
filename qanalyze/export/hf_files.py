"""What the Hugging Face-style exports (compressed-tensors, GPTQ) share: the run's float tensors, and the
config, tokenizer and safetensors files of a model folder ``from_pretrained`` reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from qanalyze.export.source import ExportSource

WEIGHTS_NAME = "model.safetensors"
"""The single weights file of an exported model folder."""


def float_tensors(source: ExportSource) -> dict[str, torch.Tensor]:
    """Every tensor of the run's state dict except the quantized weights, as qanalyze evaluated them (float32
    embeddings, norms, biases); a tied output embedding is left out (the config ties it again on load)."""
    assert source.model is not None
    quantized = {f"{name}.weight" for name in source.codes}
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in source.model.state_dict().items():
        if key in quantized or not value.is_floating_point() or value.data_ptr() in seen:
            continue
        seen.add(value.data_ptr())
        tensors[key] = value.detach().cpu().contiguous()
    return tensors


def write_model_folder(source: ExportSource, staging: Path, tensors: dict[str, torch.Tensor],
                       quantization_config: dict[str, Any], metadata: dict[str, str] | None = None) -> None:
    """``model.safetensors`` with ``tensors``, ``config.json`` with ``quantization_config`` and the
    tokenizer's files, as a quantized checkpoint on the Hub holds them."""
    import safetensors.torch

    assert source.model is not None
    safetensors.torch.save_file(tensors, str(staging / WEIGHTS_NAME), metadata={"format": "pt", **(metadata or {})})
    config = source.model.config.to_dict()
    config["quantization_config"] = quantization_config
    (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if source.tokenizer is not None:
        source.tokenizer.save_pretrained(staging)


def float_model(path: Path) -> torch.nn.Module:
    """The architecture in ``path``'s config.json (without its quantization config), randomly initialised, in
    eval mode: what an engine's loader fills with a checkpoint's tensors."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from qanalyze.models import _quiet_transformers, is_causal_lm_config

    with _quiet_transformers(hide_progress=True):
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        auto = AutoModelForCausalLM if is_causal_lm_config(config) else AutoModelForSequenceClassification
        return auto.from_config(config).eval()
