"""`analyze`: per-module sensitivity of a model on a task -> `SensitivityReport` (sensitivity.json).

Stages, each resumable from the ``.partial`` file written after every unit of work:
1. weight quantization error per bits and group layout (no data needed);
2. activation and gradient quantization error, one forward and backward per calibration batch;
2b. with the ``fisher`` / ``output-gradient`` metrics, one forward and backward pass per calibration example
   (for task ``lm``: per window) gives every module's empirical-Fisher weighted error and output-gradient
   score at once (`qanalyze.sensitivity.scores`);
3. per batch, one double-backward graph over the weights of every selected module serves
   all Hessian work on that batch: Hutchinson traces of every module from one global product
   per probe (and, with ``trace_refine_params``, restricted products for small noisy modules),
   then, with the ``eig`` metric, the top eigenvalue of each layer block (Q-BERT) and of each
   module, by Lanczos (or power iteration) on the restriction of that same graph;
4. optional spectral density (SLQ) of the whole weight Hessian on the first batch, and the
   measured loss change of quantizing each module alone, beside the empirical-Fisher prediction
   of that change (sum of diag(F) ⊙ ΔW², from single-example gradients on the same batches).
Weights only: biases and norm shifts are not quantized, so their Hessian blocks are not asked.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from qanalyze.data import TaskData
from qanalyze.distributed import (
    all_reduce_floats,
    broadcast_object,
    gather_objects,
    keyed_generator,
    shard,
    world,
)
from qanalyze.errors import ConfigError
from qanalyze.models import (
    LoadedModel,
    ModuleInfo,
    architecture_fingerprint,
    check_max_length,
    head_dim,
    inventory,
)
from qanalyze.quant.ggml import GGML_TYPES
from qanalyze.quant.layouts import (
    COLUMN_LAYOUTS,
    column_fits,
    column_groups_per_row,
    is_column_layout,
    parse_layout,
    takes_columns,
)
from qanalyze.quant.primitives import (
    check_weight_range,
    fake_quantize,
    module_weight_range,
    rows_per_group,
)
from qanalyze.records import SensitivityReport
from qanalyze.sensitivity.calibration import calibration_batches
from qanalyze.sensitivity.candidates import CandidateSteps
from qanalyze.sensitivity.errors import ErrorProbe, all_weight_errors, reduce_error_sums
from qanalyze.sensitivity.hessian_stage import HessianTargets, measure_hessian
from qanalyze.sensitivity.hvp import PRECISIONS, NonFiniteError, resolve_precision
from qanalyze.sensitivity.scores import SCORE_LABELS, SCORE_METRICS, measure_scores
from qanalyze.sensitivity.sources import EIG_METHODS
from qanalyze.sensitivity.summary import summarise

METRICS = ("eig", "trace", "density", "weights", "activations", "gradients", *SCORE_METRICS)
DEFAULT_METRICS = ("trace", "weights", "activations", "gradients")
"""What `qanalyze plan` needs with its default objective (``trace``): Hutchinson traces and the weight,
activation and gradient errors. Per-module and per-layer eigenvalues (``eig``, Q-BERT's Ω, for
``--objective eig``) are opt-in: on minilm-l6 they took most of an analysis's Hessian products. The one-pass
gradient scores (``fisher``, ``output-gradient``, `qanalyze.sensitivity.scores`) are asked by name."""

LM_DEFAULT_METRICS = ("weights", "fisher")
"""The default metrics of an analysis on task ``lm`` (`qanalyze.verbs.analyze`): what the LM objective, the
Fisher score, reads. On SmolLM2-135M two windows of every default metric took 590 s, 355 s of it the
activation and gradient probes and 62 s the traces; ask for them with ``--metrics``."""

LM_DEFAULT_GROUPS = (*COLUMN_LAYOUTS, *GGML_TYPES)
"""The default group layouts of an analysis on task ``lm`` (`qanalyze.verbs.analyze`): the column groups of LLM
formats (g32, g64, g128, per row; asymmetric, float16 scales), measured at the bits of ``bits`` from 2 to 8, and
llama.cpp's GGML types (Q2_K ... Q8_0, each at its own bits, where its block divides the width), which
``plan --target gguf`` picks from.
Only linear layers take them, so an embedding gets no weight candidate (a column plan keeps it in float)."""

OBJECTIVE_METRICS = {"eig": "eig", "fisher": "fisher", "output-gradient": "output-gradient"}
"""Plan objective -> the metric it reads beyond the defaults (`AnalyzeConfig.for_objective`)."""
ENGINES = ("native", "pyhessian")

Progress = Callable[[str, int, int, str], None]
"""``progress(stage, done, total, detail)``: called as work advances."""


@dataclass(frozen=True)
class AnalyzeConfig:
    """Settings of one analysis; every field but ``modules`` changes numbers and is recorded.

    The defaults measure what `qanalyze plan` reads with its defaults (objective ``trace``): traces from
    one-pass Hutchinson probes, weight, activation and gradient errors. ``trace_refine_params`` > 0
    re-estimates the trace of every module of at most that many weights whose one-pass estimate missed
    ``trace_rel_tol``, from products restricted to it (LayerNorm gains, the token-type table, the head):
    precise, but up to ``trace_max_probes`` products per such module and batch (on minilm-l6, 15 modules:
    about 94 % of a trace-only analysis's products, 476 of 508 per batch), and the default plan keeps
    LayerNorms and the head in float. ``trace_max_probes`` (12) bounds the one-pass probes per batch: on a
    fine-tuned minilm-l6 the cross terms swamp most modules' traces at 32 as at 12 (relative standard errors
    of 0.2 to 50 on one batch), the rule stops none early, and the planner floors an average trace at its
    standard error. The ``hessian_products`` timing counts every product.
    """

    batches: int = 4
    batch_size: int = 16
    max_length: int = 128
    metrics: tuple[str, ...] = DEFAULT_METRICS
    modules: str | None = None
    engine: str = "native"
    eig_method: str = "lanczos"
    eig_tol: float = 1e-3
    eig_max_iter: int = 100
    trace_rel_tol: float = 0.05
    trace_max_probes: int = 12
    trace_min_probes: int = 8
    trace_refine_params: int = 0
    density_steps: int = 40
    bits: tuple[int, ...] = tuple(range(2, 17))
    gradient_bits: tuple[int, ...] = (2, 3, 4, 5, 6, 8, 12, 16)
    # Stochastic roundings of each output gradient per bit-width and batch. The relative error of a large
    # product barely varies between draws (2 against 4 moved minilm-l6's errors above 0.01 by at most 4 %),
    # while each draw costs two GEMMs per module: most of the error stage. Two still show the bias.
    gradient_draws: int = 2
    # The output-gradient score costs one GEMM of a module's input per candidate and pass (a forward's worth
    # of multiplies per candidate), so it is measured at these bits (every group of ``groups``); a plan's
    # other bit widths scale from the nearest of them by the weight errors (`qanalyze.plan.costs`).
    score_bits: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
    # The labels the fisher and output-gradient passes differentiate (`SCORE_LABELS`): drawn from the model's own
    # distribution (the true Fisher, the Hessian of the KL to the unquantized model) or the data's (empirical
    # Fisher). Measured on SmolLM2-135M (49 modules alone at 3 bits, reports/BENCHMARKS.md): Spearman's rho
    # against the KL change 0.96 (fisher) and 0.86 (output-gradient) with sampled labels, 0.73 / 0.75 with the
    # text's (0.77 / 0.77 from twice the windows).
    score_labels: str = "sampled"
    groups: tuple[str, ...] = ("tensor", "channel", "head", "128", "64", "32")
    weight_range: str = "max"
    measure_delta_loss: bool = False
    delta_loss_bits: tuple[int, ...] = (2, 4, 8)
    hvp_method: str = "double_backward"
    hvp_precision: str = "auto"
    unpad: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.metrics) - set(METRICS))
        if unknown or not self.metrics:
            raise ConfigError(f"unknown metric(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(METRICS)}")
        if self.engine not in ENGINES:
            raise ConfigError(f"unknown engine {self.engine!r}; known: {', '.join(ENGINES)}")
        if self.hvp_precision not in ("auto", *PRECISIONS):
            raise ConfigError(f"unknown HVP precision {self.hvp_precision!r}; known: auto, {', '.join(PRECISIONS)}")
        if self.eig_method not in EIG_METHODS:
            raise ConfigError(f"unknown eigenvalue method {self.eig_method!r}; known: {', '.join(EIG_METHODS)}")
        for name in ("batches", "batch_size", "max_length", "eig_max_iter", "trace_max_probes", "density_steps",
                     "gradient_draws"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("eig_tol", "trace_rel_tol"):
            value = getattr(self, name)
            if not value > 0 or value != value or value == float("inf"):
                flag = "--eig-tol" if name == "eig_tol" else "--trace-tol"
                raise ConfigError(f"{flag} must be a positive finite number, got {value}")
        if self.trace_refine_params < 0:
            raise ConfigError(f"trace-refine-params must be at least 0, got {self.trace_refine_params}")
        if not 2 <= self.trace_min_probes <= self.trace_max_probes:
            raise ConfigError("trace probes: need 2 <= min probes <= max probes")
        if self.score_labels not in SCORE_LABELS:
            raise ConfigError(f"unknown score labels {self.score_labels!r}; known: {', '.join(SCORE_LABELS)}")
        if not self.score_bits:
            raise ConfigError("score-bits needs at least one bit width")
        for bits in (*self.bits, *self.gradient_bits, *self.delta_loss_bits, *self.score_bits):
            if not 2 <= bits <= 16:
                raise ConfigError(f"bits must lie in 2..16, got {bits}")
        for group in self.groups:
            parse_layout(group)
        check_weight_range(self.weight_range)
        if self.modules is not None:
            try:
                re.compile(self.modules)
            except re.error as exc:
                raise ConfigError(f"--modules {self.modules!r} is not a regular expression: {exc}") from None

    def for_objective(self, objective: str) -> AnalyzeConfig:
        """These settings plus what plan objective ``objective`` reads: eigenvalues for ``eig``, the one-pass
        scores for ``fisher`` and ``output-gradient`` (`OBJECTIVE_METRICS`), measured loss changes for
        ``measured`` (the defaults measure what ``trace`` needs)."""
        extra = OBJECTIVE_METRICS.get(objective)
        metrics = (*self.metrics, extra) if extra and extra not in self.metrics else self.metrics
        return replace(self, metrics=metrics, measure_delta_loss=self.measure_delta_loss or objective == "measured")

    def recorded(self) -> dict[str, Any]:
        """The settings as written to sensitivity.json (and compared on resume)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class _State:
    """The analysis in progress, mirrored into the ``.partial`` file."""

    report: SensitivityReport
    partial: Path
    started: float = field(default_factory=time.perf_counter)
    writes: bool = True  # rank 0 (or the only process) keeps the partial file; other ranks keep the state only

    def entry(self, name: str) -> dict[str, Any]:
        return self.report.modules[name]

    def done(self, key: str) -> bool:
        return bool(self.report.progress.get(key))

    def mark(self, key: str, value: Any = True) -> None:
        self.report.progress[key] = value
        self.report.timings["seconds"] = self.report.timings.get("seconds", 0.0) + time.perf_counter() - self.started
        self.started = time.perf_counter()
        if self.writes:
            self.report.save(self.partial)


def partial_path(out: str | Path) -> Path:
    """Where a running analysis keeps its progress for ``--resume``."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def select_modules(model: torch.nn.Module, pattern: str | None) -> list[ModuleInfo]:
    """The quantizable modules whose name matches ``pattern`` (all when None); ConfigError if none."""
    return matching_modules(inventory(model), pattern)


def matching_modules(modules: list[ModuleInfo], pattern: str | None) -> list[ModuleInfo]:
    """The ``modules`` whose name matches ``pattern`` (all when None); ConfigError if none."""
    if pattern is None:
        return modules
    regex = re.compile(pattern)
    chosen = [m for m in modules if regex.search(m.name)]
    if not chosen:
        raise ConfigError(f"--modules {pattern!r} matches none of the {len(modules)} quantizable modules "
                          f"(for example {modules[0].name})")
    return chosen


def new_report(loaded: LoadedModel, data: TaskData, config: AnalyzeConfig, infos: list[ModuleInfo],
               all_infos: list[ModuleInfo]) -> SensitivityReport:
    """An empty report of ``config`` on ``infos`` (each module's identity, head size and group counts; no
    measurements yet); ``all_infos``, every quantizable module, give the architecture's fingerprint."""
    model = loaded.model
    modules = {}
    for info in infos:
        entry = info.to_dict()
        entry.pop("name", None)
        size = head_dim(model, info)
        entry["head_dim"] = size
        entry["group_rows"] = _group_rows(info, size, config.groups)
        columns = _column_groups(info, config)
        if columns is not None:
            entry["column_groups"] = columns
        entry["hessian"] = {}
        modules[info.name] = entry
    return SensitivityReport(
        model={**loaded.identity, "fingerprint": architecture_fingerprint(all_infos),
               "architecture": type(model).__name__},
        data={**data.identity, "split": "train", "examples": config.batches * config.batch_size},
        settings=config.recorded(),
        modules=modules,
    )


def _group_rows(info: ModuleInfo, size: int | None, groups: Sequence[str]) -> dict[str, int]:
    rows = {}
    for group in groups:
        if is_column_layout(group):
            continue  # column layouts are counted per row (`_column_groups`)
        try:
            rows[parse_layout(group)] = rows_per_group(info.shape[0], group, head_dim=size)
        except ConfigError:
            continue  # this layout does not fit this weight: not a candidate
    return rows


def module_groups(info: ModuleInfo, groups: Sequence[str]) -> tuple[str, ...]:
    """The layouts of ``groups`` a module is measured at: column layouts only for the kinds that take them
    (`qanalyze.quant.layouts.takes_columns`: linear layers stored (out, in)), every row layout."""
    columns = takes_columns(info.kind, info.transposed)
    return tuple(g for g in groups if columns or not is_column_layout(g))


def _column_groups(info: ModuleInfo, config: AnalyzeConfig) -> dict[str, int] | None:
    """``column_groups`` of sensitivity.json: per column layout measured, its scales (and zero points) per output
    row, what the planner counts a candidate's storage from; None when the module has no column layouts."""
    asked = [parse_layout(g) for g in module_groups(info, config.groups) if is_column_layout(g)]
    if not asked:
        return None
    return {group: column_groups_per_row(group, info.shape[1]) for group in asked
            if any(column_fits(b, group, info.shape[1]) for b in config.bits)}


def _open(loaded: LoadedModel, data: TaskData, config: AnalyzeConfig, out: Path, infos: list[ModuleInfo],
          all_infos: list[ModuleInfo], resume: bool) -> _State:
    partial = partial_path(out)
    if not resume or not partial.exists():
        if resume:
            raise ConfigError(f"nothing to resume: {partial} does not exist")
        return _State(new_report(loaded, data, config, infos, all_infos), partial)
    report = SensitivityReport.load(partial)
    fresh = new_report(loaded, data, config, infos, all_infos)
    if report.settings != fresh.settings:
        changed = [k for k in fresh.settings if report.settings.get(k) != fresh.settings[k]]
        raise ConfigError(f"cannot resume {partial} with different settings: {', '.join(changed)}")
    if report.model.get("fingerprint") != fresh.model["fingerprint"] or \
            report.model.get("weights_hash") != fresh.model.get("weights_hash"):
        raise ConfigError(f"cannot resume {partial}: it was made for another model")
    if report.data.get("hash") != fresh.data.get("hash") or set(report.modules) != set(fresh.modules):
        raise ConfigError(f"cannot resume {partial}: data or module selection differ")
    return _State(report, partial)


def _check_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
    try:
        with torch.no_grad():
            out = model(**batch)
    except TypeError:  # a bare encoder's forward takes no labels
        out = None
    if getattr(out, "loss", None) is None:
        raise ConfigError("the model computes no loss on labelled batches: it has no task head. Fine-tune one "
                          "first (`qanalyze finetune MODEL --task ...`) and analyze the run directory")


def analyze(
    loaded: LoadedModel,
    data: TaskData,
    config: AnalyzeConfig,
    out: str | Path,
    *,
    resume: bool = False,
    progress: Progress | None = None,
) -> SensitivityReport:
    """Measure every selected module's sensitivity and write ``out`` (sensitivity.json) atomically.

    The model must use eager attention (`qanalyze.load_model(..., eager_attention=True)`): the
    fused CPU attention kernel has no double backward. Work done so far is kept in
    ``out + ".partial"``; with ``resume`` it is reused (same settings, model and data required).
    """
    out = Path(out)
    model = loaded.model.eval()
    report_progress = progress or (lambda *_: None)
    all_infos = inventory(model)
    infos = select_modules(model, config.modules)
    device = next(model.parameters()).device
    # on the model's device before the first forward, or a GPU model would meet CPU tensors
    batches = [{k: v.to(device) for k, v in b.items()}
               for b in calibration_batches(data, loaded.tokenizer, config)]
    if getattr(data.task, "kind", None) == "lm":  # a classifier's --max-length is checked by the verb
        check_max_length(model, batches[0]["input_ids"].shape[1], flag="--seq-len")
    # Under torchrun each rank measures its share of the batches; every stage sums over all ranks' shares.
    mine = shard(len(batches), "calibration batches (--batches, times --batch-size for task lm, whose windows "
                               "are batches of one)")
    # Recorded resolved, so a resume on hardware that resolves "auto" otherwise is refused. PyHessian
    # has no precision setting (its products are the parameters' own) and takes the batch padded.
    dtype = next(model.parameters()).dtype
    native = config.engine == "native"
    precision = resolve_precision(config.hvp_precision, device, dtype) if native else "float32"
    config = replace(config, hvp_precision=precision, unpad=config.unpad and native)
    _check_loss(model, batches[0])
    state = _open(loaded, data, config, out, infos, all_infos, resume)
    if world().distributed:  # every rank continues from rank 0's partial file, which only rank 0 writes
        state = _State(broadcast_object(state.report), state.partial, writes=world().is_main)
    modules = dict(model.named_modules())
    metrics = set(config.metrics)

    if "weights" in metrics and not state.done("weights"):
        started = time.perf_counter()
        here = world()
        # each rank its share of the modules (no data in this stage)
        measure_weight_errors(state.report, modules, infos, config, lambda i, _: i % here.size == here.rank,
                              report_progress)
        state.report.timings["weights_seconds"] = time.perf_counter() - started
        state.mark("weights")

    if metrics & {"activations", "gradients"} and not state.done("errors"):
        started = time.perf_counter()
        _measure_errors(model, infos, modules, {i: batches[i] for i in mine}, config, state, report_progress)
        state.report.timings["errors_seconds"] = time.perf_counter() - started
        state.mark("errors")

    if metrics & set(SCORE_METRICS) and not state.done("scores"):
        started = time.perf_counter()
        _measure_scores(model, infos, modules, {i: batches[i] for i in mine}, config, state, report_progress)
        state.report.timings["scores_seconds"] = time.perf_counter() - started
        state.mark("scores")

    if metrics & {"eig", "trace", "density"}:
        measure_hessian(model, HessianTargets.of(infos, modules), batches, config, state, report_progress)
        products = [v for k, v in state.report.timings.items() if k.startswith("hessian_products_batch_")]
        state.report.timings["hessian_products"] = sum(products)

    if config.measure_delta_loss and not state.done("delta_loss"):
        _measure_delta_loss(model, infos, modules, {i: batches[i] for i in mine}, config, state, report_progress)
        state.mark("delta_loss")

    summarise(state.report)
    state.report.complete = True
    state.report.progress = {}
    if state.writes:
        state.report.save(out)
        state.partial.unlink(missing_ok=True)
    return state.report


def measure_weight_errors(report: SensitivityReport, modules: Mapping[str, torch.nn.Module], infos: list[ModuleInfo],
                          config: AnalyzeConfig, mine: Callable[[int, ModuleInfo], bool],
                          report_progress: Progress) -> None:
    """Every module's ``weight_error`` into ``report``: this process measures the modules ``mine(index, info)``
    picks, and the errors of every rank are gathered."""
    measured = {}
    for i, info in enumerate(infos):
        if not mine(i, info):
            continue
        report_progress("weights", i, len(infos), info.name)
        # the same rule the engine gives this module (`apply_plan`)
        weight_range = module_weight_range(info.kind, config.weight_range)
        errors = all_weight_errors(modules[info.name].weight.detach(), config.bits, module_groups(info, config.groups),
                                   head_dim=report.modules[info.name]["head_dim"], weight_range=weight_range)
        measured[info.name] = {str(b): e for b, e in errors.items()}
    for part in gather_objects(measured):
        for name, errors in part.items():
            report.modules[name]["weight_error"] = errors
    report_progress("weights", len(infos), len(infos), "done")


def _measure_errors(model: torch.nn.Module, infos: list[ModuleInfo], modules: dict[str, torch.nn.Module],
                    batches: dict[int, dict[str, torch.Tensor]], config: AnalyzeConfig, state: _State,
                    report_progress: Progress) -> None:
    """Activation and gradient errors from one forward and backward pass per batch of ``batches`` (this rank's,
    by global index), summed over every rank."""
    metrics = set(config.metrics)
    device = next(model.parameters()).device
    generator = keyed_generator(config.seed, "gradient-rounding", device=device)
    probe = ErrorProbe({i.name: modules[i.name] for i in infos}, {i.name: i for i in infos},
                       bits=config.bits if "activations" in metrics else (),
                       gradient_bits=config.gradient_bits if "gradients" in metrics else (),
                       generator=generator, draws=config.gradient_draws)
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(True)
        with probe:
            for done, (index, batch) in enumerate(batches.items()):
                report_progress("activations/gradients", done, len(batches), f"batch {index + 1}")
                # the stochastic roundings of batch i are the same whichever rank measures it
                probe.generator = keyed_generator(config.seed, "gradient-rounding", index, device=device)
                model.zero_grad(set_to_none=True)
                loss = model(**batch).loss
                if not torch.isfinite(loss):
                    raise NonFiniteError(f"the loss on calibration batch {index + 1} is {float(loss)}")
                loss.backward()
                probe.end_batch()
        report_progress("activations/gradients", len(batches), len(batches), "done")
    finally:
        model.zero_grad(set_to_none=True)
        for p, flag in saved:
            p.requires_grad_(flag)
    reduce_error_sums(probe.sums, config.bits, config.gradient_bits)
    for name, sums in probe.sums.items():
        summary = sums.summary()
        if "activations" in metrics:
            for key in ("activation_error", "activation_relative_error", "activation_weighted_error"):
                if summary[key]:
                    state.entry(name)[key] = summary[key]
        if "gradients" in metrics and "gradient_error" in summary:
            state.entry(name)["gradient_error"] = summary["gradient_error"]


def _measure_delta_loss(model: torch.nn.Module, infos: list[ModuleInfo], modules: dict[str, torch.nn.Module],
                        batches: dict[int, dict[str, torch.Tensor]], config: AnalyzeConfig, state: _State,
                        report_progress: Progress) -> None:
    def mean_loss() -> float:
        with torch.no_grad():
            losses = [float(model(**batch).loss) for batch in batches.values()]
        if not world().distributed:
            return statistics.fmean(losses)
        total, count = all_reduce_floats([sum(losses), len(losses)])
        return total / count

    base = mean_loss()
    state.report.model_level["loss"] = base
    fisher = _empirical_fisher(model, infos, modules, batches, report_progress)
    for i, info in enumerate(infos):
        report_progress("delta-loss", i, len(infos), info.name)
        weight = modules[info.name].weight
        original = weight.detach().clone()
        measured = {}
        weight_range = module_weight_range(info.kind, config.weight_range)
        quantized = {bits: fake_quantize(original, bits, rows_per_group=1, weight_range=weight_range)
                     for bits in config.delta_loss_bits}
        try:
            for bits in config.delta_loss_bits:
                with torch.no_grad():
                    weight.copy_(quantized[bits])
                measured[str(bits)] = mean_loss() - base
        finally:
            with torch.no_grad():
                weight.copy_(original)
        delta_loss = state.entry(info.name).setdefault("delta_loss", {})
        delta_loss["measured"] = measured
        delta_loss["fisher"] = {str(bits): float((fisher[info.name] * (quantized[bits] - original) ** 2).sum())
                                for bits in config.delta_loss_bits}
    report_progress("delta-loss", len(infos), len(infos), "done")


def _empirical_fisher(model: torch.nn.Module, infos: list[ModuleInfo], modules: dict[str, torch.nn.Module],
                      batches: dict[int, dict[str, torch.Tensor]] | list[dict[str, torch.Tensor]],
                      report_progress: Progress) -> dict[str, torch.Tensor]:
    """The diagonal of the empirical Fisher, E[g ⊙ g] over single-example gradients, of every weight
    (`qanalyze.sensitivity.scores.measure_scores` without the output-gradient scores), over every rank.
    ``batches``: this rank's, by global index (a list: all of them)."""
    if not isinstance(batches, dict):
        batches = dict(enumerate(batches))
    return measure_scores(model, infos, list(batches.values()), fisher=True, output_steps=None,
                          progress=report_progress, indices=list(batches)).fisher


def candidate_steps(weight: torch.Tensor, info: ModuleInfo, bits: Sequence[int], config: AnalyzeConfig,
                    head_dim: int | None) -> CandidateSteps:
    """``weight``'s quantization steps at ``bits`` in each of the module's measured layouts: the same quantizer and
    range rule as its ``weight_error`` (`all_weight_errors`), which the Fisher and output-gradient scores weigh."""
    return CandidateSteps(weight, bits, module_groups(info, config.groups), head_dim=head_dim,
                          weight_range=module_weight_range(info.kind, config.weight_range))


def fisher_errors(weight: torch.Tensor, info: ModuleInfo, config: AnalyzeConfig, head_dim: int | None,
                  fisher: torch.Tensor) -> dict[str, Any]:
    """``fisher_error`` of sensitivity.json: Σ diag(F) ⊙ ΔW² of ``weight`` at every bits x layout of ``config``."""
    errors = candidate_steps(weight, info, config.bits, config, head_dim).weighted_errors(fisher)
    return {str(b): e for b, e in errors.items()}


def _measure_scores(model: torch.nn.Module, infos: list[ModuleInfo], modules: dict[str, torch.nn.Module],
                    batches: dict[int, dict[str, torch.Tensor]], config: AnalyzeConfig, state: _State,
                    report_progress: Progress) -> None:
    """The one-pass scores from per-example passes: ``fisher_error[bits][group]`` = Σ F ΔW² at every
    ``bits`` x group, ``output_gradient_error[bits][group]`` at every ``score_bits`` x group."""
    metrics = set(config.metrics)
    output_steps = None
    if "output-gradient" in metrics:
        output_steps = {info.name: candidate_steps(modules[info.name].weight, info, config.score_bits, config,
                                                   state.entry(info.name)["head_dim"]) for info in infos}
    device = next(model.parameters()).device
    # The labels of batch i are drawn from a generator keyed by i: the same whichever rank runs it.
    scores = measure_scores(model, infos, list(batches.values()), fisher="fisher" in metrics,
                            output_steps=output_steps, labels=config.score_labels, progress=report_progress,
                            indices=list(batches),
                            generator_for=lambda i: keyed_generator(config.seed, "score-labels", i, device=device))
    state.report.timings["score_passes"] = scores.passes
    for i, info in enumerate(infos):
        entry = state.entry(info.name)
        if scores.fisher is not None:
            report_progress("fisher errors", i, len(infos), info.name)
            entry["fisher_error"] = fisher_errors(modules[info.name].weight, info, config, entry["head_dim"],
                                                  scores.fisher[info.name])
        if info.name in scores.output:
            entry["output_gradient_error"] = scores.output[info.name]


def task_defaults(config: AnalyzeConfig, kind: str) -> AnalyzeConfig:
    """``config`` with the defaults of a task kind where it holds the generic ones: for ``lm`` the metrics the
    LM objective reads (weight errors and the Fisher score, one gradient pass per window: traces and the
    activation/gradient probes cost minutes per window on a 135M-parameter model), the column layouts of LLM
    formats (g32, g64, g128, per row: what `plan` offers for ``lm`` and the PTQ methods run), and the objective
    ``auto`` picks. Other kinds are unchanged."""
    if kind != "lm":
        return config
    from qanalyze.plan.make import resolve_objective

    return lm_defaults(config).for_objective(resolve_objective("auto", kind))


def lm_defaults(config: AnalyzeConfig) -> AnalyzeConfig:
    """``config`` with task ``lm``'s metrics (`LM_DEFAULT_METRICS`) and group layouts (`LM_DEFAULT_GROUPS`) where
    it holds the generic defaults."""
    if config.metrics == DEFAULT_METRICS:
        config = replace(config, metrics=LM_DEFAULT_METRICS)
    if config.groups == AnalyzeConfig().groups:
        config = replace(config, groups=LM_DEFAULT_GROUPS)
    return config
