"""`sweep`: plan and train a model at every budget, with the baselines of equal cost, and collect
the results in ``OUT/sweep.json`` and ``OUT/sweep.csv``.

Layout of ``OUT``::

    fp32.json                 the FP32 model evaluated on the sweep's dev set (the reference line)
    sensitivity.json          made by `analyze` when no sensitivity file is given
    plans/plan-4bit.json      the Hessian plan; plan-4bit.uniform.json, ... its baselines
    plans/uniform-8.int.json  the uniform integer reference plans (and uniform-4.int4.json for --modes int4)
    runs/4bit-hessian-qat/    one run directory per distinct (plan, mode)
    sweep.json, sweep.csv     the collected rows, rewritten after every run

Resumable: a finished run whose plan, mode, settings and data match is reused; an interrupted one
continues from its checkpoint (or restarts when that checkpoint no longer matches). Plans that come
out identical (at 2 bits only the all-2-bit plan fits, so every baseline equals the Hessian plan)
are trained once and share the run.

Under ``torchrun --nproc-per-node N -m qanalyze sweep ...`` the analysis (when the sweep makes one) shards its
batches over the ranks as `analyze` does; then the sweep's independent jobs (the FP32 reference and each distinct
run) are spread over the ranks, each job whole in one process on one rank (`qanalyze.sweep.ranks`), and every rank
builds the rows from the gathered results, which rank 0 alone writes: ``sweep.json`` and ``sweep.csv`` once every
rank is done, the plans before any job. A job's files (``fp32.json``, its run directory) are written by the rank
that ran it, so the ranks must share a file system. The rows are those of one process's sweep: each run is seeded
by its own settings, whichever rank runs it. An interrupted sweep on N ranks resumes on any number of ranks, from
the finished runs and checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qanalyze.bootstrap import paired_difference
from qanalyze.data import TaskData, encode, num_batches
from qanalyze.distributed import barrier, broadcast_object, world
from qanalyze.engine.evaluate import evaluate
from qanalyze.engine.train import CheckpointMismatchError, StepLog, TrainingDiverged, plan_hash, resolve_device, train
from qanalyze.errors import ConfigError
from qanalyze.methods import get_method
from qanalyze.metrics import LOWER_IS_BETTER, better, display_scale
from qanalyze.models import LoadedModel, has_task_head, inventory, load_model
from qanalyze.plan.architecture import check_plan, check_sensitivity
from qanalyze.plan.budget import Budget, parse_budget
from qanalyze.plan.make import (
    AUTO_GROUPS,
    UniformLayout,
    make_plan,
    resolve_objective,
    uniform_layout_plan,
    uniform_layouts,
)
from qanalyze.plan.uniform import uniform_plan
from qanalyze.quant.layouts import COLUMN_LAYOUTS
from qanalyze.records import (
    BitPlan,
    RunRecord,
    SensitivityReport,
    SweepRecord,
    as_json,
    atomic_write_json,
    utc_now,
)
from qanalyze.rundir import METRICS_FILE, checkpoint_dir, is_finished_run, load_predictions, prepare_run_dir
from qanalyze.sensitivity.analyze import analyze, partial_path, task_defaults
from qanalyze.sweep.config import BEST_UNIFORM, SweepConfig, plan_modes, reference_modes
from qanalyze.sweep.ranks import spread
from qanalyze.sweep.table import write_table

FP32_FILE = "fp32.json"
SWEEP_FILE = "sweep.json"
TABLE_FILE = "sweep.csv"


@dataclass(frozen=True)
class SweepRun:
    """One row of the sweep: a plan trained in a mode (``plan`` is hessian, a baseline, or int<N>)."""

    name: str
    budget: str | None
    plan: str
    mode: str
    record: BitPlan
    path: Path

    @property
    def key(self) -> str:
        """Identical module specs in the same mode train identically: one run serves them all."""
        # the group label is left out: "32" on a 32-row weight is one group, the same layout as "tensor"
        training = {name: {k: v for k, v in spec.items() if k not in ("group", "predicted_damage")}
                    for name, spec in self.record.modules.items()}
        text = json.dumps({"modules": training, "mode": self.mode}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class SweepHooks:
    """Callbacks a sweep reports through (the CLI draws progress bars with them); all optional."""

    on_stage: Callable[[str], None] | None = None
    on_run_start: Callable[[int, int, SweepRun], None] | None = None
    on_run_end: Callable[[int, int, SweepRun, dict[str, Any]], None] | None = None
    on_step: Callable[[StepLog], None] | None = None
    on_analysis: Callable[[str, int, int, str], None] | None = None


def _call(hook: Callable[..., None] | None, *args: Any) -> None:
    if hook is not None:
        hook(*args)


def sweep(model: str, data: TaskData, config: SweepConfig, out: str | Path, *,
          sensitivity: str | Path | None = None, hooks: SweepHooks | None = None) -> SweepRecord:
    """Plan ``model`` at every budget of ``config``, train each plan, and return the collected record.

    ``model`` is the FP32 fine-tuned starting point (Q-BERT re-trains from it). Every plan is made
    before any training, so an unreachable budget fails fast. In one process the record is rewritten
    after each run. On several ranks (module docstring) every rank returns it, rank 0 writes it once every
    rank is done, and only rank 0 calls the hooks: the start and end of its own runs as they happen, the
    end of the others' once they are gathered.
    """
    here = world()
    speaker = hooks if hooks is not None and here.is_main else SweepHooks()  # rank 0 alone speaks (qanalyze.launch)
    config = ptq_layouts(config)
    out = Path(out)
    loaded = load_model(model, num_labels=data.task.num_labels)
    if not has_task_head(loaded.model):
        raise ConfigError(f"{model} has no trained {data.task.name} head: a sweep re-trains an FP32 fine-tuned "
                          f"model (qanalyze finetune {model} --task {data.task.name} ... --out RUN, then sweep RUN)")
    source = Path(sensitivity) if sensitivity else out / "sensitivity.json"
    if broadcast_object(not source.exists()):  # rank 0 decides: every rank joins the analysis, or none
        if sensitivity:
            raise ConfigError(f"sensitivity file not found: {sensitivity}")
        _call(speaker.on_stage, f"analyzing {model} into {source}")
        analyze(load_model(model, num_labels=data.task.num_labels, eager_attention=True), data,
                task_defaults(config.analysis, data.task.kind).for_objective(
                    resolve_objective(config.plan.objective, data.task.kind)),
                source, resume=partial_path(source).exists(),
                progress=speaker.on_analysis)
        barrier()  # rank 0 wrote the file the others read next
    _call(speaker.on_stage, "planning")
    report = SensitivityReport.load(source)
    check_sensitivity(report, inventory(loaded.model), loaded.identity, source,
                      objective=resolve_objective(config.plan.objective, data.task.kind))
    runs = _plan_runs(loaded, config, out, report, source)
    first = _first_runs(runs)
    position = {job.name: index for index, job in enumerate(runs)}
    started = time.perf_counter()
    metric = data.task.main_metric
    fp32: dict[str, Any] = {}  # the FP32 line, once this rank has it
    outcomes: dict[str, RunOutcome] = {}
    reported: set[str] = set()  # runs whose end was reported as they finished

    def fp32_reference() -> dict[str, Any]:
        _call(speaker.on_stage, "evaluating the FP32 model")
        fp32.update(_fp32_reference(loaded, data, config, out))
        return dict(fp32)

    def run(job: SweepRun) -> RunOutcome:
        index = position[job.name]
        _call(speaker.on_run_start, index, len(runs), job)
        tic = time.perf_counter()
        result, status = _train_or_reuse(model, data, config, out / "runs" / job.name, job, loaded.identity,
                                         speaker)
        outcome = RunOutcome(result, status, round(time.perf_counter() - tic, 1))
        if fp32:  # in one process and on rank 0, which evaluates the FP32 model before its runs
            _call(speaker.on_run_end, index, len(runs), job, _full_row(job, job, outcome, fp32, metric, out))
            reported.add(job.name)
        return outcome

    if here.distributed:
        distinct = [job for job in runs if first[job.name] is job]
        _call(speaker.on_stage, f"the FP32 reference (rank 0) and {len(distinct)} distinct runs over {here.size} "
                                "ranks")

        def costs() -> list[float]:
            fp32_cost = 0.0 if _cached_fp32(loaded, data, config, out) is not None else EVALUATION_COST
            return [fp32_cost, *(_cost(job, config, data, out, loaded.identity) for job in distinct)]

        done = spread([fp32_reference, *(functools.partial(run, job) for job in distinct)], costs, pinned=1)
        fp32.update(done[0])
        outcomes.update(zip((job.name for job in distinct), done[1:]))
    else:
        fp32_reference()
    record = SweepRecord(model=fp32["model"], data=data.identity, settings=config.recorded(),
                         sensitivity={"path": str(source.resolve()), "sha256": _sha256(source)}, fp32=fp32, rows=[])
    for index, job in enumerate(runs):
        origin = first[job.name]
        if origin.name not in outcomes:  # one process: the run happens now
            outcomes[origin.name] = run(origin)
        row = _full_row(job, origin, outcomes[origin.name], fp32, metric, out)
        record.rows.append(row)
        compare_with_uniform(record.rows, fp32, out, budget=row["budget"], mode=row["mode"])
        record.timings["seconds"] = round(time.perf_counter() - started, 1)
        if here.is_main:
            _save(record, out)
        if job.name not in reported:  # a shared run, or one another rank ran
            _call(speaker.on_run_end, index, len(runs), job, row)
    record.complete = True
    if here.is_main:
        _save(record, out)
    return record


def _full_row(job: SweepRun, origin: SweepRun, outcome: RunOutcome, fp32: dict[str, Any], metric: str,
              out: Path) -> dict[str, Any]:
    """``job``'s row, from the outcome of ``origin`` (``job`` itself, or the first run of the same key)."""
    row = _row(job, outcome.result, out)
    if origin is job:
        row.update(status=outcome.status, seconds=outcome.seconds)
    else:
        row.update(status="same as " + _row(origin, None, out)["run"], seconds=0.0)
    row.update(_against_fp32(row, fp32, metric))
    return row


@dataclass(frozen=True)
class RunOutcome:
    """What one distinct run gave: its record (None when its training diverged), how it came about
    (``trained``, ``reused``, ``resumed``, ``quantized``, ``diverged: ...``) and its seconds."""

    result: RunRecord | None
    status: str
    seconds: float


def _first_runs(runs: list[SweepRun]) -> dict[str, SweepRun]:
    """Each run's name -> the first run with its `SweepRun.key` (itself for a distinct run): only that one runs,
    the others share its result."""
    firsts: dict[str, SweepRun] = {}
    for job in runs:
        firsts.setdefault(job.key, job)
    return {job.name: firsts[job.key] for job in runs}


EVALUATION_COST = 1.0
"""What `balance` counts for a job that only evaluates (the FP32 reference, a post-training method's run); a
training run counts one more per training step."""


def _cost(job: SweepRun, config: SweepConfig, data: TaskData, out: Path, identity: dict[str, Any]) -> float:
    """A rough cost of ``job`` for `qanalyze.sweep.ranks.balance`: nothing for a finished run the sweep will
    reuse, else `EVALUATION_COST` plus its training steps (an ``lm`` split's windows are not counted before they
    are tokenized: one step per epoch stands for them, the same for every run of the sweep)."""
    if _reusable(out / "runs" / job.name, job, config, data, identity) is not None:
        return 0.0
    if not get_method(job.mode).trains:
        return EVALUATION_COST
    train = config.train
    per_epoch = num_batches(len(data.train), train.batch_size) if isinstance(data.train, list) else 1
    return EVALUATION_COST + (train.max_steps or train.epochs * per_epoch)


def ptq_layouts(config: SweepConfig) -> SweepConfig:
    """A sweep whose modes are all post-training quantizers (``rtn``, ``gptq``) plans column layouts: ``auto``
    groups become `COLUMN_LAYOUTS` (on task ``lm`` they are already), and the analysis measures them too."""
    if config.plan.groups != (AUTO_GROUPS,) or not all(get_method(m).command == "quantize" for m in config.modes):
        return config
    groups = tuple(dict.fromkeys((*config.analysis.groups, *COLUMN_LAYOUTS)))
    return dataclasses.replace(config, plan=dataclasses.replace(config.plan, groups=COLUMN_LAYOUTS),
                               analysis=dataclasses.replace(config.analysis, groups=groups))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fp32_reference(loaded: LoadedModel, data: TaskData, config: SweepConfig, out: Path) -> dict[str, Any]:
    """The starting model's own dev metrics (the FP32 line), cached in ``fp32.json`` by model and data."""
    cached = _cached_fp32(loaded, data, config, out)
    if cached is not None:
        return cached
    params = sum(math.prod(info.shape) for info in inventory(loaded.model))
    loaded.model.to(resolve_device(config.train.device))
    result = evaluate(loaded.model, loaded.tokenizer, encode(data.dev, loaded.tokenizer,
                                                             max_length=config.train.max_length),
                      data.task, batch_size=config.train.eval_batch_size)
    fp32 = {"key": _fp32_key(loaded, data, config), "model": loaded.identity, "metrics": result.metrics,
            "loss": result.loss, "examples": result.examples, "seconds": round(result.seconds, 3),
            "weight_bytes": 4 * params, "created": utc_now()}
    atomic_write_json(out / FP32_FILE, fp32)
    return fp32


def _fp32_key(loaded: LoadedModel, data: TaskData, config: SweepConfig) -> dict[str, Any]:
    return {"model": loaded.identity, "data_hash": data.identity.get("hash"), "max_length": config.train.max_length}


def _cached_fp32(loaded: LoadedModel, data: TaskData, config: SweepConfig, out: Path) -> dict[str, Any] | None:
    """``fp32.json`` when it was made for this model, data and length."""
    path = out / FP32_FILE
    if path.exists():
        cached = json.loads(path.read_text(encoding="utf-8"))
        if cached.get("key") == _fp32_key(loaded, data, config):
            return cached
    return None


def _plan_runs(loaded: LoadedModel, config: SweepConfig, out: Path, report: SensitivityReport,
               source: Path) -> list[SweepRun]:
    """Every run of the sweep with its plan; the plans are written (by rank 0) only once all of them could be
    made."""
    architecture = {info.name: list(info.shape) for info in inventory(loaded.model)}
    plans = out / "plans"
    runs = []
    per_plan = [mode for mode in config.modes if mode in plan_modes()]
    layouts = uniform_layouts(report, config.plan) if BEST_UNIFORM in config.plans else []
    for budget in config.budgets:
        parsed = parse_budget(budget)
        for kind in config.plans:
            if kind == BEST_UNIFORM:
                capacity = make_plan(report, parsed, config.plan, sensitivity_path=source).totals["weight_bytes"]
                for layout in uniform_candidates(layouts, capacity, parsed):
                    record = uniform_layout_plan(report, layout.bits, layout.group, config.plan,
                                                 sensitivity_path=source)
                    check_plan(record, architecture)
                    label = f"u{layout.bits}{layout.group}"
                    runs += [SweepRun(f"{budget}-{label}-{mode}", budget, kind, mode, record,
                                      plans / f"plan-{budget}.{label}.json") for mode in per_plan]
                continue
            baseline = None if kind == "hessian" else kind
            record = make_plan(report, parsed, config.plan, sensitivity_path=source, baseline=baseline)
            check_plan(record, architecture)
            stem = f"plan-{budget}" + (f".{kind}" if baseline else "")
            runs += [SweepRun(f"{budget}-{kind}-{mode}", budget, kind, mode, record, plans / f"{stem}.json")
                     for mode in per_plan]
    kinds = get_method("int").module_kinds
    for bits in config.integer_bits:
        record = uniform_plan(loaded.model, bits, kinds=kinds)
        runs.append(SweepRun(f"uniform{bits}-int", None, f"int{bits}", "int", record,
                             plans / f"uniform-{bits}.int.json"))
    for mode, bits in reference_modes().items():
        if mode in config.modes:
            record = uniform_plan(loaded.model, bits, kinds=get_method(mode).module_kinds)
            runs.append(SweepRun(f"uniform{bits}-{mode}", None, mode, mode, record,
                                 plans / f"uniform-{bits}.{mode}.json"))
    if world().is_main:
        for run in runs:
            run.record.save(run.path)
    return runs


UNIFORM_BITS_KEPT = 2
"""How many bit widths `uniform_candidates` runs at or under a budget (the highest ones)."""


def uniform_candidates(layouts: list[UniformLayout], limit_bytes: float, budget: Budget) -> list[UniformLayout]:
    """The uniform configurations a sweep runs at one budget: for each of the `UNIFORM_BITS_KEPT` highest bit
    widths that fit, the finest layout whose bytes are at most ``limit_bytes`` (the Hessian plan's; at equal bits
    a finer layout costs more and rounds less, and fewer bits lose more than any layout wins back), and the
    cheapest configuration above it, the nearest uniform plan of equal or larger size. Each is one run per mode."""
    under: dict[int, UniformLayout] = {}
    for layout in layouts:
        if layout.weight_bytes <= limit_bytes and (
                layout.bits not in under or layout.weight_bytes > under[layout.bits].weight_bytes):
            under[layout.bits] = layout
    chosen = [under[bits] for bits in sorted(under)[-UNIFORM_BITS_KEPT:]]
    above = [layout for layout in layouts if layout.weight_bytes > limit_bytes]
    if above:
        chosen.append(min(above, key=lambda layout: layout.weight_bytes))
    if not chosen:
        raise ConfigError(f"no uniform configuration exists at budget {budget.text}")
    return chosen


def _matches(record: RunRecord, run: SweepRun, config: SweepConfig, data: TaskData,
             identity: dict[str, Any]) -> bool:
    saved = record.settings
    same_settings = all(saved.get(k) == v for k, v in config.train.numbers().items())
    # compared as JSON holds them: a tuple setting comes back from metrics.json as a list
    method_config = config.method_config(run.mode)
    recorded = as_json(get_method(run.mode).recorded(method_config))
    same_mode_settings = all(saved.get(k) == v for k, v in recorded.items())
    wanted = set(get_method(run.mode).evaluated_variants(method_config))
    if wanted:  # a run evaluated at other variants (qdylora ranks) lacks some points of their curve
        same_mode_settings = same_mode_settings and set(record.rank_metrics) == wanted
    return (record.mode == run.mode and same_settings and same_mode_settings
            and record.data.get("hash") == data.identity.get("hash")
            and saved.get("plan", {}).get("sha256") == plan_hash(run.record)
            and record.model.get("weights_hash") == identity.get("weights_hash"))


def _reusable(folder: Path, run: SweepRun, config: SweepConfig, data: TaskData,
              identity: dict[str, Any]) -> RunRecord | None:
    """The finished run in ``folder`` when it was made with ``run``'s plan, mode, settings and data (the sweep
    reuses it), else None."""
    if is_finished_run(folder):
        previous = RunRecord.load(folder / METRICS_FILE)
        if _matches(previous, run, config, data, identity):
            return previous
    return None


def _train_or_reuse(model: str, data: TaskData, config: SweepConfig, folder: Path, run: SweepRun,
                    identity: dict[str, Any], hooks: SweepHooks) -> tuple[RunRecord | None, str]:
    previous = _reusable(folder, run, config, data, identity)
    if previous is not None:
        return previous, "reused"

    def attempt(resume: bool) -> RunRecord:
        loaded = load_model(model, num_labels=data.task.num_labels)
        prepare_run_dir(folder, overwrite=not resume, resume=resume)
        return train(loaded, data, config.train, folder, resume=resume, on_step=hooks.on_step,
                     plan=run.record, mode=run.mode, plan_source=str(run.path.resolve()),
                     method_config=config.method_config(run.mode))

    try:
        if checkpoint_dir(folder) is not None and not is_finished_run(folder):
            try:
                return attempt(resume=True), "resumed"
            except CheckpointMismatchError:
                pass  # the checkpoint was made with other settings or another plan: start over
        return attempt(resume=False), "trained" if get_method(run.mode).trains else "quantized"
    except TrainingDiverged as exc:
        # a plan too aggressive to train is a finding for the table, not the end of the sweep
        return None, f"diverged: {' '.join(str(exc).split())}"


def _row(run: SweepRun, result: RunRecord | None, out: Path) -> dict[str, Any]:
    totals = run.record.totals
    return {
        "budget": run.budget, "plan": run.plan, "mode": run.mode,
        "run": str((out / "runs" / run.name).relative_to(out)), "plan_file": str(run.path.relative_to(out)),
        "weight_bits_mean": totals.get("weight_bits_mean"),
        "weight_bits_mean_all_scales": totals.get("weight_bits_mean_all_scales"),
        "weight_bytes": totals.get("weight_bytes"), "compression": totals.get("compression"),
        "predicted_damage": totals.get("predicted_damage"),
        "activation_bits_mean": totals.get("activation_bits_mean"),
        "gradient_bits_mean": totals.get("gradient_bits_mean"),
        "metrics": dict(result.metrics) if result is not None else {},
        "rank_metrics": dict(result.rank_metrics) if result is not None and result.rank_metrics else {},
        "rank_parameters": dict(result.rank_parameters) if result is not None and result.rank_parameters else {},
        "layout": run.record.budget.get("text") if run.plan == BEST_UNIFORM else None,
        "intervals": dict(result.intervals) if result is not None and result.intervals else {},
        "train_seconds": result.timings.get("train_seconds") if result is not None else None,
        "step_seconds_median": result.timings.get("step_seconds_median") if result is not None else None,
    }


def _against_fp32(row: dict[str, Any], fp32: dict[str, Any], metric: str) -> dict[str, Any]:
    value, reference = row["metrics"].get(metric), fp32["metrics"].get(metric)
    # points for rates and correlations, a perplexity's own units (display_scale)
    delta = None if value is None or reference is None else round(display_scale(metric) * (value - reference), 4)
    return {"metric": metric, "value": value, "delta_pts": delta}


def compare_with_uniform(rows: list[dict[str, Any]], fp32: dict[str, Any], out: Path, *, budget: str | None,
                         mode: str) -> None:
    """Mark, per budget and mode, the best of the ``best-uniform`` rows whose bytes are at most the Hessian plan's
    (``best: true``), and give the Hessian row ``vs_best_uniform``: that row's run and value, and for the
    ``lm`` task the ratio of the two plans' gaps to FP32 (``gap_ratio`` < 1: the Hessian plan is closer), for a
    classification task the paired bootstrap difference of the metric over the dev examples (`paired_difference`)
    with its 95 % interval and whether it excludes zero. Also ``vs_uniform_at_or_above``: the same against the
    best uniform row of equal or larger size than the Hessian plan's.

    Only the rows of ``budget`` and ``mode`` (those of the run just added) are compared again: the paired test
    reads two prediction files per comparison."""
    group = [r for r in rows if r["budget"] == budget and r["mode"] == mode]
    for row in group:
        row.pop("best", None)
    for hessian in (r for r in group if r["plan"] == "hessian"):
        peers = [r for r in group if r["plan"] == BEST_UNIFORM and r.get("value") is not None]
        metric = hessian["metric"]
        smaller = [r for r in peers if r["weight_bytes"] <= hessian["weight_bytes"]]
        larger = [r for r in peers if r["weight_bytes"] >= hessian["weight_bytes"]]
        for key, group in (("vs_best_uniform", smaller), ("vs_uniform_at_or_above", larger)):
            best = None
            for peer in group:
                if best is None or better(metric, peer["value"], best["value"]):
                    best = peer
            if key == "vs_best_uniform" and best is not None:
                best["best"] = True
            hessian[key] = None if best is None or hessian.get("value") is None else _versus(
                hessian, best, fp32, out)


def _versus(row: dict[str, Any], other: dict[str, Any], fp32: dict[str, Any], out: Path) -> dict[str, Any]:
    metric = row["metric"]
    found: dict[str, Any] = {"run": other["run"], "layout": other.get("layout"), "value": other["value"],
                             "weight_bytes": other["weight_bytes"]}
    reference = fp32.get("metrics", {}).get(metric)
    if metric in LOWER_IS_BETTER and reference is not None:
        gap, other_gap = row["value"] - reference, other["value"] - reference
        found["gap_ratio"] = gap / other_gap if other_gap > 0 else None
    mine, theirs = load_predictions(out / row["run"]), load_predictions(out / other["run"])
    if mine is not None and theirs is not None and np.array_equal(mine[1], theirs[1]):
        found["paired"] = paired_difference(metric, mine[0], theirs[0], mine[1]).to_dict()
    return found


def _save(record: SweepRecord, out: Path) -> None:
    record.save(out / SWEEP_FILE)
    write_table(record, out / TABLE_FILE)
