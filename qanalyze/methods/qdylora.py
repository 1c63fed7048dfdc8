"""``qdylora``: a frozen quantized base (the plan's bits, or NF4) with dynamic-rank LoRA adapters
(QDyLoRA, Rajabzadeh et al. 2024): one run serves every rank 1..r."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qanalyze.errors import ConfigError
from qanalyze.methods.base import LoadedRun, Method, MethodConfig, Prepared, option
from qanalyze.methods.parse import int_list, name_list

if TYPE_CHECKING:
    import torch

    from qanalyze.records import BitPlan


@dataclass(frozen=True)
class QDyLoRAConfig(MethodConfig):
    """The adapters (`qanalyze.engine.lora.LoRAConfig`, which they become) and the ranks a finished run is
    evaluated at."""

    rank: int = option(16, flag="--lora-rank", range=(1, None, False), type=int,
                       help="largest adapter rank r (one run serves ranks 1..r).")
    alpha: float = option(16.0, flag="--lora-alpha", type=float, help="scale alpha (alpha / rank).")
    targets: tuple[str, ...] = option(("query", "value"), flag="--lora-targets",
                                      parse=name_list,
                                      help="regexes of the linear modules that get adapters, comma-separated.")
    update: str = option("frozen", flag="--dylora-update", choices=("frozen", "all"),
                         help="update only the sampled rank's row and column (frozen) or rows 1..b (all).")
    base: str = option("plan", choices=("plan", "nf4"),
                       help="base weights at the plan's bits, or NF4 (QLoRA's 4-bit normal float, blocks of 64).")
    double_quant: bool = option(False, is_flag=True, help="with --base nf4: quantize the block scales too.")
    eval_ranks: tuple[int, ...] = option((1, 2, 4, 8, 16), parse=int_list,
                                         help="ranks the finished run is also evaluated at.")

    def __post_init__(self) -> None:
        bad = [r for r in self.eval_ranks if isinstance(r, bool) or not isinstance(r, int) or r < 1]
        if bad:
            raise ConfigError(f"evaluation ranks must be positive integers, not {bad}")
        self.lora()  # LoRAConfig names what is wrong

    def lora(self) -> Any:
        """The engine's `LoRAConfig` of these settings."""
        from qanalyze.engine.lora import LoRAConfig

        return LoRAConfig(rank=self.rank, alpha=self.alpha, targets=tuple(self.targets), update=self.update,
                          base=self.base, double_quant=self.double_quant)


@dataclass
class _Adapters(Prepared):
    """The adapters of a qdylora model, the rank sampler of a training run, and the ranks to evaluate."""

    adapters: dict[str, Any] = dataclasses.field(default_factory=dict)
    sampler: Any = None
    eval_ranks: tuple[int, ...] = ()
    model: Any = None

    @property
    def max_rank(self) -> int:
        return max(module.max_rank for module in self.adapters.values())

    def before_step(self) -> None:
        self.sampler.step()  # one rank for every adapter this step (DyLoRA)

    def before_eval(self) -> None:
        from qanalyze.engine.lora import set_rank

        set_rank(self.adapters, self.max_rank)

    def extra_evaluations(self, evaluate: Callable[[], Any]) -> tuple[dict[str, dict[str, float]], dict[str, int]]:
        from qanalyze.engine.lora import set_rank, trainable_parameters

        metrics, parameters = {}, {}
        for rank in sorted({r for r in self.eval_ranks if r <= self.max_rank}):
            set_rank(self.adapters, rank)
            metrics[str(rank)] = evaluate().metrics
            parameters[str(rank)] = trainable_parameters(self.model, rank)
        set_rank(self.adapters, self.max_rank)  # leave the saved model at its full rank
        return metrics, parameters


class QDyLoRAMethod(Method):
    """Adapters on the linear modules the targets name; the rest of the base frozen at the plan's bits."""

    name = "qdylora"
    description = "frozen quantized base (the plan's bits or NF4) with dynamic-rank LoRA adapters"
    config_class = QDyLoRAConfig
    plan_use = "optional"
    variants = "rank"
    sweep_group_check = False  # the base is fake-quantized weights only: any input or gradient layout is fine

    def needs_plan(self, config: MethodConfig) -> bool:
        """An NF4 base needs no plan; a plan base does."""
        assert isinstance(config, QDyLoRAConfig)
        return config.base != "nf4"

    def missing_plan(self) -> str:
        """A plan base needs a plan."""
        return "--mode qdylora needs --plan for its base, or --base nf4"

    def check(self, model: torch.nn.Module, plan: BitPlan | None, config: MethodConfig) -> None:
        """A plan base needs a plan of this architecture."""
        from qanalyze.plan.architecture import check_plan

        if plan is None and self.needs_plan(config):
            raise ConfigError("mode qdylora needs a plan for its base, or an NF4 base (--base nf4)")
        if plan is not None:
            from qanalyze.models import inventory

            check_plan(plan, {info.name: list(info.shape) for info in inventory(model)})
        from qanalyze.engine.lora import adapted_modules

        assert isinstance(config, QDyLoRAConfig)
        adapted_modules(model, config.targets)  # refused here, before a run directory is made

    def prepare(self, model: torch.nn.Module, plan: BitPlan | None, config: MethodConfig, *, seed: int) -> Prepared:
        """Freeze and quantize the base, add the adapters; the rank sampler is seeded from ``seed``."""
        import torch

        from qanalyze.engine.lora import RankSampler, apply_qdylora

        assert isinstance(config, QDyLoRAConfig)
        built = apply_qdylora(model, plan, config.lora(), seed=seed)
        sampler = RankSampler(built, torch.Generator().manual_seed(seed * 7919 + 1))
        generators = {"rank-sampler": sampler.generator, **{name: m.generator for name, m in built.items()}}
        return _Adapters(generators=generators, shared_generators=frozenset({"rank-sampler"}), adapters=built,
                         sampler=sampler, eval_ranks=config.eval_ranks, model=model)

    def save(self, run: Path, model: torch.nn.Module, tokenizer: Any, plan: BitPlan | None, config: MethodConfig,
             prepared: Prepared) -> None:
        """The model with its dequantized base and adapters, ``lora.json``, and the plan if there was one."""
        from qanalyze.engine.lora_checkpoint import LORA_FILE
        from qanalyze.models import save_model
        from qanalyze.records import atomic_write_text

        assert isinstance(config, QDyLoRAConfig)
        save_model(model, tokenizer, run)
        atomic_write_text(run / LORA_FILE, json.dumps(dataclasses.asdict(config.lora()), indent=2))
        if plan is not None:
            plan.save(run / "plan.json")

    def load_run(self, run: Path, device: torch.device, num_labels: int | None = None) -> LoadedRun:
        """The saved base and adapters, at full rank; `LoadedRun.at_variant` sets another rank."""
        from qanalyze.engine.lora_checkpoint import load_qdylora_run

        model, tokenizer, adapters = load_qdylora_run(run, device=device)
        return _LoadedAdapters(model, tokenizer, _Adapters(adapters=adapters))

    def recorded(self, config: MethodConfig) -> dict[str, Any]:
        """metrics.json keeps the adapters' settings under ``lora``."""
        assert isinstance(config, QDyLoRAConfig)
        from qanalyze.records import as_json

        return {"lora": as_json(dataclasses.asdict(config.lora()))}

    def sweep_recorded(self, config: MethodConfig) -> dict[str, Any]:
        """sweep.json keeps the adapters under ``lora`` and the ranks under ``eval_ranks``."""
        assert isinstance(config, QDyLoRAConfig)
        return {**self.recorded(config), "eval_ranks": list(config.eval_ranks)}

    def evaluated_variants(self, config: MethodConfig) -> tuple[str, ...]:
        """The ranks (up to r) a finished run is evaluated at."""
        assert isinstance(config, QDyLoRAConfig)
        return tuple(str(r) for r in sorted({r for r in config.eval_ranks if r <= config.rank}))

    def check_sweep(self, config: MethodConfig) -> None:
        """A sweep's qdylora runs take their base from each plan."""
        assert isinstance(config, QDyLoRAConfig)
        if config.base != "plan":
            raise ConfigError("a sweep's qdylora runs take their base from each plan (LoRAConfig base 'plan'); "
                              "an NF4 base is one run: qanalyze train --mode qdylora --base nf4")


@dataclass
class _LoadedAdapters(LoadedRun):
    def at_variant(self, label: str) -> None:
        from qanalyze.engine.lora import set_rank

        assert isinstance(self.prepared, _Adapters)
        set_rank(self.prepared.adapters, int(label))


METHOD = QDyLoRAMethod()
