"""``qat``: Q8BERT's quantization-aware training (fake quantization, straight-through estimator)."""

from __future__ import annotations

from qanalyze.methods.swap import SwapMethod


class QATMethod(SwapMethod):
    """Fake-quantized GEMMs and embeddings; EMA input ranges or per-token scales; layer norms in float."""

    name = "qat"
    engine_mode = "qat"
    description = ("Q8BERT fake quantization (EMA activation ranges, or per-token scales), straight-through "
                   "estimator")


METHOD = QATMethod()
