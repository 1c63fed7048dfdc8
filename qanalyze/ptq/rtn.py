"""Round-to-nearest (RTN): each weight quantized on its own in column groups, no calibration data."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qanalyze.quant.columns import ColumnQuantized, ColumnSpec, quantize_columns


@dataclass(frozen=True)
class RTNConfig:
    """RTN has no settings of its own: the bits and groups come from each module's `ColumnSpec`."""


def rtn_quantize(weight: torch.Tensor, spec: ColumnSpec, hessian: torch.Tensor | None = None,
                 config: RTNConfig | None = None, *, where: str = "the weight") -> ColumnQuantized:
    """Round ``weight`` ``(out, in)`` to the nearest code of its column groups; ``hessian`` and ``config``
    are accepted for the PTQ method interface and unused."""
    del hessian, config
    return quantize_columns(weight, spec, where=where)
