"""``--format compressed-tensors``: the ``pack-quantized`` format of the compressed-tensors package (what
llm-compressor writes and vLLM serves).

Recipe: a ``quantization_config`` with one config group per (bits, group size, scheme), whose ``targets``
list its modules by exact name, and ``ignore`` naming the float modules and ``lm_head``. Checkpoint: for each
quantized module ``weight_packed`` (its codes, signed by subtracting ``2**(bits-1)``, packed 32 / bits to an
int32 along the input columns by compressed-tensors' own ``pack_to_int32``), ``weight_scale`` (float16,
``(out, groups)``), ``weight_shape``, and for asymmetric layouts ``weight_zero_point`` (signed the same way,
packed along the output rows: ``symmetric: false``). The engine computes ``(q_s − z_s) · s = (q − z) · s``,
exactly what qanalyze evaluated; symmetric codes keep their zero of 0.

The loader (`CompressedTensorsExporter.load`) builds the model, lets compressed-tensors apply the config and
compress it (giving every parameter its packed shape), loads the file and decompresses with the package's
own code. transformers 5.25's ``from_pretrained`` cannot load asymmetric pack-quantized files: it makes the
zero points' parameters unpacked ``(out, groups)`` while the file (and vLLM) hold them packed, and refuses
the size mismatch; symmetric files load there too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qanalyze.export.base import Exporter, ExporterConfig
from qanalyze.export.hf_files import WEIGHTS_NAME, float_model, float_tensors, write_model_folder
from qanalyze.export.layouts import Expressed, ModuleLayout, group_by_layout

if TYPE_CHECKING:
    import torch

    from qanalyze.export.source import ExportSource

FORMAT = "pack-quantized"
RECIPE_FILE = "quantization_config.json"


def _weights_args(bits: int, group_size: int | None, symmetric: bool) -> dict[str, Any]:
    return {"num_bits": bits, "type": "int", "symmetric": symmetric, "group_size": group_size,
            "strategy": "channel" if group_size is None else "group", "dynamic": False, "observer": "minmax"}


def quantization_config(source: ExportSource, expressed: Expressed) -> dict[str, Any]:
    """The ``quantization_config`` of ``expressed``, validated and written out by compressed-tensors'
    own ``QuantizationConfig``."""
    from compressed_tensors.quantization import QuantizationConfig

    groups = {f"group_{i}": {"targets": names, "weights": _weights_args(*key), "format": FORMAT}
              for i, (key, names) in enumerate(group_by_layout(expressed.layouts).items())}
    config = {"quant_method": "compressed-tensors", "format": FORMAT, "quantization_status": "compressed",
              "config_groups": groups, "ignore": [*source.floats, "lm_head"]}
    return QuantizationConfig.model_validate(config).model_dump()


def _signed(values: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Codes as compressed-tensors' int8 holds them: symmetric codes as they are, unsigned ones shifted."""
    import torch

    offset = 0 if symmetric else 1 << (bits - 1)
    return (values.to(torch.int32) - offset).to(torch.int8)


def module_tensors(name: str, layout: ModuleLayout, source: ExportSource) -> dict[str, torch.Tensor]:
    """The packed tensors of one module, from its exact codes."""
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    codes = source.codes[name]
    bits, symmetric = layout.bits, layout.symmetric
    tensors = {f"{name}.weight_packed": pack_to_int32(_signed(codes.q, bits, symmetric), bits),
               f"{name}.weight_scale": codes.scale.to(torch.float16).contiguous(),
               f"{name}.weight_shape": torch.tensor(list(codes.q.shape))}
    if codes.zero_point is not None:
        zero = _signed(codes.zero_point, bits, symmetric)
        tensors[f"{name}.weight_zero_point"] = pack_to_int32(zero, bits, packed_dim=0).contiguous()
    return tensors


class CompressedTensorsExporter(Exporter):
    """compressed-tensors ``pack-quantized`` recipes and checkpoints."""

    name = "compressed-tensors"
    target = "compressed-tensors"
    description = "compressed-tensors pack-quantized (llm-compressor, vLLM)"
    requires = ("compressed_tensors",)

    def recipe(self, source: ExportSource, expressed: Expressed, config: ExporterConfig) -> dict[str, str]:
        """``quantization_config.json``: the ``quantization_config`` a config.json holds."""
        return {RECIPE_FILE: json.dumps(quantization_config(source, expressed), indent=2) + "\n"}

    def checkpoint(self, source: ExportSource, expressed: Expressed, staging: Path,
                   config: ExporterConfig) -> dict[str, Any]:
        """model.safetensors (packed codes, scales, zero points and the float tensors), config.json with the
        quantization config, the tokenizer."""
        tensors = float_tensors(source)
        for name, layout in expressed.layouts.items():
            tensors.update(module_tensors(name, layout, source))
        write_model_folder(source, staging, tensors, quantization_config(source, expressed))
        return {"format": FORMAT}

    def load(self, path: Path) -> torch.nn.Module:
        """Decompressed by compressed-tensors: config applied, model compressed to the file's shapes, the file
        loaded strictly, then ``decompress_model``."""
        import safetensors.torch
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config

        config = json.loads((path / "config.json").read_text())["quantization_config"]
        compressor = ModelCompressor(quantization_config=QuantizationConfig.model_validate(config))
        model = float_model(path)
        apply_quantization_config(model, compressor.quantization_config, run_compressed=False)
        compressor.compress_model(model)
        missing, unexpected = model.load_state_dict(safetensors.torch.load_file(str(path / WEIGHTS_NAME)),
                                                    strict=False)
        tied = getattr(model.config, "tie_word_embeddings", False)
        missing = [key for key in missing if not (tied and key == "lm_head.weight")]
        if missing or unexpected:
            raise ValueError(f"{path}: missing {missing[:3]}, unexpected {unexpected[:3]}")
        compressor.decompress_model(model)
        if tied:
            model.tie_weights()
        return model.eval()

    def overhead_bytes(self, expressed: Expressed) -> int:
        """Each module's ``weight_shape`` (two int64) and the padding of its codes and zero points to whole
        int32 words."""
        extra = 0
        for layout in expressed.layouts.values():
            out, columns = layout.shape
            groups = layout.spec.groups(columns)
            extra += 16 + out * (-(-columns * layout.bits // 32) * 32 - columns * layout.bits) // 8
            if not layout.symmetric:
                extra += groups * (-(-out * layout.bits // 32) * 32 - out * layout.bits) // 8
        return extra


EXPORTER = CompressedTensorsExporter()
