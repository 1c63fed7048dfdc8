"""``ptq-dynamic``: post-training dynamic quantization of the model as it is (no training)."""

from __future__ import annotations

from qanalyze.methods.swap import SwapMethod


class DynamicPTQMethod(SwapMethod):
    """Integer GEMMs and embeddings with dynamic input scales; evaluated, never trained."""

    name = "ptq-dynamic"
    engine_mode = "ptq-dynamic"
    description = "post-training dynamic quantization (integer GEMMs, no training)"
    trains = False


METHOD = DynamicPTQMethod()
