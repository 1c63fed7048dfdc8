"""Methods that swap the planned modules for quantized ones (`qanalyze.engine.apply.apply_plan`) and
save the run as a packed integer checkpoint (`qanalyze.engine.quantized_checkpoint`)."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from qanalyze.methods.base import LoadedRun, Method, MethodConfig, Prepared

if TYPE_CHECKING:
    import torch

    from qanalyze.engine.apply import Mode
    from qanalyze.records import BitPlan


class SwapMethod(Method):
    """A method run by one engine mode of `qanalyze.engine.apply.MODES` (named ``engine_mode``): the
    engine mode says which module kinds it swaps, at which bits and scale layouts."""

    engine_mode: ClassVar[str] = ""

    def engine(self) -> Mode:
        """The engine mode (imported on use: it loads torch)."""
        from qanalyze.engine.apply import get_mode

        return get_mode(self.engine_mode)

    @property
    def module_kinds(self) -> tuple[str, ...]:  # type: ignore[override]
        """The kinds the engine mode can swap."""
        return tuple(self.engine().builders)

    @property
    def activation_groups(self) -> tuple[str, ...]:  # type: ignore[override]
        """The input scale layouts the engine mode runs."""
        return self.engine().activation_groups

    @property
    def gradient_groups(self) -> tuple[str, ...]:  # type: ignore[override]
        """The output-gradient scale layouts the engine mode runs."""
        return self.engine().gradient_groups

    @property
    def fixed_bits(self) -> int | None:  # type: ignore[override]
        """The bits the engine mode always runs at, if any."""
        return self.engine().fixed_bits

    def builder_options(self, config: MethodConfig) -> dict[str, Any]:
        """Keyword options the engine mode's builders take: the config's fields (int4: its `Int4Spec`)."""
        return dataclasses.asdict(config)

    def check(self, model: torch.nn.Module, plan: BitPlan | None, config: MethodConfig) -> None:
        """The plan must be for this architecture and hold only modules the engine mode can run."""
        from qanalyze.engine.apply import validate_plan

        super().check(model, plan, config)
        if plan is not None:
            validate_plan(model, plan, self.engine_mode)

    def prepare(self, model: torch.nn.Module, plan: BitPlan | None, config: MethodConfig, *, seed: int) -> Prepared:
        """Swap the planned modules; each gets its own seeded generator. A causal LM trained on a column plan keeps
        its unquantized copy as the reference of the ``lm`` task's KL divergence, as the PTQ methods do, so that
        their runs and this one report the same figures."""
        from qanalyze.engine.apply import apply_plan
        from qanalyze.models import is_causal_lm

        assert plan is not None  # check() refused a missing plan
        reference = copy.deepcopy(model).eval() if _column_plan(plan) and is_causal_lm(model) else None
        applied = apply_plan(model, plan, self.engine_mode, seed=seed, options=self.builder_options(config))
        return Prepared(generators=applied.generators, swapped=len(applied.specs), reference=reference)

    def save(self, run: Path, model: torch.nn.Module, tokenizer: Any, plan: BitPlan | None, config: MethodConfig,
             prepared: Prepared) -> None:
        """The packed integer checkpoint: codes at their bits, float16 scales, the float rest. A plan of column
        layouts (``qat`` of a PTQ plan) is saved as the PTQ methods save theirs
        (`qanalyze.engine.column_checkpoint`), so ``evaluate`` and ``export`` read it the same way."""
        from qanalyze.engine.quantized_checkpoint import save_quantized_run

        assert plan is not None
        if _column_plan(plan):
            _save_column_plan_run(run, model, tokenizer, plan, self.name)
            return
        save_quantized_run(run, model, tokenizer, plan, self.engine_mode)

    def load_run(self, run: Path, device: torch.device, num_labels: int | None = None) -> LoadedRun:
        """The model rebuilt from its packed integer weights, evaluated with the integer kernels (a column plan's
        run: its weights rebuilt from their codes, the model it was trained from as the KL reference)."""
        from qanalyze.engine.column_checkpoint import is_column_run
        from qanalyze.engine.quantized_checkpoint import load_quantized_run
        from qanalyze.methods.weight_ptq import load_column_plan_run

        if is_column_run(run):
            return load_column_plan_run(run, device)

        model, tokenizer, _, applied = load_quantized_run(run, device=device)
        return LoadedRun(model, tokenizer, Prepared(generators=applied.generators, swapped=len(applied.specs)))


def _save_column_plan_run(run: Path, model: torch.nn.Module, tokenizer: Any, plan: BitPlan, method: str) -> None:
    from qanalyze.engine.apply import swapped_modules
    from qanalyze.engine.column_checkpoint import save_column_run

    swapped = swapped_modules(model)
    codes = {name: module.column_quantized() for name, module in swapped.items()}  # type: ignore[operator]
    buffers = frozenset(f"{name}.{key}" for name, module in swapped.items()
                        for key, _ in module.named_buffers(recurse=False))
    record = {"method": method, "trained": True, "storage_bits": sum(c.storage_bits for c in codes.values()),
              "modules": {name: {"bits": plan.entry(name).weight_bits, "layout": plan.entry(name).column_group,
                                 "storage_bits": c.storage_bits} for name, c in codes.items()}}
    save_column_run(run, model, tokenizer, plan, codes, record, exclude=buffers)


def _column_plan(plan: BitPlan) -> bool:
    """Whether ``plan`` quantizes in column layouts (a PTQ plan: ``g128``, ``Q4_K``...)."""
    return any(entry.quantized and entry.column_group is not None for entry in plan.entries.values())
