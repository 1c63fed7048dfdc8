"""The library verbs the command line calls, one per command: each takes typed settings, does the whole
stage (loading, validation before anything is written, the work, the records) and returns a record.

The CLI only parses options, calls one of these and prints what comes back, so everything it can do
a Python caller can do the same way::

    import qanalyze
    data = qanalyze.load_task("sst2", "../shared/data/glue", max_train_examples=2000)
    run = qanalyze.train("minilm-l6", data, qanalyze.TrainConfig(epochs=1), "runs/fp32")
    plans = qanalyze.plan_for("runs/fp32", "4bit", qanalyze.PlanConfig(), "runs/plan-4bit.json", data=data)
    qanalyze.train("runs/fp32", data, qanalyze.TrainConfig(epochs=1), "runs/int4", mode="int", plan=plans[0])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qanalyze.errors import ConfigError, RecordError

if TYPE_CHECKING:
    from qanalyze.data import TaskData
    from qanalyze.engine.evaluate import EvalResult
    from qanalyze.engine.train import StepLog, TrainConfig
    from qanalyze.export.base import ExportRecord
    from qanalyze.methods import MethodConfig
    from qanalyze.models import LoadedModel
    from qanalyze.plan.make import PlanConfig
    from qanalyze.records import BitPlan, EvalRecord, RunRecord
    from qanalyze.report.html import ReportResult
    from qanalyze.report.inputs import ReportInputs
    from qanalyze.sensitivity.analyze import AnalyzeConfig


def seed_everything(seed: int) -> None:
    """Seed the global generator: a new task head is initialised from it, so ``seed`` reproduces it."""
    import torch

    torch.manual_seed(seed)


def _check_input_length(model: Any, data: TaskData, max_length: int) -> None:
    """Refuse inputs longer than ``model``'s positions before any work: the ``lm`` task's windows
    (``--seq-len``; ``max_length`` does not apply to them), else ``max_length``."""
    from qanalyze.lm_data import LMText
    from qanalyze.models import check_max_length

    if isinstance(data.train, LMText):
        check_max_length(model, data.train.seq_len, flag="--seq-len")
    else:
        check_max_length(model, max_length)


def train(model: str | LoadedModel, data: TaskData, config: TrainConfig, out: str | Path, *, mode: str = "fp32",
          plan: str | BitPlan | None = None, method_config: MethodConfig | None = None, resume: bool = False,
          overwrite: bool = False, on_step: Callable[[StepLog], None] | None = None,
          on_eval: Callable[[int, EvalResult], None] | None = None,
          on_prepare: Callable[[str, int, int, str], None] | None = None) -> RunRecord:
    """Train ``model`` on ``data`` with method ``mode`` into the run directory ``out``, which it makes.

    ``plan`` is a `BitPlan`, a plan.json path or ``uniform:N[:LAYOUT]`` (the method's module kinds).
    Everything that can be refused (the output folder, the plan against the architecture and the
    method, the method's settings) is refused before the folder is touched.

    Under ``torchrun`` the ranks share each global batch of ``config.batch_size`` examples, which must be a
    multiple of the number of ranks (`qanalyze.engine.data_parallel`); rank 0 makes and writes ``out``.
    """
    from qanalyze.distributed import barrier, world
    from qanalyze.engine.data_parallel import check_batch_size
    from qanalyze.engine.kernels import forced_kernel
    from qanalyze.engine.train import train as run_loop
    from qanalyze.methods import get_method
    from qanalyze.models import load_model
    from qanalyze.plan.uniform import resolve_plan
    from qanalyze.records import BitPlan
    from qanalyze.rundir import check_free_space, check_run_dir, prepare_run_dir

    method = get_method(mode)
    method_config = method_config if method_config is not None else method.make_config()
    if method.trains:
        check_batch_size(config.batch_size)
    forced_kernel()  # a bad QANALYZE_KERNEL is refused before the run directory is made, not by apply_plan inside it
    check_run_dir(out, overwrite=overwrite, resume=resume)
    seed_everything(config.seed)
    loaded = load_model(model, num_labels=data.task.num_labels) if isinstance(model, str) else model
    # recorded resolved, so that a run's record does not depend on the folder the command ran in
    source = None if plan is None or isinstance(plan, BitPlan) else (
        plan if plan.startswith("uniform:") else str(Path(plan).resolve()))
    _check_input_length(loaded.model, data, config.max_length)
    # The saved model, and during a checkpoint's swap two checkpoints of weights and two Adam moments.
    check_free_space(out, 28 * sum(p.numel() for p in loaded.model.parameters()), "the model and its checkpoints")
    if isinstance(plan, str):
        plan = resolve_plan(plan, loaded.model, kinds=method.module_kinds,
                            partial_last=bool(getattr(method_config, "partial_groups", False)))
    method.check(loaded.model, plan, method_config)  # before the run directory is made: bad input leaves nothing
    # Under torchrun every rank has checked `out` before rank 0 makes (or empties) it, and reads a resumed
    # run's checkpoint only after that.
    barrier()
    run = prepare_run_dir(out, overwrite=overwrite, resume=resume) if world().is_main else Path(out)
    barrier()
    return run_loop(loaded, data, config, run, resume=resume, on_step=on_step, on_eval=on_eval, plan=plan,
                    mode=mode, plan_source=source, method_config=method_config, on_prepare=on_prepare)


def quantize(model: str | LoadedModel, data: TaskData, plan: str | BitPlan, out: str | Path, *, method: str = "gptq",
             method_config: MethodConfig | None = None, overwrite: bool = False, device: str = "auto",
             eval_batch_size: int = 64, seed: int = 0,
             on_eval: Callable[[int, EvalResult], None] | None = None,
             progress: Callable[[str, int, int, str], None] | None = None) -> RunRecord:
    """Post-training weight quantization of ``model`` by ``method`` (``rtn``, ``gptq``: a method whose command
    is ``quantize``) at the bits and column groups of ``plan`` (a `BitPlan`, a plan.json path or
    ``uniform:N:gG``), evaluated on ``data``'s evaluation split and written as a packed run directory ``out``
    that `evaluate_run` reloads. GPTQ calibrates on ``data``'s training split.

    Nothing is trained, so nothing can be resumed: an interrupted or failed quantization removes the run
    directory it made or emptied (an existing run is replaced only with ``overwrite``); input refused before
    that leaves ``out`` as it was.
    """
    import shutil

    from qanalyze.distributed import barrier, private_output
    from qanalyze.engine.train import TrainConfig
    from qanalyze.methods import METHODS, get_method
    from qanalyze.rundir import is_finished_run

    chosen = get_method(method)
    if chosen.command != "quantize":
        quantizers = [name for name, m in METHODS.items() if m.command == "quantize"]
        raise ConfigError(f"{method} is not a post-training quantizer (known: {', '.join(quantizers)}); "
                          f"`qanalyze train --mode {method}` runs it")
    # Under torchrun: every rank has checked --out before rank 0 makes it, and the other ranks, which calibrate
    # their share of the windows, write their (identical) run into a scratch folder that is then removed.
    barrier()
    with private_output(out) as out:
        target = Path(out)
        before = sorted(target.iterdir()) if target.is_dir() else None
        config = TrainConfig(epochs=1, seed=seed, device=device, eval_batch_size=eval_batch_size)
        try:
            return train(model, data, config, out, mode=method, plan=plan, method_config=method_config,
                         overwrite=overwrite, on_eval=on_eval, on_prepare=progress)
        except BaseException:
            # A half-made PTQ run is worth nothing (no checkpoint to resume): once the run directory was made (or
            # emptied by --overwrite), remove what is there; input refused before that leaves the folder as it was.
            if target.is_dir() and not is_finished_run(target) and sorted(target.iterdir()) != before:
                shutil.rmtree(target, ignore_errors=True)
                if before == []:
                    target.mkdir()
            raise


def analyze(model: str, data: TaskData, config: AnalyzeConfig, out: str | Path, *, resume: bool = False,
            overwrite: bool = False, device: str = "auto", pipeline: bool = False,
            progress: Callable[[str, int, int, str], None] | None = None) -> Any:
    """Measure the sensitivity of ``model`` (which needs a trained task head) into ``out``; return the
    `SensitivityReport`. With ``pipeline``, a causal LM split by decoder layers over torchrun's ranks
    (`qanalyze.sensitivity.pipelined_analysis`)."""
    from qanalyze.engine.train import resolve_device
    from qanalyze.models import has_task_head, load_model
    from qanalyze.rundir import check_output_file
    from qanalyze.sensitivity.analyze import analyze as run_analysis
    from qanalyze.sensitivity.analyze import task_defaults

    check_output_file(out, inputs=(model,), overwrite=overwrite or resume)  # resume writes OUT from OUT.partial
    seed_everything(config.seed)
    if pipeline:
        return _analyze_pipelined(model, data, config, out, resume=resume, device=device, progress=progress)
    loaded = load_model(model, num_labels=data.task.num_labels, eager_attention=True)
    _check_input_length(loaded.model, data, config.max_length)
    config = task_defaults(config, data.task.kind)
    if not has_task_head(loaded.model):
        raise ConfigError(f"{model} has no trained {data.task.name} head, so its loss means nothing; fine-tune "
                          f"one first (qanalyze finetune {model} --task {data.task.name} --data ... --out RUN) "
                          "and analyze RUN")
    loaded.model.to(resolve_device(device))
    return run_analysis(loaded, data, config, out, resume=resume, progress=progress)


def _analyze_pipelined(model: str, data: TaskData, config: AnalyzeConfig, out: str | Path, *, resume: bool,
                       device: str, progress: Callable[[str, int, int, str], None] | None) -> Any:
    from qanalyze.sensitivity.analyze import lm_defaults
    from qanalyze.sensitivity.pipelined_analysis import analyze_pipelined

    if resume:
        raise ConfigError("--pipeline keeps no partial file to resume: run it again without --resume")
    if device not in ("auto", "cpu"):
        raise ConfigError(f"--pipeline runs on the CPU (gloo); --device {device} is not taken")
    # what one process measures for lm (another task is refused by name by the pipelined analysis)
    return analyze_pipelined(model, data, lm_defaults(config), out, progress=progress)


def baseline_path(out: str | Path, name: str) -> Path:
    """Where ``plan_for`` writes baseline ``name`` beside ``out`` (plan-4bit.uniform.json)."""
    path = Path(out)
    return path.with_name(f"{path.stem}.{name}{path.suffix}")


def plan_for(model: str, budget: str, config: PlanConfig, out: str | Path, *, sensitivity: str | Path | None = None,
             baselines: bool = False, overwrite: bool = False, data: TaskData | None = None, any_weights: bool = False,
             analysis: AnalyzeConfig | None = None,
             progress: Callable[[str, int, int, str], None] | None = None) -> list[BitPlan]:
    """Plan ``model`` at ``budget`` into ``out`` (and, with ``baselines``, the uniform, random and reversed
    plans of equal cost beside it); return the plans, the Hessian one first.

    The sensitivity file defaults to ``sensitivity.json`` beside ``out``; when it is missing it is made
    first by `analyze` with ``analysis`` (the analysis defaults when None) on ``data``. Each plan is
    checked against the model's architecture before any is written; the sensitivity file is checked
    against the model first (`qanalyze.plan.architecture.check_sensitivity`: complete, this architecture,
    these weights unless ``any_weights``, every module, finite numbers).
    """
    from qanalyze.models import inventory, load_model
    from qanalyze.plan.architecture import check_plan, check_sensitivity
    from qanalyze.plan.budget import parse_budget
    from qanalyze.plan.make import BASELINES, make_plan, resolve_objective, task_kind
    from qanalyze.records import SensitivityReport
    from qanalyze.rundir import check_output_file
    from qanalyze.sensitivity.analyze import AnalyzeConfig, partial_path
    from qanalyze.tasks import get_task

    parsed = parse_budget(budget)
    targets = [Path(out)] + ([baseline_path(out, name) for name in BASELINES] if baselines else [])
    source = Path(sensitivity) if sensitivity else Path(out).parent / "sensitivity.json"
    for target in targets:
        check_output_file(target, inputs=(source, model), overwrite=overwrite)
    if not source.exists():
        if sensitivity:
            raise RecordError(f"sensitivity file not found: {sensitivity}")
        if data is None:
            raise ConfigError(f"no sensitivity file at {source}: pass --sensitivity FILE, or --task and --data to "
                              "analyze the model first")
        objective = resolve_objective(config.objective, data.task.kind)
        analysis = (analysis or AnalyzeConfig(seed=config.seed)).for_objective(objective)
        analyze(model, data, analysis, source, resume=partial_path(source).exists(), progress=progress)
    report = SensitivityReport.load(source)
    task = report.data.get("task")
    kind = task_kind(report.data)
    loaded = load_model(model, num_labels=get_task(task).num_labels if task and kind != "lm" else None)
    infos = inventory(loaded.model)
    check_sensitivity(report, infos, loaded.identity, source, objective=resolve_objective(config.objective, kind),
                      any_weights=any_weights)
    shapes = {info.name: list(info.shape) for info in infos}
    made = [make_plan(report, parsed, config, sensitivity_path=source)]
    if baselines:
        made += [make_plan(report, parsed, config, sensitivity_path=source, baseline=name) for name in BASELINES]
    for plan in made:
        check_plan(plan, shapes)
    for plan, target in zip(made, targets):
        plan.save(target)
    return made


@dataclass
class Evaluation:
    """What `evaluate_run` measured: the record written (or that would be written) and whether the
    model was evaluated from a quantized run's own weights."""

    record: EvalRecord
    quantized: bool
    has_head: bool = True
    path: Path | None = None
    variants: dict[str, dict[str, float]] = field(default_factory=dict)


def evaluate_run(model_or_run: str, *, task: str | None = None, data: str | None = None, split: str = "dev",
                 batch_size: int = 64, device: str = "auto", max_length: int | None = None,
                 max_train_examples: int | None = None, max_eval_examples: int | None = None, seed: int = 0,
                 ranks: Sequence[int] = (), out: str | Path | None = None, lm_seq_len: int | None = None,
                 text_field: str | None = None) -> Evaluation:
    """Evaluate a model or a finished run on a task and write an eval record.

    A run directory is reloaded by the method that made it (`qanalyze.methods.Method.load_run`: a
    quantized run from its packed integer weights, with the integer kernels); its task, data and
    max length are the defaults. ``ranks`` evaluates a qdylora run's adapters cut at each rank too.
    The record goes to ``out``, or to ``eval-<task>-<split>.json`` inside a run directory. A post-training
    run of the ``lm`` task is also compared with the model it was quantized from (KL divergence and top-1
    agreement), when that model can still be loaded.
    """
    from qanalyze.data import encode, load_task
    from qanalyze.engine.evaluate import evaluate
    from qanalyze.engine.train import resolve_device
    from qanalyze.methods import get_method
    from qanalyze.models import has_task_head, load_model
    from qanalyze.records import EvalRecord, RunRecord
    from qanalyze.rundir import METRICS_FILE, check_writable, is_finished_run
    from qanalyze.tasks import get_task

    run = Path(model_or_run)
    previous = RunRecord.load(run / METRICS_FILE) if is_finished_run(run) else None
    if previous is not None:
        if task and task != previous.task:
            raise ConfigError(f"{run} was trained on {previous.task}: its head answers {previous.task}, not {task}; "
                              f"leave out --task (or evaluate another run)")
        task = task or previous.task
        data = data or previous.data.get("location") or previous.data.get("source")
        max_length = max_length or previous.settings.get("max_length")
        lm_seq_len = lm_seq_len or previous.data.get("seq_len")  # task lm: the run's own windows
        max_eval_examples = max_eval_examples or previous.data.get("max_eval_windows")
        text_field = text_field or previous.data.get("text_field")
    if not task or not data:
        missing = [flag for flag, value in (("--task", task), ("--data", data)) if not value]
        raise ConfigError(f"missing option {' and '.join(missing)}")
    if ranks and (previous is None or get_method(previous.mode).variants != "rank"):
        raise ConfigError("--ranks applies to qdylora runs only")
    path = Path(out) if out else (run / f"eval-{get_task(task).name}-{split}.json" if previous else None)
    if path is not None:
        check_writable(path)  # before the evaluation, not after it
    task_data = load_task(task, data, max_train_examples=max_train_examples, max_eval_examples=max_eval_examples,
                          seed=seed, seq_len=lm_seq_len, text_field=text_field)
    seed_everything(seed)
    target = resolve_device(device)
    if previous is not None:
        loaded_run = get_method(previous.mode).load_run(run, target, task_data.task.num_labels)
        model, tokenizer, quantized = loaded_run.model, loaded_run.tokenizer, loaded_run.quantized
        identity = {**previous.model, "run": str(run.resolve()), "mode": previous.mode}
    else:
        loaded_run = None
        loaded = load_model(model_or_run, num_labels=task_data.task.num_labels)
        model, tokenizer, quantized, identity = loaded.model, loaded.tokenizer, False, loaded.identity
    model.to(target)
    examples = task_data.dev if split == "dev" else task_data.train
    encoded = encode(examples, tokenizer, max_length=max_length or 128)
    reference = loaded_run.reference if loaded_run is not None else None
    if reference is not None:
        reference.to(target)
    result = evaluate(model, tokenizer, encoded, task_data.task, batch_size=batch_size, reference=reference)
    variants: dict[str, dict[str, float]] = {}
    for rank in ranks:
        assert loaded_run is not None
        loaded_run.at_variant(str(rank))
        variants[str(rank)] = evaluate(model, tokenizer, encoded, task_data.task, batch_size=batch_size).metrics
    record = EvalRecord(task=task_data.task.name, split=split, model=identity, data=task_data.identity,
                        metrics=result.metrics, loss=result.loss, examples=result.examples, rank_metrics=variants,
                        settings={"max_length": max_length or 128, "batch_size": batch_size, "seed": seed},
                        timings={"eval_seconds": round(result.seconds, 3)})
    if path is not None:
        record.save(path)
    return Evaluation(record=record, quantized=quantized, has_head=quantized or has_task_head(model), path=path,
                      variants=variants)


def render_report(inputs: Sequence[str | Path] | ReportInputs, out: str | Path, *, png: bool = True,
                  progress: Callable[[int, int, str], None] | None = None) -> ReportResult:
    """Collect the records ``inputs`` hold (sweep folders, sensitivity and plan files, run directories; or
    records already collected by `qanalyze.report.inputs.collect`) and write one self-contained HTML page
    to ``out``; with ``png`` every figure also as PNG in ``<out stem>-figures/``."""
    from qanalyze.report.html import render_report as render
    from qanalyze.report.inputs import ReportInputs, collect

    records = inputs if isinstance(inputs, ReportInputs) else collect(list(inputs))
    target = Path(out)
    return render(records, target, png_dir=target.with_name(f"{target.stem}-figures") if png else None,
                  progress=progress)


def export(plan_or_run: str | Path, format: str, out: str | Path, *, snap: str = "none", overwrite: bool = False,
           options: dict[str, Any] | None = None) -> ExportRecord:
    """Export a plan file (the engine's recipe) or an rtn/gptq run directory (a checkpoint of its exact codes)
    to engine ``format`` (`qanalyze.export.registry`: compressed-tensors, gptq, torchao, ...) in folder ``out``,
    with export.json saying which entries were stored exactly and which ``snap="up"`` moved; ``options`` are
    the format's settings (``{"checkpoint_format": "gptq_v2"}``). Everything that can be refused is refused
    before ``out`` is touched; see `qanalyze.export.run.export`."""
    from qanalyze.export.run import export as run_export

    return run_export(plan_or_run, format, out, snap=snap, overwrite=overwrite, options=options)
