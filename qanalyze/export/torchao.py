"""``--format torchao``: torchao weight-only configs and checkpoints (``quantize_``, transformers'
``TorchAoConfig``).

Recipe: an ``FqnToConfig`` mapping each quantized module's name to its config, saved as torchao's own JSON
(``torchao.core.config.config_to_dict``; `rebuild_config` reads it back with ``config_from_dict``) and as a
short Python snippet that builds the same object. A layout becomes ``IntxWeightOnlyConfig(weight_dtype=
torch.intN, granularity=PerGroup(G) or PerAxis(0), mapping_type=ASYMMETRIC or SYMMETRIC)``; a symmetric
8-bit per-row layout becomes ``Int8WeightOnlyConfig()``, which stores exactly that.

Checkpoint: the run's model (each weight ``(q − z) · s``) saved in float, reloaded by transformers with
``TorchAoConfig(quant_type=FqnToConfig)``, so ``torchao.quantization.quantize_`` converts every planned
module; torchao's own scales would come from the float weights' ranges, so each tensor's ``qdata``, ``scale``
and ``zero_point`` is then set to the run's exact codes (shifted to torchao's signed ``intN`` range: ``q −
2**(bits-1)``, ``z − 2**(bits-1)``, the difference unchanged) and saved with ``save_pretrained`` (torchao's
safetensors serialization). `TorchAOExporter.load` is ``from_pretrained`` of that folder.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qanalyze.export.base import Exporter, ExporterConfig
from qanalyze.export.layouts import Expressed, ModuleLayout, group_by_layout

if TYPE_CHECKING:
    import torch

    from qanalyze.export.source import ExportSource

RECIPE_FILE = "fqn_to_config.json"
SNIPPET_FILE = "fqn_to_config.py"


def _is_int8_row(bits: int, group_size: int | None, symmetric: bool) -> bool:
    return bits == 8 and group_size is None and symmetric


def layout_config(bits: int, group_size: int | None, symmetric: bool) -> Any:
    """The torchao config of one layout."""
    import torch
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_primitives import MappingType

    if _is_int8_row(bits, group_size, symmetric):
        return Int8WeightOnlyConfig()
    return IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"),
                                granularity=PerAxis(0) if group_size is None else PerGroup(group_size),
                                mapping_type=MappingType.SYMMETRIC if symmetric else MappingType.ASYMMETRIC)


def fqn_config(layouts: dict[str, ModuleLayout]) -> Any:
    """``FqnToConfig`` of every module, in the order given."""
    from torchao.quantization import FqnToConfig

    return FqnToConfig({name: layout_config(layout.bits, layout.group_size, layout.symmetric)
                        for name, layout in layouts.items()})


def rebuild_config(path: str | Path) -> Any:
    """The ``FqnToConfig`` saved in ``fqn_to_config.json``, rebuilt by torchao."""
    from torchao.core.config import config_from_dict

    return config_from_dict(json.loads(Path(path).read_text()))


def _snippet_expression(bits: int, group_size: int | None, symmetric: bool) -> str:
    if _is_int8_row(bits, group_size, symmetric):
        return "Int8WeightOnlyConfig()"
    granularity = "PerAxis(0)" if group_size is None else f"PerGroup({group_size})"
    mapping = "SYMMETRIC" if symmetric else "ASYMMETRIC"
    return f"IntxWeightOnlyConfig(weight_dtype=torch.int{bits}, granularity={granularity}, " \
           f"mapping_type=MappingType.{mapping})"


def snippet(layouts: dict[str, ModuleLayout]) -> str:
    """Python source that builds the same ``FqnToConfig`` (one variable per layout) and applies it."""
    lines = ['"""torchao configs of a qanalyze plan: quantize_(model, CONFIG, filter_fn=None)."""', "import torch",
             "from torchao.quantization import FqnToConfig, Int8WeightOnlyConfig, IntxWeightOnlyConfig",
             "from torchao.quantization.granularity import PerAxis, PerGroup",
             "from torchao.quantization.quant_primitives import MappingType", ""]
    names: dict[str, str] = {}
    for i, (key, members) in enumerate(group_by_layout(layouts).items()):
        lines.append(f"LAYOUT_{i} = {_snippet_expression(*key)}")
        names.update(dict.fromkeys(members, f"LAYOUT_{i}"))
    lines += ["", "CONFIG = FqnToConfig({"]
    lines += [f"    {name!r}: {names[name]}," for name in layouts]
    lines += ["})", ""]
    return "\n".join(lines)


def set_codes(weight: Any, layout: ModuleLayout, source: ExportSource) -> None:
    """Give the torchao tensor ``weight`` the run's exact codes, scales and zero points."""
    import torch

    codes = source.codes[layout.name]
    offset = 0 if layout.symmetric else 1 << (layout.bits - 1)
    parts = {"qdata": codes.q.to(torch.int32) - offset, "scale": codes.scale}
    if hasattr(weight, "zero_point"):
        zero = codes.zero_point if codes.zero_point is not None else torch.zeros_like(codes.scale)
        parts["zero_point"] = zero.to(torch.int32) - offset
    for key, value in parts.items():
        held = getattr(weight, key)
        if held.numel() != value.numel():
            raise ValueError(f"{layout.name}: torchao's {key} has shape {tuple(held.shape)}, the run's "
                             f"{tuple(value.shape)}")
        held.copy_(value.reshape(held.shape).to(held.dtype))


class TorchAOExporter(Exporter):
    """torchao ``FqnToConfig`` recipes and torchao-serialized checkpoints."""

    name = "torchao"
    target = "torchao"
    description = "torchao weight-only configs (quantize_, TorchAoConfig)"
    requires = ("torchao",)

    def recipe(self, source: ExportSource, expressed: Expressed, config: ExporterConfig) -> dict[str, str]:
        """``fqn_to_config.json`` (torchao's config JSON) and ``fqn_to_config.py`` (the snippet)."""
        from torchao.core.config import config_to_dict

        config = config_to_dict(fqn_config(expressed.layouts))
        return {RECIPE_FILE: json.dumps(config, indent=1) + "\n", SNIPPET_FILE: snippet(expressed.layouts)}

    def checkpoint(self, source: ExportSource, expressed: Expressed, staging: Path,
                   config: ExporterConfig) -> dict[str, Any]:
        """The torchao-quantized model with the run's codes, saved by ``save_pretrained``, with the recipe."""
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TorchAoConfig

        from qanalyze.models import _quiet_transformers, is_causal_lm

        assert source.model is not None
        auto = AutoModelForCausalLM if is_causal_lm(source.model) else AutoModelForSequenceClassification
        with tempfile.TemporaryDirectory(dir=staging.parent, prefix=".float-") as folder, \
                _quiet_transformers(hide_progress=True):
            source.model.save_pretrained(folder)
            model = auto.from_pretrained(folder, dtype=torch.float32,
                                         quantization_config=TorchAoConfig(quant_type=fqn_config(expressed.layouts)))
        with torch.no_grad():
            for name, layout in expressed.layouts.items():
                set_codes(model.get_submodule(name).weight, layout, source)
        with _quiet_transformers(hide_progress=True):
            model.save_pretrained(staging)
        if source.tokenizer is not None:
            source.tokenizer.save_pretrained(staging)
        for file, text in self.recipe(source, expressed, config).items():
            (staging / file).write_text(text, encoding="utf-8")
        return {"tensor": "IntxUnpackedToInt8Tensor (codes one per int8), Int8Tensor for 8-bit symmetric rows"}

    def load(self, path: Path) -> torch.nn.Module:
        """``from_pretrained``: transformers rebuilds the torchao tensors from the folder."""
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

        from qanalyze.models import _quiet_transformers, is_causal_lm_config

        with _quiet_transformers(hide_progress=True):
            config = AutoConfig.from_pretrained(str(path), local_files_only=True)
            auto = AutoModelForCausalLM if is_causal_lm_config(config) else AutoModelForSequenceClassification
            return auto.from_pretrained(str(path), dtype=torch.float32, local_files_only=True).eval()

    def overhead_bytes(self, expressed: Expressed) -> int:
        """torchao holds each code in an int8 (``8 − bits`` more bits a weight), each scale in float32 (16
        more bits a group) and each zero point in an int8 (``8 − bits`` more; 8 for symmetric Intx layouts,
        none for ``Int8WeightOnlyConfig``)."""
        extra_bits = 0
        for layout in expressed.layouts.values():
            out, columns = layout.shape
            groups = out * layout.spec.groups(columns)
            extra_bits += (8 - layout.bits) * out * columns + 16 * groups
            if not _is_int8_row(layout.bits, layout.group_size, layout.symmetric):
                extra_bits += groups * (8 if layout.symmetric else 8 - layout.bits)
        return extra_bits // 8


EXPORTER = TorchAOExporter()
