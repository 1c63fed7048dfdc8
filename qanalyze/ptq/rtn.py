"""Round-to-nearest (RTN): each weight quantized on its own in column groups, no calibration data."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qanalyze.quant.columns import ColumnQuantized, ColumnSpec, quantize_columns
from qanalyze.quant.ggml import GGMLQuantized, GGMLType, quantize_ggml


@dataclass(frozen=True)
class RTNConfig:
    """RTN has no settings of its own: the bits and groups come from each module's `ColumnSpec`."""


def rtn_quantize(weight: torch.Tensor, spec: ColumnSpec | GGMLType, hessian: torch.Tensor | None = None,
                 config: RTNConfig | None = None, *, where: str = "the weight") -> ColumnQuantized | GGMLQuantized:
    """Round ``weight`` ``(out, in)`` to the nearest code of its column groups (or of its GGML type's blocks);
    ``hessian`` and ``config`` are accepted for the PTQ method interface and unused."""
    del hessian, config
    if isinstance(spec, GGMLType):
        return quantize_ggml(weight, spec, where=where)
    return quantize_columns(weight, spec, where=where)
