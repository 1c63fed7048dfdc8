"""What a method is: a typed config and the hooks the trainer, the CLI, the sweep and `evaluate` call.

A method turns a model and (usually) a plan into something that trains or is only evaluated, and
saves and reloads what it made. Every method-specific decision lives in the method's own module;
the trainer, the CLI and the sweep only call these hooks. Method modules import torch and the
engine inside their hooks, so the registry (and ``qanalyze --help``) stays light.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from qanalyze.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from qanalyze.records import BitPlan

def option(default: Any = dataclasses.MISSING, *, help: str, flag: str | None = None, **click: Any) -> Any:
    """A config field that is also a command-line option: ``help`` is its text in ``--help``, ``flag``
    the option's name (default ``--field-name``); ``click`` passes on (``type``, ``is_flag``, ``secondary``
    for a ``--x/--no-x`` pair, ``parse`` to turn the typed text into the field's value, ``shared`` for a field
    of a base config that several methods of one command take: one option for all of them)."""
    metadata = {"help": help, "flag": flag, **click}
    if isinstance(default, list | dict | set):
        raise TypeError("use a tuple default for a sequence option")
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's settings. Subclasses are frozen dataclasses whose fields are declared
    with `option` (help text in the metadata) and validated in ``__post_init__``."""

    def recorded(self) -> dict[str, Any]:
        """The settings as a run records them (JSON-ready: tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass
class Prepared:
    """What a method did to a model for one run: the generators a checkpoint must save (so a resumed run
    draws the same numbers), how many modules it swapped, and per-step and evaluation hooks."""

    generators: dict[str, torch.Generator] = field(default_factory=dict)
    swapped: int = 0
    shared_generators: frozenset[str] = frozenset()
    """Names of ``generators`` whose draws must be the same on every rank of a run on several ranks (DyLoRA's
    rank of each step); the others draw per rank (`qanalyze.engine.data_parallel`)."""
    reference: torch.nn.Module | None = None
    """The unquantized model, kept by post-training methods so that the ``lm`` task's evaluation reports the
    KL divergence to it (None: no reference)."""

    def before_step(self) -> None:
        """Called before each optimizer step (DyLoRA draws its rank here)."""

    def before_eval(self) -> None:
        """Called before the run's main evaluation (DyLoRA evaluates at its full rank)."""

    def extra_evaluations(self, evaluate: Callable[[], Any]) -> tuple[dict[str, dict[str, float]], dict[str, int]]:
        """Further evaluations of the finished run, as (metrics by label, trainable parameters by label);
        ``evaluate()`` evaluates the model as it is now. None by default."""
        return {}, {}


@dataclass
class LoadedRun:
    """A finished run rebuilt for evaluation: the model (eval mode), its tokenizer, and what the method
    prepared (qdylora: its adapters, for evaluating at other ranks)."""

    model: torch.nn.Module
    tokenizer: Any
    prepared: Prepared
    quantized: bool = True
    reference: torch.nn.Module | None = None
    """The model the run was quantized from, for the ``lm`` task's KL divergence (None when the run has
    no such reference or it cannot be found any more)."""

    def at_variant(self, label: str) -> None:
        """Switch the model to a variant of the run (qdylora: a rank); ConfigError if it has none."""
        raise ConfigError("this run has no variants to evaluate (--ranks applies to qdylora runs only)")


class Method:
    """A training or quantization method. Subclass it, set the class attributes, and override the hooks
    the method needs; register an instance with `qanalyze.methods.register`."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    trains: ClassVar[bool] = True
    command: ClassVar[str] = "train"
    """The command that runs the method: ``train`` (``--mode``) or ``quantize`` (``--method``: post-training
    methods that calibrate on data and never train)."""
    plan_use: ClassVar[str] = "required"
    """Whether a run needs a plan: ``required``, ``optional`` (when `needs_plan` says so) or ``none``."""
    sweep_role: ClassVar[str | None] = "plan"
    """How a sweep runs the method: ``plan`` (once per budget and plan), ``reference`` (once, on a uniform
    plan at ``fixed_bits``) or None (never)."""
    fixed_bits: ClassVar[int | None] = None
    """Bits the method always runs at (int4: 4): a sweep runs it once on a uniform plan at these bits."""
    module_kinds: ClassVar[tuple[str, ...]] = ("linear", "embedding")
    """The module kinds a ``uniform:N`` plan quantizes for this method."""
    activation_groups: ClassVar[tuple[str, ...]] = ("tensor",)
    gradient_groups: ClassVar[tuple[str, ...]] = ("tensor",)
    variants: ClassVar[str | None] = None
    """What a finished run can also be evaluated at (qdylora: ``rank``), or None."""
    sweep_group_check: ClassVar[bool] = True
    """Whether a sweep's ``--act-group`` / ``--grad-group`` must be layouts this method runs."""

    def make_config(self, values: Mapping[str, Any] | None = None) -> MethodConfig:
        """The method's config from field values (unknown names are a ConfigError)."""
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(self.config_class)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"method {self.name} has no setting {', '.join(unknown)}; known: "
                              f"{', '.join(sorted(known)) or '(none)'}")
        return self.config_class(**values)

    def needs_plan(self, config: MethodConfig) -> bool:
        """Whether a run with ``config`` needs a plan."""
        return self.plan_use == "required"

    def missing_plan(self) -> str:
        """What the user is told when a run that needs a plan has none."""
        return "missing option --plan (a plan.json, or uniform:N)"

    def check(self, model: torch.nn.Module, plan: BitPlan | None, config: MethodConfig) -> None:
        """Refuse, before anything is written, a plan or config this method cannot run on ``model``."""
        if plan is None and self.needs_plan(config):
            raise ConfigError(f"mode {self.name} needs a plan (--plan plan.json or uniform:N)")
        if plan is not None and self.plan_use == "none":
            raise ConfigError(f"a plan needs a quantized mode, not {self.name}")

    def prepare(self, model: torch.nn.Module, plan: BitPlan | None, config: MethodConfig, *, seed: int) -> Prepared:
        """Change ``model`` in place as the method needs before training or evaluation."""
        return Prepared()

    def prepare_with_data(self, model: torch.nn.Module, plan: BitPlan | None, config: MethodConfig, *, seed: int,
                          calibration: Any, progress: Callable[[str, int, int, str], None] | None = None) -> Prepared:
        """`prepare`, given the run's encoded training data too (``calibration``: the ``lm`` task's windows
        or a classification task's encoded examples), for methods that calibrate on it (GPTQ), and a
        ``progress(stage, done, total, detail)`` callback for long preparations. The default ignores both."""
        return self.prepare(model, plan, config, seed=seed)

    def save(self, run: Path, model: torch.nn.Module, tokenizer: Any, plan: BitPlan | None, config: MethodConfig,
             prepared: Prepared) -> None:
        """Write what a finished run needs to be reloaded (`load_run`) into ``run``."""
        raise NotImplementedError

    def load_run(self, run: Path, device: torch.device, num_labels: int | None = None) -> LoadedRun:
        """Rebuild the finished run in ``run`` for evaluation (``num_labels``: the task's, for a head)."""
        raise NotImplementedError

    def recorded(self, config: MethodConfig) -> dict[str, Any]:
        """The keys a run's ``metrics.json`` settings hold for this method's config (compared on resume
        and by a sweep that reuses runs)."""
        recorded = config.recorded()
        return {"mode_options": recorded} if recorded else {}

    def sweep_recorded(self, config: MethodConfig) -> dict[str, Any]:
        """The keys ``sweep.json`` settings hold for this method when a sweep runs it."""
        recorded = config.recorded()
        return {self.name: recorded} if recorded else {}

    def evaluated_variants(self, config: MethodConfig) -> tuple[str, ...]:
        """Labels of the further evaluations a finished run holds (`Prepared.extra_evaluations`)."""
        return ()

    def check_sweep(self, config: MethodConfig) -> None:
        """Refuse a config a sweep cannot run for every plan (qdylora: an NF4 base is one run, not a sweep)."""
