"""Knowledge distillation from the float model a quantized run starts from.

Quantization-aware re-training at 2 to 3 bits loses more than the plan's bytes explain when the
only signal is the hard label: the float model's logits carry how sure it was on each example,
which is what the quantized copy has to reproduce. The teacher is a frozen copy of the starting
model taken before any module is quantized; each step mixes the task loss with the distillation
loss, ``(1 − α) · task + α · T² · KL(softmax(t/T) ‖ softmax(s/T))`` for classification and
``(1 − α) · task + α · MSE(s, t)`` for regression (one output), as in TinyBERT / TernaryBERT's
prediction-layer loss.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch.nn import functional

from qanalyze.errors import ConfigError
from qanalyze.models import has_task_head


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """The distillation loss of ``student`` logits against ``teacher`` logits (same shape, ``(batch, labels)``).

    Two or more labels: ``T² · KL(softmax(teacher/T) ‖ softmax(student/T))`` averaged over the batch (the T²
    keeps its gradient on the scale of the task loss's); one output (regression): mean squared error.
    """
    if student.shape != teacher.shape:
        raise ConfigError(f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ")
    student, teacher = student.float(), teacher.float()
    if student.shape[-1] == 1:
        return functional.mse_loss(student, teacher)
    log_student = functional.log_softmax(student / temperature, dim=-1)
    log_teacher = functional.log_softmax(teacher / temperature, dim=-1)
    kl = functional.kl_div(log_student.reshape(-1, student.shape[-1]), log_teacher.reshape(-1, student.shape[-1]),
                           log_target=True, reduction="batchmean")
    return kl * temperature**2


class Teacher:
    """A frozen copy of ``model`` (taken now, before it is quantized) whose logits guide a run.

    ``weight`` is α, the share of the distillation loss; ``temperature`` T softens both distributions.
    Raises ConfigError when ``model`` has no trained task head: there is nothing to learn from.
    """

    def __init__(self, model: torch.nn.Module, weight: float, temperature: float) -> None:
        if not has_task_head(model):
            raise ConfigError("--distill needs a fine-tuned model to learn from (a `qanalyze finetune` run); "
                              "this model's task head is untrained")
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.weight, self.temperature = weight, temperature

    def mix(self, task_loss: torch.Tensor, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``(1 − α) · task_loss + α · distillation_loss(logits, teacher's logits on batch)``."""
        with torch.no_grad():
            inputs = {key: value for key, value in batch.items() if key != "labels"}
            target = self.model(**inputs).logits
        return (1 - self.weight) * task_loss + self.weight * distillation_loss(logits, target, self.temperature)
