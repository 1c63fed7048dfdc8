"""A property: any valid plan (random bits, layouts and float modules, drawn from a seeded generator)
trains in every plan-following method, and the saved run reloads through `evaluate` to the metrics the
training recorded."""

from __future__ import annotations

import pytest
import torch

from qanalyze import load_task, verbs
from qanalyze.engine.train import TrainConfig
from qanalyze.methods import get_method
from qanalyze.models import load_model
from qanalyze.plan.uniform import uniform_plan


def _random_plan(model: torch.nn.Module, mode: str, generator: torch.Generator):
    plan = uniform_plan(model, 8, kinds=get_method(mode).module_kinds)
    shapes = plan.model["modules"]

    def draw(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (), generator=generator))

    for name, entry in plan.modules.items():
        if entry.get("float"):
            continue
        if draw(0, 5) == 0:
            plan.modules[name] = {"float": True}
            continue
        per_row = draw(0, 1) == 1
        entry.update(weight_bits=draw(2, 8), group="channel" if per_row else "tensor",
                     groups=shapes[name][0] if per_row else 1, activation_bits=draw(4, 8),
                     gradient_bits=draw(6, 8))
    return plan


@pytest.mark.parametrize(("mode", "seed"), [("qat", 1), ("int", 2)])
def test_random_valid_plans_train_and_reload_to_the_recorded_metrics(tmp_path, tiny_bert_dir, glue_dir, mode, seed):
    generator = torch.Generator().manual_seed(seed)
    plan = _random_plan(load_model(str(tiny_bert_dir), num_labels=2).model, mode, generator)
    data = load_task("sst2", glue_dir, max_train_examples=16, max_eval_examples=16)
    config = TrainConfig(max_steps=2, batch_size=8, max_length=16, eval_batch_size=16)
    record = verbs.train(str(tiny_bert_dir), data, config, tmp_path / "run", mode=mode, plan=plan)
    reloaded = verbs.evaluate_run(str(tmp_path / "run"), max_eval_examples=16)
    assert reloaded.quantized
    assert reloaded.record.metrics == pytest.approx(record.metrics)
    assert reloaded.record.loss == pytest.approx(record.eval_history[-1]["loss"], rel=1e-5)
