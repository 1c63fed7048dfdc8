"""Methods that swap the planned modules for quantized ones (`qanalyze.engine.apply.apply_plan`) and
save the run as a packed integer checkpoint (`qanalyze.engine.quantized_checkpoint`)."""

from __future__ import annotations

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
        """Swap the planned modules; each gets its own seeded generator."""
        from qanalyze.engine.apply import apply_plan

        assert plan is not None  # check() refused a missing plan
        applied = apply_plan(model, plan, self.engine_mode, seed=seed, options=self.builder_options(config))
        return Prepared(generators=applied.generators, swapped=len(applied.specs))

    def save(self, run: Path, model: torch.nn.Module, tokenizer: Any, plan: BitPlan | None, config: MethodConfig,
             prepared: Prepared) -> None:
        """The packed integer checkpoint: codes at their bits, float16 scales, the float rest."""
        from qanalyze.engine.quantized_checkpoint import save_quantized_run

        assert plan is not None
        save_quantized_run(run, model, tokenizer, plan, self.engine_mode)

    def load_run(self, run: Path, device: torch.device, num_labels: int | None = None) -> LoadedRun:
        """The model rebuilt from its packed integer weights, evaluated with the integer kernels."""
        from qanalyze.engine.quantized_checkpoint import load_quantized_run

        model, tokenizer, _, applied = load_quantized_run(run, device=device)
        return LoadedRun(model, tokenizer, Prepared(generators=applied.generators, swapped=len(applied.specs)))
