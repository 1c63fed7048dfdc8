"""``rtn``: post-training round-to-nearest of every planned linear weight in its column groups (no data)."""

from __future__ import annotations

from qanalyze.methods.weight_ptq import WeightPTQMethod


class RTNMethod(WeightPTQMethod):
    """Each weight rounded on its own, at its planned bits and column groups; seconds for a 135M model."""

    name = "rtn"
    ptq_name = "rtn"
    description = "post-training round-to-nearest of the planned weights in column groups (no data, no training)"


METHOD = RTNMethod()
