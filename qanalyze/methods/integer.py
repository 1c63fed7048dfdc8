"""``int``: integer forward and backward propagation (dynamic fixed point), integer fine-tuning."""

from __future__ import annotations

from qanalyze.methods.swap import SwapMethod


class IntegerMethod(SwapMethod):
    """Linear, embedding and layer-norm layers computed in integers, forward and backward; FP32 update."""

    name = "int"
    engine_mode = "int"
    description = "integer forward and backward (dynamic fixed point; integer fine-tuning)"


METHOD = IntegerMethod()
