"""``--format gptq``: GPTQ checkpoints as GPTQModel, vLLM, SGLang and transformers load them.

Recipe: ``quantize_config.json`` with the default ``bits`` / ``group_size`` / ``sym`` (those of the most
weights), and a ``dynamic`` dict: one ``+:regex`` per other layout, matching its modules by full name, with
its ``bits``, ``group_size`` and ``sym``; one ``-:regex`` excluding the float linear modules. Checkpoint: the
run's codes in the GPTQ packed layout (`qanalyze.export.gptq_pack`) with ``desc_act: false`` (``g_idx`` in
order), the same quantize_config.json beside config.json's ``quantization_config``. Symmetric codes are stored
as ``q + 2**(bits-1)`` with that zero point, as GPTQ's ``sym`` layout does.

``checkpoint_format`` (``--gptq-checkpoint-format``): ``gptq`` (v1, zero points stored minus one) is what vLLM,
SGLang and transformers load; GPTQModel loads v1 with zero points (``sym: false``) only from its own
quantizer (older AutoGPTQ files could overflow there), so for GPTQModel choose ``gptq_v2`` (zero points as
they are; vLLM does not load it). ``auto`` writes v1 unless a zero point is 0, which v1 cannot store, and then
v2; export.json records which. GPTQModel needs a CUDA build of torch 2.14 (its wheel replaces torch
2.13.0+cpu), so `GPTQExporter.load` rebuilds the weights as GPTQModel's ``TorchQuantLinear.dequantize_weight``
does, the tests unpack the files independently with numpy, and ``benchmarks/export_check.py`` loads them with
GPTQModel where a separate environment has it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qanalyze.errors import ConfigError
from qanalyze.export.base import Exporter, ExporterConfig, export_option
from qanalyze.export.gptq_pack import WORD_BITS, group_index, pack_rows, unpack_rows
from qanalyze.export.hf_files import WEIGHTS_NAME, float_model, float_tensors, write_model_folder
from qanalyze.export.layouts import Expressed, ModuleLayout, group_by_layout

if TYPE_CHECKING:
    import torch

    from qanalyze.export.source import ExportSource

RECIPE_FILE = "quantize_config.json"
V1, V2 = "gptq", "gptq_v2"


@dataclass(frozen=True)
class GPTQExportConfig(ExporterConfig):
    """Settings of the gptq exporter."""

    checkpoint_format: str = export_option(
        "auto", choices=("auto", V1, V2),
        help="gptq: v1, zero points minus one (vLLM, SGLang, transformers); gptq_v2: zero points as they are "
             "(GPTQModel, which loads v1 with zero points only from its own quantizer); auto: v1 unless a zero "
             "point is 0, which v1 cannot store.")


def _regex(names: Sequence[str]) -> str:
    return "^(?:" + "|".join(re.escape(name) for name in names) + ")$"


def _group(size: int | None) -> int:
    return -1 if size is None else size


def quantize_config(source: ExportSource, expressed: Expressed, checkpoint_format: str = V1) -> dict[str, Any]:
    """GPTQModel's quantize_config: defaults from the layout holding the most weights, ``dynamic`` overrides
    for the others and exclusions for the float linear modules."""
    groups = group_by_layout(expressed.layouts)
    weights = {key: sum(expressed.layouts[n].shape[0] * expressed.layouts[n].shape[1] for n in names)
               for key, names in groups.items()}
    bits, size, symmetric = max(weights, key=weights.__getitem__)
    dynamic: dict[str, dict[str, Any]] = {}
    for (b, g, s), names in groups.items():
        if (b, g, s) != (bits, size, symmetric):
            dynamic[f"+:{_regex(names)}"] = {"bits": b, "group_size": _group(g), "sym": s}
    if source.floats:
        dynamic[f"-:{_regex(source.floats)}"] = {}
    return {"bits": bits, "group_size": _group(size), "desc_act": False, "sym": symmetric, "lm_head": False,
            "quant_method": "gptq", "checkpoint_format": checkpoint_format, "pack_dtype": "int32",
            "dynamic": dynamic, "meta": {"quantizer": ["qanalyze"]}}


def _check_shape(layout: ModuleLayout) -> None:
    out, columns = layout.shape
    if out % WORD_BITS or columns % WORD_BITS:
        raise ConfigError(f"gptq cannot store {layout.name}: its weight ({out}, {columns}) must have multiples of "
                          "32 rows and columns, as GPTQ packs 32 codes per group of words")


def module_tensors(name: str, layout: ModuleLayout, source: ExportSource, checkpoint_format: str) -> dict[
        str, torch.Tensor]:
    """``qweight``, ``qzeros``, ``scales`` and ``g_idx`` of one module from its exact codes."""
    import numpy as np
    import torch

    codes = source.codes[name]
    offset = 1 << (layout.bits - 1) if layout.symmetric else 0
    q = codes.q.to(torch.int64).numpy() + offset
    if codes.zero_point is None:
        zeros = np.full(tuple(codes.scale.shape), offset, dtype=np.int64)
    else:
        zeros = codes.zero_point.to(torch.int64).numpy()
    stored = zeros - 1 if checkpoint_format == V1 else zeros
    return {f"{name}.qweight": torch.from_numpy(pack_rows(q.T, layout.bits)),
            f"{name}.qzeros": torch.from_numpy(np.ascontiguousarray(pack_rows(stored, layout.bits).T)),
            f"{name}.scales": codes.scale.to(torch.float16).T.contiguous(),
            f"{name}.g_idx": torch.from_numpy(group_index(layout.shape[1], layout.group_size))}


def dequantize(tensors: dict[str, torch.Tensor], name: str, bits: int, checkpoint_format: str) -> torch.Tensor:
    """The ``(out, in)`` float32 weight a GPTQ loader computes from one module's tensors:
    ``scales[g_idx] · (q − z[g_idx])`` with ``z`` = stored + 1 in v1."""
    import torch

    q = unpack_rows(tensors[f"{name}.qweight"].numpy(), bits)
    zeros = unpack_rows(tensors[f"{name}.qzeros"].numpy().T.copy(), bits).T + (1 if checkpoint_format == V1 else 0)
    g_idx = tensors[f"{name}.g_idx"].numpy().astype("int64")
    scales = tensors[f"{name}.scales"].float()
    values = torch.from_numpy(q - zeros[g_idx]).float()
    return (values * scales[torch.from_numpy(g_idx)]).T.contiguous()


class GPTQExporter(Exporter):
    """GPTQ ``quantize_config.json`` recipes and packed checkpoints."""

    name = "gptq"
    target = "gptq"
    description = "GPTQ checkpoints (GPTQModel, vLLM, transformers)"

    config_class = GPTQExportConfig

    def recipe(self, source: ExportSource, expressed: Expressed, config: ExporterConfig) -> dict[str, str]:
        """``quantize_config.json``."""
        assert isinstance(config, GPTQExportConfig)
        checkpoint_format = V2 if config.checkpoint_format == V2 else V1
        return {RECIPE_FILE: json.dumps(quantize_config(source, expressed, checkpoint_format), indent=2) + "\n"}

    def checkpoint(self, source: ExportSource, expressed: Expressed, staging: Path,
                   config: ExporterConfig) -> dict[str, Any]:
        """model.safetensors (packed modules and float tensors), quantize_config.json, config.json, tokenizer."""
        assert isinstance(config, GPTQExportConfig)
        for layout in expressed.layouts.values():
            _check_shape(layout)
        zero = [name for name, codes in source.codes.items()
                if codes.zero_point is not None and bool((codes.zero_point == 0).any())]
        if zero and config.checkpoint_format == V1:
            raise ConfigError(f"gptq v1 cannot store {zero[0]}: it has a zero point of 0, and v1 stores zero "
                              "points minus one; use --gptq-checkpoint-format gptq_v2 or auto")
        checkpoint_format = V2 if zero or config.checkpoint_format == V2 else V1
        tensors = float_tensors(source)
        for name, layout in expressed.layouts.items():
            tensors.update(module_tensors(name, layout, source, checkpoint_format))
        written = quantize_config(source, expressed, checkpoint_format)
        write_model_folder(source, staging, tensors, written)
        (staging / RECIPE_FILE).write_text(json.dumps(written, indent=2) + "\n", encoding="utf-8")
        details: dict[str, Any] = {"checkpoint_format": checkpoint_format}
        if zero:
            details["why_v2"] = (f"{len(zero)} modules have a zero point of 0, which v1 (zero minus one) cannot "
                                 f"store, e.g. {zero[0]}")
        return details

    def load(self, path: Path) -> torch.nn.Module:
        """The float model with each module's weight rebuilt from its GPTQ tensors (`dequantize`), the
        arithmetic of GPTQModel's torch kernel; not GPTQModel itself, which needs a CUDA torch."""
        import safetensors.torch

        config = json.loads((path / RECIPE_FILE).read_text())
        tensors = safetensors.torch.load_file(str(path / WEIGHTS_NAME))
        model = float_model(path)
        state = {key: value for key, value in tensors.items()
                 if not key.endswith((".qweight", ".qzeros", ".scales", ".g_idx"))}
        for key in tensors:
            if key.endswith(".qweight"):
                name = key.removesuffix(".qweight")
                bits = _bits(config, name)
                state[f"{name}.weight"] = dequantize(tensors, name, bits, config["checkpoint_format"])
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = getattr(model.config, "tie_word_embeddings", False)
        if [k for k in missing if not (tied and k == "lm_head.weight")] or unexpected:
            raise ValueError(f"{path}: missing {missing[:3]}, unexpected {unexpected[:3]}")
        if tied:
            model.tie_weights()
        return model.eval()

    def overhead_bytes(self, expressed: Expressed) -> int:
        """``g_idx`` (an int32 per input column) of every module, and the zero point stored for symmetric
        layouts (which the plan's storage does not count)."""
        extra = 0
        for layout in expressed.layouts.values():
            out, columns = layout.shape
            extra += 4 * columns
            if layout.symmetric:
                extra += layout.spec.groups(columns) * out * layout.bits // 8
        return extra


def _bits(config: dict[str, Any], name: str) -> int:
    """A module's bits under quantize_config's defaults and ``+:`` overrides (first match wins, as in GPTQModel)."""
    for pattern, override in config.get("dynamic", {}).items():
        if pattern.startswith("+:") and re.match(pattern[2:], name):
            return int(override.get("bits", config["bits"]))
    return int(config["bits"])


EXPORTER = GPTQExporter()
