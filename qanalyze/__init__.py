"""qanalyze: how many bits can each part of a transformer take, and what will it cost?

The public verbs, one per stage, each taking a config and returning a typed record::

    import qanalyze
    data = qanalyze.load_task("sst2", "../shared/data/glue", max_train_examples=2000)
    run = qanalyze.train("minilm-l6", data, qanalyze.TrainConfig(epochs=1), "runs/sst2-fp32")
    plans = qanalyze.plan_for("runs/sst2-fp32", "4bit", qanalyze.PlanConfig(), "runs/plan-4bit.json", data=data)
    qanalyze.train("runs/sst2-fp32", data, qanalyze.TrainConfig(epochs=1), "runs/int-4bit", mode="int",
                   plan=plans[0])
    qanalyze.evaluate_run("runs/int-4bit")
    qanalyze.render_report(["runs/sensitivity.json", "runs/plan-4bit.json", "runs/int-4bit"], "report.html")

Every command of the CLI is one of these verbs (`qanalyze.verbs`); methods (``--mode``) are plug-ins
registered in `qanalyze.methods`.

Names are imported on first use, so ``import qanalyze`` (and ``qanalyze --help``) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_model": "qanalyze.models",
    "inventory": "qanalyze.models",
    "LoadedModel": "qanalyze.models",
    "ModuleInfo": "qanalyze.models",
    "load_task": "qanalyze.data",
    "TaskData": "qanalyze.data",
    "get_task": "qanalyze.tasks",
    "TaskSpec": "qanalyze.tasks",
    "train": "qanalyze.verbs",
    "quantize": "qanalyze.verbs",
    "evaluate_run": "qanalyze.verbs",
    "plan_for": "qanalyze.verbs",
    "render_report": "qanalyze.verbs",
    "apply_plan": "qanalyze.engine.apply",
    "sweep": "qanalyze.sweep.run",
    "SweepConfig": "qanalyze.sweep.config",
    "TrainConfig": "qanalyze.engine.train",
    "evaluate": "qanalyze.engine.evaluate",
    "Method": "qanalyze.methods",
    "MethodConfig": "qanalyze.methods",
    "register": "qanalyze.methods",
    "get_method": "qanalyze.methods",
    "EvalRecord": "qanalyze.records",
    "RunRecord": "qanalyze.records",
    "SensitivityReport": "qanalyze.records",
    "analyze": "qanalyze.sensitivity.analyze",
    "AnalyzeConfig": "qanalyze.sensitivity.analyze",
    "make_plan": "qanalyze.plan.make",
    "PlanConfig": "qanalyze.plan.make",
    "parse_budget": "qanalyze.plan.budget",
    "BitPlan": "qanalyze.records",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first access."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'qanalyze' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return __all__
