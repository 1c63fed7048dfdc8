"""What the post-training weight quantizers (``rtn``, ``gptq``) share: a weight-only column-group plan, run
once on the model by `qanalyze.ptq.quantize.quantize_model`, saved as a packed column checkpoint
(`qanalyze.engine.column_checkpoint`) and evaluated without training.

They are run by ``qanalyze quantize`` (``command = "quantize"``) and by ``qanalyze sweep --modes rtn,gptq``.
Each module's bits, column group and scheme come from its plan entry: ``column_group`` (``g128``...), or a
plan entry without one whose ``group`` is ``channel`` (one scale per row); any other layout, bits above 8,
and quantized modules that are not linear layers are refused by name before anything is written. The
model's own copy from before quantization is kept as the ``lm`` task's reference for the KL divergence.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from qanalyze.errors import ConfigError
from qanalyze.methods.base import LoadedRun, Method, MethodConfig, Prepared, option

if TYPE_CHECKING:
    import torch

    from qanalyze.ptq.quantize import PTQRecord
    from qanalyze.quant.columns import ColumnSpec
    from qanalyze.quant.ggml import GGMLType
    from qanalyze.records import BitPlan


@dataclass(frozen=True)
class WeightPTQConfig(MethodConfig):
    """Settings every post-training weight quantizer takes."""

    partial_groups: bool = option(False, flag="--partial-groups", secondary="--no-partial-groups", shared=True,
                                  help="let the last column group of a row be shorter where the group size does "
                                       "not divide a module's input width (SmolLM2's 576 columns at g128: four "
                                       "groups of 128 and one of 64, as GPTQ's packed format does); off: refused, "
                                       "naming the module and the sizes that fit.")


@dataclass
class PTQPrepared(Prepared):
    """What a PTQ method did: its `PTQRecord` (codes and errors of every module)."""

    record: PTQRecord | None = None


def plan_specs(model: torch.nn.Module, plan: BitPlan, *, partial_last: bool) -> dict[str, ColumnSpec | GGMLType]:
    """The `ColumnSpec` (or `GGMLType`, for a llama.cpp type) of every module ``plan`` quantizes, each checked
    against the module's input width; ConfigError naming the module for anything a weight-only column quantizer
    cannot run."""
    from qanalyze.ptq.quantize import check_layout, linear_modules
    from qanalyze.quant.columns import ColumnSpec, parse_column_layout
    from qanalyze.quant.ggml import get_ggml_type, is_ggml_layout

    linears = linear_modules(model)
    specs: dict[str, ColumnSpec | GGMLType] = {}
    for name, entry in plan.entries.items():
        if not entry.quantized:
            continue
        if name not in linears:
            raise ConfigError(f"the plan quantizes {name}, which is not a linear layer; rtn and gptq quantize the "
                              "weights of linear layers only (plan with --keep-float embedding, or use a uniform "
                              "column plan such as uniform:4:g64)")
        partial = partial_last
        if is_ggml_layout(entry.column_group):
            kind = get_ggml_type(entry.column_group)
            check_layout(kind, linears[name].in_features, name)
            specs[name] = kind
            continue
        if entry.column_group is not None:
            group, layout_partial = parse_column_layout(entry.column_group)
            partial = partial or layout_partial  # g128p: planned with a shorter last group
        elif entry.group == "channel":
            group = None
        else:
            raise ConfigError(f"the plan gives {name} row groups {entry.group!r}, not a column layout; rtn and gptq "
                              "need column groups (plan with --group-sizes g32,g64,g128,row, or uniform:N:gG)")
        try:
            spec = ColumnSpec(entry.weight_bits, group, symmetric=entry.scheme == "symmetric",
                              partial_last=partial)
            spec.width(linears[name].in_features, where=name)
        except ConfigError as error:
            raise ConfigError(str(error) if name in str(error) else f"{name}: {error}") from None
        specs[name] = spec
    if not specs:
        raise ConfigError("the plan quantizes no linear layer")
    return specs


class WeightPTQMethod(Method):
    """Base of the post-training weight quantizers: subclasses name their `qanalyze.ptq.quantize.PTQ_METHODS`
    entry (``ptq_name``) and turn their config into that method's settings (`ptq_config`)."""

    trains = False
    command = "quantize"
    sweep_role = "plan"
    module_kinds = ("linear",)
    sweep_group_check = False
    config_class: ClassVar[type[MethodConfig]] = WeightPTQConfig
    ptq_name: ClassVar[str] = ""

    def ptq_config(self, config: MethodConfig) -> Any:
        """The `qanalyze.ptq` config of this method for ``config``."""
        from qanalyze.ptq.quantize import get_ptq_method

        return get_ptq_method(self.ptq_name).config_cls()

    def calibration(self, data: Any, config: MethodConfig, seed: int) -> Any:
        """The calibration windows or examples ``data`` gives this method (None: it needs none)."""
        return None

    def check(self, model: torch.nn.Module, plan: BitPlan | None, config: MethodConfig) -> None:
        """The plan must give every quantized module a column layout its width takes."""
        super().check(model, plan, config)
        assert plan is not None
        from qanalyze.models import inventory
        from qanalyze.plan.architecture import check_plan

        check_plan(plan, {info.name: list(info.shape) for info in inventory(model)})
        plan_specs(model, plan, partial_last=config.partial_groups)

    def prepare_with_data(self, model: torch.nn.Module, plan: BitPlan | None, config: MethodConfig, *, seed: int,
                          calibration: Any, progress: Callable[[str, int, int, str], None] | None = None) -> Prepared:
        """Quantize the planned modules in place (GPTQ: calibrated layer by layer on ``calibration``), reporting
        each finished module to ``progress``; keep the unquantized model of a causal LM as the reference of its
        KL divergence."""
        from qanalyze.models import is_causal_lm
        from qanalyze.ptq.quantize import quantize_model

        assert plan is not None
        specs = plan_specs(model, plan, partial_last=config.partial_groups)
        reference = copy.deepcopy(model).eval() if is_causal_lm(model) else None
        done: list[str] = []

        def on_module(name: str, outcome: Any) -> None:
            done.append(name)
            if progress is not None:
                progress(self.name, len(done), len(specs), name)

        record = quantize_model(model, specs, self.ptq_name, self.calibration(calibration, config, seed),
                                config=self.ptq_config(config), on_module=on_module, **self.quantize_options(config))
        return PTQPrepared(reference=reference, record=record)

    def quantize_options(self, config: MethodConfig) -> dict[str, Any]:
        """Further keyword arguments of `quantize_model` (GPTQ: its calibration batch size)."""
        return {}

    def prepare(self, model: torch.nn.Module, plan: BitPlan | None, config: MethodConfig, *, seed: int) -> Prepared:
        """Without data: only methods that need no calibration can run."""
        return self.prepare_with_data(model, plan, config, seed=seed, calibration=None)

    def save(self, run: Path, model: torch.nn.Module, tokenizer: Any, plan: BitPlan | None, config: MethodConfig,
             prepared: Prepared) -> None:
        """The packed column checkpoint with ``ptq.json``."""
        from qanalyze.engine.column_checkpoint import save_column_run

        assert plan is not None and isinstance(prepared, PTQPrepared) and prepared.record is not None
        record = prepared.record
        save_column_run(run, model, tokenizer, plan, {n: o.quantized for n, o in record.modules.items()},
                        record.to_dict())

    def load_run(self, run: Path, device: torch.device, num_labels: int | None = None) -> LoadedRun:
        """The model rebuilt from its packed codes (`load_column_plan_run`)."""
        return load_column_plan_run(run, device)


def load_column_plan_run(run: Path, device: torch.device) -> LoadedRun:
    """A run of a column plan (``rtn``, ``gptq``, or ``qat`` of such a plan) rebuilt from its packed codes; a
    causal LM gets the model it was quantized from as its reference, when that can still be loaded (the run's
    recorded source)."""
    from qanalyze.engine.column_checkpoint import load_column_run
    from qanalyze.models import is_causal_lm

    model, tokenizer, _, _ = load_column_run(run, device=device)
    reference = _reference(run, device) if is_causal_lm(model) else None
    return LoadedRun(model, tokenizer, Prepared(), quantized=True, reference=reference)


def _reference(run: Path, device: torch.device) -> torch.nn.Module | None:
    from qanalyze.errors import InputError
    from qanalyze.models import load_model
    from qanalyze.records import RunRecord
    from qanalyze.rundir import METRICS_FILE

    identity = RunRecord.load(run / METRICS_FILE).model
    location, source = identity.get("location"), identity.get("source")
    spec = location if location and Path(location).exists() else source
    if not spec:
        return None
    try:
        return load_model(spec).model.to(device).eval()
    except (InputError, OSError):
        return None  # the source moved or went: evaluate without the KL, rather than refuse
