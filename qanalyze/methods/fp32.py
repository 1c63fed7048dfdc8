"""``fp32``: plain fine-tuning in float, the baseline every quantized run is compared with."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from qanalyze.methods.base import LoadedRun, Method, MethodConfig, Prepared

if TYPE_CHECKING:
    import torch

    from qanalyze.records import BitPlan


class FP32Method(Method):
    """No plan, no quantization: the model is saved ``from_pretrained``-loadable."""

    name = "fp32"
    description = "float fine-tuning (the baseline; `qanalyze finetune`)"
    plan_use = "none"
    sweep_role = None

    def save(self, run: Path, model: torch.nn.Module, tokenizer: Any, plan: BitPlan | None, config: MethodConfig,
             prepared: Prepared) -> None:
        """The float model and tokenizer."""
        from qanalyze.models import save_model

        save_model(model, tokenizer, run)

    def load_run(self, run: Path, device: torch.device, num_labels: int | None = None) -> LoadedRun:
        """The saved float model (its task head included)."""
        from qanalyze.models import load_model

        loaded = load_model(str(run), num_labels=num_labels)
        return LoadedRun(loaded.model.to(device), loaded.tokenizer, Prepared(), quantized=False)


METHOD = FP32Method()
