"""The ``qanalyze`` command line. Each command reads and writes the records of one stage.

Errors the user can fix (`qanalyze.errors.InputError`, click usage errors) print one line on
stderr and exit 2; an interrupted run exits 130; anything else is an internal error (exit 1,
traceback only with ``QANALYZE_DEBUG=1``). Heavy libraries are imported inside the commands so
that ``--help`` answers at once.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

EXIT_OK, EXIT_INTERNAL, EXIT_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def _console(quiet: bool) -> Any:
    from rich.console import Console

    return Console(stderr=True, quiet=quiet)


def _option_group(*options: Callable[[Any], Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A decorator adding ``options`` to a command, in the order given (shared by several commands)."""
    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            fn = option(fn)
        return fn
    return decorate


_data_options = _option_group(
    click.option("--task", help="Task name (sst2, mrpc, rte, stsb, cola, qnli, mnli, qqp) or a task JSON file."),
    click.option("--data", help="GLUE root or task folder, CSV/TSV/JSON/Parquet file or folder, or a "
                                "`datasets` hub name."),
    click.option("--max-train-examples", type=click.IntRange(min=1), default=None,
                 help="Use a subset of this many training examples (chosen by --seed)."),
    click.option("--max-eval-examples", type=click.IntRange(min=1), default=None,
                 help="Use a subset of this many evaluation examples (chosen by --seed)."),
    click.option("--max-length", type=click.IntRange(min=8), default=None,
                 help="Truncate inputs to this many tokens (default 128; batches pad dynamically)."),
    click.option("--seed", type=int, default=0, show_default=True, help="Seed for subsets, order, init."),
    click.option("--quiet", "-q", is_flag=True, help="No progress output; results only."),
)
"""Options shared by every command that reads task data."""


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="qanalyze", message="qanalyze %(version)s")
def cli() -> None:
    """How many bits can each part of a transformer take, and what will it cost?

    The flow: finetune (FP32 baseline) -> analyze (sensitivity.json) -> plan (plan.json)
    -> train (quantized run) -> evaluate -> sweep -> report (report.html).
    MODEL is a local Hugging Face model directory, a qanalyze run directory, the alias
    `minilm-l6` (the packaged all-MiniLM-L6-v2 weights) or a hub id (only then is anything
    downloaded).
    """


_train_options = _option_group(
    click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory to create."),
    click.option("--epochs", type=click.IntRange(min=1), default=3, show_default=True),
    click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Stop after this many steps "
                 "(overrides --epochs)."),
    click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True),
    click.option("--lr", type=float, default=1e-4, show_default=True, help="Peak learning rate (AdamW)."),
    click.option("--warmup-ratio", type=float, default=0.06, show_default=True),
    click.option("--weight-decay", type=float, default=0.01, show_default=True),
    click.option("--max-grad-norm", type=float, default=1.0, show_default=True, help="Gradient clipping."),
    click.option("--eval-every", type=click.IntRange(min=1), default=None, help="Also evaluate every N steps."),
    click.option("--save-every", type=click.IntRange(min=1), default=100, show_default=True,
                 help="Checkpoint every N steps (for --resume)."),
    click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N]."),
    click.option("--distill", type=click.FloatRange(0, 1), default=0.0, show_default=True,
                 help="Share α of a distillation loss against the logits of the model the run starts from (a "
                      "fine-tuned one): (1-α)·task + α·KD."),
    click.option("--distill-temperature", type=click.FloatRange(min=0, min_open=True), default=1.0,
                 show_default=True, help="Temperature T of the distillation loss (scaled by T²)."),
    click.option("--resume", is_flag=True, help="Continue an interrupted run in --out from its checkpoint."),
    click.option("--overwrite", is_flag=True, help="Replace --out if it exists."),
)
"""Options of every training command."""

_int4_options = _option_group(
    click.option("--lss/--no-lss", default=False, show_default=True,
                 help="int4: leverage score sampling of the rows of the split output gradient (off: keep every "
                      "non-zero row, as the authors' released kernels do; measured more accurate here)."),
    click.option("--lss-input/--no-lss-input", default=True, show_default=True,
                 help="int4 with --lss: sample the rows of the input-gradient product too (off: only the weight "
                      "gradient's, so the gradient passed to earlier layers is not sampled)."),
    click.option("--lss-keep", type=click.FloatRange(0, 1, min_open=True), default=0.5, show_default=True,
                 help="int4 with --lss: expected fraction of the split gradient's rows kept (of the rows "
                      "--lss-budget counts; 0.5 of all rows is the paper's N of 2N; more rows: less sampling "
                      "variance, less saved)."),
    click.option("--lss-budget", type=click.Choice(["rows", "nonzero"]), default="rows", show_default=True,
                 help="int4 with --lss: --lss-keep is a fraction of all 2N rows of the padded batch (rows, the "
                      "paper's compute budget; padding rows count) or of the non-zero rows only (stricter)."),
    click.option("--hq-block", type=click.IntRange(min=1, max=1024), default=None,
                 help="int4: Hadamard block size (a power of two; default: chosen per layer on the first batch)."),
)
"""Options of the int4 mode (train and sweep)."""

_lora_options = _option_group(
    click.option("--lora-rank", type=click.IntRange(min=1), default=16, show_default=True,
                 help="qdylora: largest adapter rank r (one run serves ranks 1..r)."),
    click.option("--lora-alpha", type=float, default=16.0, show_default=True,
                 help="qdylora: scale alpha (alpha / rank)."),
    click.option("--lora-targets", default="query,value", show_default=True,
                 help="qdylora: regexes of the linear modules that get adapters."),
    click.option("--dylora-update", type=click.Choice(["frozen", "all"]), default="frozen", show_default=True,
                 help="qdylora: update only the sampled rank's row and column (frozen) or rows 1..b (all)."),
    click.option("--eval-ranks", default="1,2,4,8,16", show_default=True,
                 help="qdylora: ranks the finished run is also evaluated at."),
)
"""Options of the qdylora mode's adapters (train and sweep)."""


def _pop_int4_options(kw: dict[str, Any]) -> dict[str, Any]:
    return {"lss": kw.pop("lss"), "lss_input": kw.pop("lss_input"), "keep_fraction": kw.pop("lss_keep"),
            "budget": kw.pop("lss_budget"),
            "block": kw.pop("hq_block")}


def _pop_lora_options(kw: dict[str, Any], *, base: str = "plan",
                      double_quant: bool = False) -> tuple[Any, tuple[int, ...]]:
    """The LoRAConfig and evaluation ranks the qdylora options in ``kw`` give (removed from ``kw``)."""
    from qanalyze.engine.lora import LoRAConfig

    lora = LoRAConfig(rank=kw.pop("lora_rank"), alpha=kw.pop("lora_alpha"),
                      targets=tuple(t.strip() for t in kw.pop("lora_targets").split(",") if t.strip()),
                      update=kw.pop("dylora_update"), base=base, double_quant=double_quant)
    return lora, _int_list(kw.pop("eval_ranks"))


def _run_training(model: str, task: str | None, data: str | None, out: str, quiet: bool, kw: dict[str, Any], *,
                  plan_spec: str | None = None, mode: str = "fp32", lora: Any = None) -> None:
    from qanalyze.data import load_task
    from qanalyze.engine.train import TrainConfig, train
    from qanalyze.models import load_model
    from qanalyze.rundir import check_run_dir, prepare_run_dir

    task, data = _require_task_and_data(task, data)
    check_run_dir(out, overwrite=kw["overwrite"], resume=kw["resume"])
    console = _console(quiet)
    config = TrainConfig(
        epochs=kw["epochs"], max_steps=kw["max_steps"], batch_size=kw["batch_size"], lr=kw["lr"],
        warmup_ratio=kw["warmup_ratio"], weight_decay=kw["weight_decay"], max_grad_norm=kw["max_grad_norm"],
        max_length=kw["max_length"] or 128, eval_every=kw["eval_every"], save_every=kw["save_every"],
        seed=kw["seed"], device=kw["device"], distill=kw["distill"], distill_temperature=kw["distill_temperature"])
    task_data = load_task(task, data, max_train_examples=kw["max_train_examples"],
                          max_eval_examples=kw["max_eval_examples"], seed=kw["seed"])
    _seed_everything(kw["seed"])
    loaded = load_model(model, num_labels=task_data.task.num_labels)
    plan = None
    if plan_spec is not None:
        from qanalyze.engine.apply import get_mode, validate_plan
        from qanalyze.plan.uniform import resolve_plan

        kinds = tuple(get_mode(mode).builders) or ("linear", "embedding")
        plan = resolve_plan(plan_spec, loaded.model, kinds=kinds)
        validate_plan(loaded.model, plan, mode)  # before the run directory is made: bad input leaves nothing
    run = prepare_run_dir(out, overwrite=kw["overwrite"], resume=kw["resume"])
    what = "finetune" if mode == "fp32" else f"train --mode {mode} --plan {plan_spec}"
    console.print(f"[bold]{what}[/] {model} on {task_data.task.name}: {len(task_data.train)} train / "
                  f"{len(task_data.dev)} dev examples -> {run}")
    from qanalyze.progress import step_progress

    with step_progress(console) as progress:
        extra = {"lora": lora, "eval_ranks": kw["eval_ranks"]} if lora is not None else {}
        if kw.get("options"):
            extra["options"] = kw["options"]
        record = train(loaded, task_data, config, run, resume=kw["resume"], on_step=progress.on_step,
                       on_eval=progress.on_eval, plan=plan, mode=mode, plan_source=plan_spec, **extra)
    _print_metrics(task_data.task.name, "dev", record.metrics, len(task_data.dev))
    for rank, metrics in record.rank_metrics.items():
        _print_metrics(task_data.task.name, f"dev at rank {rank}", metrics, len(task_data.dev))
    console.print(f"train {record.timings['train_seconds']:.1f} s, median step "
                  f"{record.timings['step_seconds_median']:.3f} s; run saved in {run}")


@cli.command()
@click.argument("model")
@_data_options
@_train_options
def finetune(model: str, task: str | None, data: str | None, out: str, quiet: bool, **kw: Any) -> None:
    """Fine-tune MODEL in FP32 on a task: the baseline every quantized run is compared with.

    Writes the fine-tuned model and tokenizer, metrics.json (schema qanalyze/run/v1), log.csv
    (one row per step) and evals.csv into --out.
    """
    _run_training(model, task, data, out, quiet, kw)


@cli.command("train")
@click.argument("model")
@click.option("--plan", "plan_spec", default=None,
              help="plan.json from `qanalyze plan`, or uniform:N (every weight, activation and gradient at N bits, "
                   "one scale per tensor), or uniform:N:channel (one scale per weight row and per input token; "
                   "modes int, qat and ptq-dynamic). Required except for --mode qdylora --base nf4.")
@click.option("--mode", type=click.Choice(["int", "qat", "ptq-dynamic", "int4", "qdylora"]), default="int",
              show_default=True,
              help="int: integer forward and backward (dynamic fixed point); qat: Q8BERT fake quantization; "
                   "ptq-dynamic: quantize MODEL as it is, no training; int4: 4-bit training (Hadamard quantizer, "
                   "bit splitting, leverage score sampling); qdylora: frozen quantized base with dynamic-rank LoRA "
                   "adapters.")
@_int4_options
@_lora_options
@click.option("--base", type=click.Choice(["plan", "nf4"]), default="plan", show_default=True,
              help="qdylora: base weights at the plan's bits, or NF4 (QLoRA's 4-bit normal float, blocks of 64).")
@click.option("--double-quant", is_flag=True, help="qdylora with --base nf4: quantize the block scales too.")
@_data_options
@_train_options
def train_command(model: str, plan_spec: str | None, mode: str, task: str | None, data: str | None, out: str,
                  quiet: bool, **kw: Any) -> None:
    """Fine-tune MODEL with the bits of a plan: integer training (int), QAT (qat), none (ptq-dynamic), or
    adapters on a frozen quantized base (qdylora).

    Writes metrics.json (mode and plan recorded), log.csv, evals.csv, plan.json and the quantized
    checkpoint: weights.safetensors (integer weights packed to their bit-width, float16 scales) and
    extra.safetensors (biases, norms); `qanalyze evaluate RUN` reloads it with the same integer kernels.
    A qdylora run holds the frozen base and the adapters (model.safetensors) and lora.json, and is
    evaluated at its full rank and at every --eval-ranks rank (metrics.json rank_metrics).
    """
    int4_options = _pop_int4_options(kw)
    lora, eval_ranks = _pop_lora_options(kw, base=kw.pop("base"), double_quant=kw.pop("double_quant"))
    if mode == "qdylora":
        kw["eval_ranks"] = eval_ranks
        if plan_spec is None and lora.base != "nf4":
            raise click.UsageError("--mode qdylora needs --plan for its base, or --base nf4")
    else:
        lora = None
    if mode != "qdylora" and plan_spec is None:
        raise click.UsageError("missing option --plan (a plan.json, or uniform:N)")
    if mode == "int4":
        kw["options"] = int4_options
    _run_training(model, task, data, out, quiet, kw, plan_spec=plan_spec, mode=mode, lora=lora)


@cli.command()
@click.argument("model_or_run")
@_data_options
@click.option("--split", type=click.Choice(["dev", "train"]), default="dev", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Write the metrics here (default: eval-<task>-<split>.json inside a run directory).")
@click.option("--ranks", default=None, help="qdylora runs: also evaluate the adapters truncated to these ranks "
                                            "(1,2,4,8,16).")
def evaluate(model_or_run: str, task: str | None, data: str | None, quiet: bool, **kw: Any) -> None:
    """Evaluate a model or a run directory on a task and print its metrics.

    For a run directory, --task, --data and --max-length default to the run's own. A quantized run
    (from `qanalyze train`) is evaluated from its packed integer weights with the integer kernels.
    """
    from qanalyze.data import encode, load_task
    from qanalyze.engine.evaluate import evaluate as run_evaluation
    from qanalyze.engine.train import resolve_device
    from qanalyze.models import LoadedModel, has_task_head, load_model, resolve_model
    from qanalyze.records import EVAL_SCHEMA, RunRecord, atomic_write_json, environment, utc_now
    from qanalyze.rundir import METRICS_FILE, is_finished_run

    run = Path(model_or_run)
    previous = RunRecord.load(run / METRICS_FILE) if is_finished_run(run) else None
    if previous is not None:
        task = task or previous.task
        data = data or previous.data.get("location") or previous.data.get("source")
        kw["max_length"] = kw["max_length"] or previous.settings.get("max_length")
    task, data = _require_task_and_data(task, data)
    console = _console(quiet)
    task_data = load_task(task, data, max_train_examples=kw["max_train_examples"],
                          max_eval_examples=kw["max_eval_examples"], seed=kw["seed"])
    _seed_everything(kw["seed"])
    from qanalyze.engine.lora_checkpoint import is_qdylora_run, load_qdylora_run
    from qanalyze.engine.quantized_checkpoint import is_quantized_run, load_quantized_run

    quantized = previous is not None and is_quantized_run(run)
    adapters = None
    if previous is not None and is_qdylora_run(run):
        quantized = True  # its base is frozen and quantized; the head is trained
        model, tokenizer, adapters = load_qdylora_run(run, device=resolve_device(kw["device"]))
        loaded = LoadedModel(model=model, tokenizer=tokenizer, source=resolve_model(str(run)),
                             identity={**previous.model, "run": str(run), "mode": previous.mode})
    elif quantized:
        # a quantized run: rebuild it from its packed integer weights, evaluated with the integer kernels
        model, tokenizer, _, _ = load_quantized_run(run, device=resolve_device(kw["device"]))
        loaded = LoadedModel(model=model, tokenizer=tokenizer, source=resolve_model(str(run)),
                             identity={**previous.model, "run": str(run), "mode": previous.mode})
    else:
        loaded = load_model(model_or_run, num_labels=task_data.task.num_labels)
    if not quantized and not has_task_head(loaded.model):
        console.print(f"[yellow]warning:[/] {model_or_run} has no {task_data.task.name} head; "
                      "its new head is random, so expect chance-level metrics")
    loaded.model.to(resolve_device(kw["device"]))
    examples = task_data.dev if kw["split"] == "dev" else task_data.train
    encoded = encode(examples, loaded.tokenizer, max_length=kw["max_length"] or 128)
    with console.status(f"evaluating {len(examples)} examples"):
        result = run_evaluation(loaded.model, loaded.tokenizer, encoded, task_data.task,
                                batch_size=kw["batch_size"])
    _print_metrics(task_data.task.name, kw["split"], result.metrics, result.examples)
    rank_metrics = {}
    if kw["ranks"]:
        if adapters is None:
            raise click.UsageError("--ranks applies to qdylora runs only")
        from qanalyze.engine.lora import set_rank

        for rank in _int_list(kw["ranks"]):
            set_rank(adapters, rank)
            metrics = run_evaluation(loaded.model, loaded.tokenizer, encoded, task_data.task,
                                     batch_size=kw["batch_size"]).metrics
            rank_metrics[str(rank)] = metrics
            _print_metrics(task_data.task.name, f"{kw['split']} at rank {rank}", metrics, result.examples)
    out = kw["out"] or (str(run / f"eval-{task_data.task.name}-{kw['split']}.json") if previous else None)
    if out is not None:
        atomic_write_json(out, {
            "schema": EVAL_SCHEMA, "versions": environment(), "created": utc_now(), "task": task_data.task.name,
            "split": kw["split"], "model": loaded.identity, "data": task_data.identity,
            "metrics": result.metrics, "loss": result.loss, "rank_metrics": rank_metrics,
            "settings": {"max_length": kw["max_length"] or 128, "batch_size": kw["batch_size"], "seed": kw["seed"]},
            "timings": {"eval_seconds": round(result.seconds, 3)}})
        console.print(f"metrics written to {out}")


def _int_list(text: str) -> tuple[int, ...]:
    """``2-16`` or ``2,3,4,8`` -> a tuple of ints."""
    values: list[int] = []
    try:
        for part in text.split(","):
            low, _, high = part.strip().partition("-")
            values.extend(range(int(low), int(high) + 1) if high else [int(low)])
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a list of integers like 2-16 or 2,4,8") from None
    return tuple(values)


@cli.command()
@click.argument("model")
@_data_options
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="sensitivity.json to write.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--batches", type=click.IntRange(min=1), default=4, show_default=True,
              help="Calibration batches (Q-BERT: eigenvalues per batch, Ω = |mean| + std).")
@click.option("--metrics", default=",".join(("eig", "trace", "weights", "activations", "gradients")),
              show_default=True, help="Any of eig, trace, density, weights, activations, gradients.")
@click.option("--modules", default=None, help="Only modules whose name matches this regular expression.")
@click.option("--engine", type=click.Choice(["native", "pyhessian"]), default="native", show_default=True)
@click.option("--eig-method", type=click.Choice(["lanczos", "power"]), default="lanczos", show_default=True)
@click.option("--hvp-precision", type=click.Choice(["auto", "float32", "bfloat16"]), default="auto", show_default=True,
              help="Products for traces and density in bfloat16 (Lanczos eigenvalues finished in float32); auto: "
                   "bfloat16 where the CPU or GPU multiplies it natively.")
@click.option("--unpad/--no-unpad", default=True, show_default=True,
              help="Run Hessian products on length buckets of each batch without their shared padding (same loss "
                   "and Hessian, fewer rows); --no-unpad: the padded batch, as PyHessian takes it.")
@click.option("--eig-tol", type=float, default=1e-3, show_default=True)
@click.option("--trace-tol", type=float, default=0.05, show_default=True, help="Relative standard error to stop at.")
@click.option("--trace-probes", type=click.IntRange(min=2), default=32, show_default=True,
              help="Most Hutchinson probes per batch.")
@click.option("--bits", default="2-16", show_default=True, help="Bit-widths for weight and activation errors.")
@click.option("--gradient-bits", default="2,3,4,5,6,8,12,16", show_default=True)
@click.option("--weight-range", type=click.Choice(["max", "mse"]), default="max", show_default=True,
              help="How each weight group's range is set for its errors, and so in the plans made from this file "
                   "and the runs that train them: max|w| (Q-BERT, Q8BERT), or the clipping that minimizes "
                   "||Q(W) - W||^2 (far less error at 2-4 bits).")
@click.option("--measure-delta-loss", is_flag=True,
              help="Also measure the loss change of quantizing each module alone.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--resume", is_flag=True, help="Continue from OUT.partial, skipping finished work.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def analyze(model: str, task: str | None, data: str | None, out: str, quiet: bool, **kw: Any) -> None:
    """Measure each quantizable module's sensitivity of MODEL on a task -> sensitivity.json.

    Hessian top eigenvalues (per module and per layer, over --batches batches), Hutchinson traces
    of every module from one pass, and the quantization error of weights, activations and
    gradients for every bit-width. MODEL needs a task head: analyze a `qanalyze finetune` run.
    """
    from qanalyze.data import load_task
    from qanalyze.engine.train import resolve_device
    from qanalyze.errors import ConfigError
    from qanalyze.models import has_task_head, load_model
    from qanalyze.sensitivity.analyze import AnalyzeConfig
    from qanalyze.sensitivity.analyze import analyze as run_analysis

    task, data = _require_task_and_data(task, data)
    if Path(out).exists() and not kw["overwrite"]:
        raise click.UsageError(f"{out} exists; pass --overwrite to replace it")
    console = _console(quiet)
    config = AnalyzeConfig(
        batches=kw["batches"], batch_size=kw["batch_size"], max_length=kw["max_length"] or 128,
        metrics=tuple(m.strip() for m in kw["metrics"].split(",") if m.strip()), modules=kw["modules"],
        engine=kw["engine"], eig_method=kw["eig_method"], eig_tol=kw["eig_tol"], trace_rel_tol=kw["trace_tol"],
        hvp_precision=kw["hvp_precision"], unpad=kw["unpad"],
        trace_max_probes=kw["trace_probes"], trace_min_probes=min(8, kw["trace_probes"]),
        bits=_int_list(kw["bits"]), gradient_bits=_int_list(kw["gradient_bits"]), weight_range=kw["weight_range"],
        measure_delta_loss=kw["measure_delta_loss"], seed=kw["seed"])
    task_data = load_task(task, data, max_train_examples=kw["max_train_examples"],
                          max_eval_examples=kw["max_eval_examples"], seed=kw["seed"])
    _seed_everything(kw["seed"])
    loaded = load_model(model, num_labels=task_data.task.num_labels, eager_attention=True)
    if not has_task_head(loaded.model):
        raise ConfigError(f"{model} has no trained {task_data.task.name} head, so its loss means nothing; fine-tune "
                          f"one first (qanalyze finetune {model} --task {task_data.task.name} --data ... --out RUN) "
                          "and analyze RUN")
    loaded.model.to(resolve_device(kw["device"]))
    from qanalyze.progress import stage_progress

    with stage_progress(console) as progress:
        report = run_analysis(loaded, task_data, config, out, resume=kw["resume"], progress=progress.update)
    _print_most_sensitive(report, console)
    console.print(f"sensitivity of {len(report.modules)} modules written to {out} "
                  f"({report.timings.get('seconds', 0.0):.0f} s)")


def _print_most_sensitive(report: Any, console: Any, count: int = 10) -> None:
    from rich.table import Table

    rows = []
    for name, entry in report.modules.items():
        hessian = entry.get("hessian", {})
        rows.append((name, hessian.get("omega"), hessian.get("avg_trace"), hessian.get("trace"),
                     hessian.get("trace_stderr")))
    # Ω comes from converged Lanczos runs; the trace is a stochastic estimate shown with its error.
    rows.sort(key=lambda r: -(r[1] if r[1] is not None else (r[2] or 0.0)))
    table = Table(title=f"the {count} most sensitive modules (by Ω = |mean λ_max| + std over batches)")
    for column in ("module", "Ω", "average trace", "trace ± stderr"):
        table.add_column(column)
    for name, omega, avg, trace, stderr in rows[:count]:
        shown = f"{trace:.4g} ± {stderr:.2g}" if trace is not None else "-"
        table.add_row(name, *(f"{v:.4g}" if v is not None else "-" for v in (omega, avg)), shown)
    console.print(table)


@cli.command()
@click.argument("model", required=False)
@click.option("--budget", help="Weight budget: 4bit, 3.5bit (mean bits, scales counted), 12MB, 12MiB, 0.5GB, 8x.")
@click.option("--sensitivity", type=click.Path(dir_okay=False), default=None,
              help="From `qanalyze analyze` (default: sensitivity.json beside OUT, made if missing).")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="plan.json to write.")
@click.option("--objective", type=click.Choice(["trace", "eig", "measured"]), default="trace", show_default=True,
              help="Predicted damage: (tr H / n)·‖ΔW‖² (HAWQ-V2), Ω·‖ΔW‖² (Q-BERT) or measured Δloss.")
@click.option("--bits", "bit_list", default="2,3,4,5,6,8,12,16", show_default=True, help="Allowed bit-widths.")
@click.option("--group-sizes", default="tensor,channel,head,128,64,32", show_default=True,
              help="Allowed groupings of output rows (one scale each).")
@click.option("--keep-float", default="layernorm,head", show_default=True,
              help="Kinds (linear, embedding, layernorm), stages (embeddings, head) or re:REGEX kept in float.")
@click.option("--tie", multiple=True, help="Regex of modules that share bits within a layer (repeatable).")
@click.option("--act-budget", default="8bit", show_default=True, help="Mean activation bits.")
@click.option("--act-group", type=click.Choice(["tensor", "token"]), default="tensor", show_default=True,
              help="Scales of each linear layer's input: one per tensor, or one per token "
                   "(modes int, qat and ptq-dynamic).")
@click.option("--grad-group", type=click.Choice(["tensor", "row"]), default="tensor", show_default=True,
              help="Scales of each linear layer's output gradient: one per tensor, or per row (per token for the "
                   "input gradient, per output channel for the weight gradient; mode int).")
@click.option("--bops", default=None, help="Also cap bit operations per sequence (MACs x W bits x A bits): 2e12, 500G.")
@click.option("--seq-len", type=click.IntRange(min=1), default=128, show_default=True,
              help="Sequence length the BOPs count assumes.")
@click.option("--grad-tol", type=float, default=0.05, show_default=True,
              help="Gradient bits: the fewest whose relative gradient error stays under this.")
@click.option("--grad-budget", default=None, help="Instead of --grad-tol: mean gradient bits (e.g. 8bit), "
                                                  "allocated to minimise the measured gradient error.")
@click.option("--solver", type=click.Choice(["ilp", "highs", "cbc", "dp"]), default="ilp", show_default=True,
              help="ilp: exact, HiGHS (else CBC); dp: dynamic programming on a discretised cost.")
@click.option("--baselines", is_flag=True, help="Also write uniform, random and reversed plans beside OUT.")
@click.option("--show", "show", type=click.Path(dir_okay=False), default=None, help="Pretty-print this plan and exit.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@_data_options
def plan(model: str | None, budget: str | None, sensitivity: str | None, out: str | None, quiet: bool,
         **kw: Any) -> None:
    """Turn a budget into a per-module weight / activation / gradient bit-width plan -> plan.json.

    The weight bits and group sizes minimise the total predicted damage under the budget (an exact
    multiple-choice knapsack); activation bits do the same under --act-budget; gradient bits are the
    fewest whose measured error stays under --grad-tol.
    """
    from qanalyze.plan.budget import parse_bits, parse_bops, parse_budget
    from qanalyze.plan.make import BASELINES, PlanConfig, check_plan, make_plan
    from qanalyze.records import BitPlan, SensitivityReport

    console = _console(quiet)
    if kw["show"]:
        _print_plan(BitPlan.load(kw["show"]), console)
        return
    if not model or not budget or not out:
        raise click.UsageError("plan needs MODEL, --budget and --out (or --show FILE)")
    parsed = parse_budget(budget)
    config = PlanConfig(
        objective=kw["objective"], bits=_int_list(kw["bit_list"]),
        groups=tuple(g.strip() for g in kw["group_sizes"].split(",") if g.strip()),
        keep_float=tuple(k.strip() for k in kw["keep_float"].split(",") if k.strip()), ties=tuple(kw["tie"]),
        act_budget=parse_bits(kw["act_budget"]), grad_tol=kw["grad_tol"], solver=kw["solver"], seed=kw["seed"],
        bops=parse_bops(kw["bops"]) if kw["bops"] else None, seq_len=kw["seq_len"], act_group=kw["act_group"],
        grad_group=kw["grad_group"],
        grad_budget=parse_bits(kw["grad_budget"]) if kw["grad_budget"] else None)
    targets = [Path(out)] + ([_baseline_path(out, name) for name in BASELINES] if kw["baselines"] else [])
    existing = [str(t) for t in targets if t.exists()]
    if existing and not kw["overwrite"]:
        raise click.UsageError(f"{existing[0]} exists; pass --overwrite to replace it")
    source = Path(sensitivity) if sensitivity else Path(out).parent / "sensitivity.json"
    if not source.exists():
        if sensitivity:
            raise click.UsageError(f"sensitivity file not found: {sensitivity}")
        _analyze_for_plan(model, source, kw, console)
    report = SensitivityReport.load(source)
    architecture = _architecture(model, report.data.get("task"))
    made = [make_plan(report, parsed, config, sensitivity_path=source)]
    if kw["baselines"]:
        made += [make_plan(report, parsed, config, sensitivity_path=source, baseline=name) for name in BASELINES]
    for plan_record in made:
        check_plan(plan_record, architecture)
    for plan_record, target in zip(made, targets):
        plan_record.save(target)
    _print_plan(made[0], console)
    for plan_record, target in zip(made, targets):
        totals = plan_record.totals
        click.echo(f"{target}: {plan_record.baseline or 'hessian'} plan, mean weight bits "
                   f"{totals['weight_bits_mean']:.3f}, {totals['weight_bytes'] / 1e6:.2f} MB, "
                   f"{totals['compression']:.2f}x, predicted damage {totals['predicted_damage']:.4g}")


def _baseline_path(out: str, name: str) -> Path:
    path = Path(out)
    return path.with_name(f"{path.stem}.{name}{path.suffix}")


def _architecture(model: str, task: str | None) -> dict[str, list[int]]:
    from qanalyze.models import inventory, load_model
    from qanalyze.tasks import get_task

    # the task head is part of the architecture the sensitivity file (and so the plan) describes
    loaded = load_model(model, num_labels=get_task(task).num_labels if task else None)
    return {info.name: list(info.shape) for info in inventory(loaded.model)}


def _analyze_for_plan(model: str, target: Path, kw: dict[str, Any], console: Any) -> None:
    from qanalyze.data import load_task
    from qanalyze.models import load_model
    from qanalyze.progress import stage_progress
    from qanalyze.sensitivity.analyze import AnalyzeConfig, analyze

    if not kw.get("task") or not kw.get("data"):
        raise click.UsageError(f"no sensitivity file at {target}: pass --sensitivity FILE, or --task and --data "
                               "to analyze the model first")
    task_data = load_task(kw["task"], kw["data"], max_train_examples=kw["max_train_examples"], seed=kw["seed"])
    loaded = load_model(model, num_labels=task_data.task.num_labels, eager_attention=True)
    console.print(f"no sensitivity file yet: analyzing {model} into {target}")
    with stage_progress(console) as progress:
        analyze(loaded, task_data, AnalyzeConfig(max_length=kw["max_length"] or 128, seed=kw["seed"]), target,
                progress=progress.update)


def _print_plan(plan_record: Any, console: Any) -> None:
    from rich.table import Table

    table = Table(title=f"plan: budget {plan_record.budget['text']}, objective {plan_record.objective}"
                        + (f", baseline {plan_record.baseline}" if plan_record.baseline else ""))
    table.add_column("module", overflow="fold")
    for column in ("W bits", "group", "A bits", "G bits", "predicted damage"):
        table.add_column(column)
    for name, spec in plan_record.modules.items():
        if spec.get("float"):
            table.add_row(name, "float", "", "", "", "")
        else:
            group = spec["group"] + (", mse range" if spec.get("weight_range") == "mse" else "")
            table.add_row(name, str(spec["weight_bits"]), group, str(spec.get("activation_bits") or "-"),
                          str(spec.get("gradient_bits") or "-"), f"{spec['predicted_damage']:.3g}")
    console.print(table)
    totals = plan_record.totals
    console.print(f"mean weight bits {totals['weight_bits_mean']:.3f}, weight bytes {totals['weight_bytes']:,}, "
                  f"compression {totals['compression']:.2f}x, predicted damage {totals['predicted_damage']:.4g}, "
                  f"BOPs {totals.get('bops', 0):.3g} per {totals.get('bops_seq_len', '?')}-token sequence")


@cli.command()
@click.argument("model")
@click.option("--budgets", default="2,3,4,6,8", show_default=True,
              help="Weight budgets: numbers are bits (4 -> 4bit); 12MB or 8x also work.")
@click.option("--plans", default="hessian,uniform,random,reversed", show_default=True,
              help="Plans per budget: the Hessian plan and the baselines of equal cost.")
@click.option("--modes", "--mode", "modes", default="qat", show_default=True,
              help="How the plans are trained, comma-separated: qat (Q8BERT, as Q-BERT re-trains), int (integer "
                   "fine-tuning), ptq-dynamic (no training), qdylora (adapters on a base frozen at each plan's "
                   "bits); int4 (4-bit training) adds one uniform 4-bit reference run.")
@click.option("--integer-bits", default="8,16", show_default=True,
              help="Uniform integer-training reference points (int mode, W=A=G bits); `none` for none.")
@_int4_options
@_lora_options
@click.option("--sensitivity", type=click.Path(dir_okay=False), default=None,
              help="From `qanalyze analyze` (default: OUT/sensitivity.json, made if missing).")
@click.option("--objective", type=click.Choice(["trace", "eig", "measured"]), default="trace", show_default=True)
@click.option("--act-budget", default="8bit", show_default=True, help="Mean activation bits of every plan.")
@click.option("--act-group", type=click.Choice(["tensor", "token"]), default="tensor", show_default=True,
              help="Scales of each linear layer's input in every plan: one per tensor, or one per token "
                   "(modes int, qat and ptq-dynamic).")
@click.option("--grad-group", type=click.Choice(["tensor", "row"]), default="tensor", show_default=True,
              help="Scales of each linear layer's output gradient in every plan: one per tensor, or per row "
                   "(mode int).")
@click.option("--measure-delta-loss", is_flag=True,
              help="When the sweep analyzes: also measure each module's loss change (for the report's predictors).")
@click.option("--weight-range", type=click.Choice(["max", "mse"]), default="max", show_default=True,
              help="When the sweep analyzes: how weight ranges are set (see `qanalyze analyze --weight-range`); "
                   "with --sensitivity the file's setting holds.")
@_data_options
@_train_options
def sweep(model: str, budgets: str, plans: str, modes: str, integer_bits: str, sensitivity: str | None,
          task: str | None, data: str | None, out: str, quiet: bool, **kw: Any) -> None:
    """Plan and train MODEL at every budget, beside uniform, random and reversed plans of equal cost.

    MODEL is the FP32 fine-tuned model (a `qanalyze finetune` run). Writes into --out: fp32.json,
    sensitivity.json (when none is given), plans/, runs/ (one run directory per distinct plan) and
    sweep.json + sweep.csv with every result. Run it again to continue: finished runs are reused,
    an interrupted one continues from its checkpoint. --epochs defaults to 1 here.
    """
    from qanalyze.data import load_task
    from qanalyze.engine.int4 import Int4Spec
    from qanalyze.engine.train import TrainConfig
    from qanalyze.plan.budget import parse_bits
    from qanalyze.plan.make import PlanConfig
    from qanalyze.progress import sweep_progress
    from qanalyze.sensitivity.analyze import AnalyzeConfig
    from qanalyze.sweep.config import SweepConfig, budget_text
    from qanalyze.sweep.run import SweepHooks
    from qanalyze.sweep.run import sweep as run_sweep
    from qanalyze.sweep.table import sweep_table

    task, data = _require_task_and_data(task, data)
    if kw["resume"] or kw["overwrite"]:
        raise click.UsageError("sweep continues by itself: run it again with the same --out (no --resume or "
                               "--overwrite); delete a run folder under OUT/runs to redo that run")
    max_length = kw["max_length"] or 128
    lora, eval_ranks = _pop_lora_options(kw)
    config = SweepConfig(
        budgets=tuple(budget_text(b) for b in budgets.split(",") if b.strip()),
        plans=tuple(p.strip() for p in plans.split(",") if p.strip()),
        modes=tuple(m.strip() for m in modes.split(",") if m.strip()),
        lora=lora, eval_ranks=eval_ranks, int4=Int4Spec(**_pop_int4_options(kw)),
        integer_bits=() if integer_bits.strip().lower() == "none" else _int_list(integer_bits),
        plan=PlanConfig(objective=kw.pop("objective"), act_budget=parse_bits(kw.pop("act_budget")), seed=kw["seed"],
                        act_group=kw.pop("act_group"), grad_group=kw.pop("grad_group")),
        train=TrainConfig(
            epochs=kw["epochs"] if _given("epochs") else 1, max_steps=kw["max_steps"], batch_size=kw["batch_size"],
            lr=kw["lr"], warmup_ratio=kw["warmup_ratio"], weight_decay=kw["weight_decay"],
            max_grad_norm=kw["max_grad_norm"], max_length=max_length, eval_every=kw["eval_every"],
            save_every=kw["save_every"], seed=kw["seed"], device=kw["device"], distill=kw["distill"],
            distill_temperature=kw["distill_temperature"]),
        analysis=AnalyzeConfig(max_length=max_length, seed=kw["seed"], weight_range=kw.pop("weight_range"),
                               measure_delta_loss=kw.pop("measure_delta_loss")))
    task_data = load_task(task, data, max_train_examples=kw["max_train_examples"],
                          max_eval_examples=kw["max_eval_examples"], seed=kw["seed"])
    _seed_everything(kw["seed"])
    console = _console(quiet)
    console.print(f"[bold]sweep[/] {model} on {task_data.task.name}: budgets {', '.join(config.budgets)} x "
                  f"{', '.join(config.plans)} ({', '.join(config.modes)}), {len(task_data.train)} train / "
                  f"{len(task_data.dev)} dev examples -> {out}")
    with sweep_progress(console) as progress:
        hooks = SweepHooks(on_stage=progress.on_stage, on_run_start=progress.on_run_start,
                           on_run_end=progress.on_run_end, on_step=progress.on_step, on_analysis=progress.on_analysis)
        record = run_sweep(model, task_data, config, out, sensitivity=sensitivity, hooks=hooks)
    table = sweep_table(record)
    click.echo(table.drop(columns=["run", "metric"]).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    console.print(f"sweep of {len(record.rows)} rows written to {Path(out) / 'sweep.json'} and sweep.csv "
                  f"({record.timings.get('seconds', 0.0):.0f} s)")


@cli.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="report.html to write.")
@click.option("--png/--no-png", default=True, show_default=True,
              help="Also write every figure as PNG in OUT's folder, under <name>-figures/.")
@click.option("--quiet", "-q", is_flag=True, help="Print only the path of the page.")
def report(inputs: tuple[str, ...], out: str, png: bool, quiet: bool) -> None:
    """Turn records into one self-contained HTML page with figures and tables.

    INPUTS are sweep folders (`qanalyze sweep --out`), sensitivity.json and plan.json files, or
    run directories, in any mix: the page shows what they hold (provenance, sensitivity, errors,
    plan, Pareto chart, predictors) and says what is missing.
    """
    from qanalyze.report.html import render_report
    from qanalyze.report.inputs import collect

    records = collect(list(inputs))
    target = Path(out)
    png_dir = target.with_name(f"{target.stem}-figures") if png else None
    with _console(quiet).status("rendering the report"):
        result = render_report(records, target, png_dir=png_dir)
    if not quiet:
        click.echo(f"sections with content: {', '.join(result.filled)}"
                   + (f"; {len(result.pngs)} PNG figures in {png_dir}" if png_dir else ""), err=True)
    click.echo(str(result.path))


def _given(name: str) -> bool:
    """True when the user typed option ``name`` (not its default)."""
    from click.core import ParameterSource

    return click.get_current_context().get_parameter_source(name) is ParameterSource.COMMANDLINE


def _require_task_and_data(task: str | None, data: str | None) -> tuple[str, str]:
    missing = [flag for flag, value in (("--task", task), ("--data", data)) if not value]
    if missing:
        raise click.UsageError(f"missing option {' and '.join(missing)}")
    return task, data  # type: ignore[return-value]


def _seed_everything(seed: int) -> None:
    # A new task head is initialised from the global generator; seeding here (the CLI owns the
    # process) makes `--seed` reproduce it.
    import torch

    torch.manual_seed(seed)


def _print_metrics(task: str, split: str, metrics: dict[str, float], examples: int) -> None:
    values = "  ".join(f"{name} {value:.4f}" for name, value in metrics.items())
    click.echo(f"{task} {split} ({examples} examples): {values}")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and turn every outcome into an exit code (0, 1, 2 or 130)."""
    from qanalyze.errors import InputError

    try:
        # Without standalone mode click returns the code of --help / --version instead of exiting.
        result = cli.main(args=argv, prog_name="qanalyze", standalone_mode=False)
    except click.Abort:
        click.echo("error: aborted", err=True)
        return EXIT_INTERRUPTED
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        return EXIT_INPUT
    except InputError as exc:
        click.echo(f"error: {_one_line(exc)}", err=True)
        return EXIT_INPUT
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        return EXIT_INTERRUPTED
    except Exception as exc:
        from qanalyze.engine.train import TrainingInterrupted

        if isinstance(exc, TrainingInterrupted):
            click.echo(f"error: {_one_line(exc)}", err=True)
            return EXIT_INTERRUPTED
        if os.environ.get("QANALYZE_DEBUG"):
            traceback.print_exc()
        click.echo(f"internal error: {exc.__class__.__name__}: {_one_line(exc)} "
                   "(set QANALYZE_DEBUG=1 for the traceback)", err=True)
        return EXIT_INTERNAL
    return result if isinstance(result, int) else EXIT_OK


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or exc.__class__.__name__


def entry_point() -> None:
    """Console-script entry: exit with `main`'s code."""
    sys.exit(main())
