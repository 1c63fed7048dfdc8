"""The ``qanalyze`` command line: each command parses its options, calls one library verb
(`qanalyze.verbs`) and prints what comes back.

Every outcome becomes an exit code (`qanalyze.cli_exits`). Heavy libraries are imported inside the commands so that
``--help`` answers at once; the commands are built per call so that methods registered at run time
(`qanalyze.methods.register`) get their ``--mode`` choice and options.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from qanalyze.cli_options import (
    OBJECTIVE_CHOICES,
    SectionedCommand,
    analyze_options,
    data_options,
    export_formats,
    exporter_options,
    exporter_settings,
    group_options,
    int_list,
    integer_reference_bits,
    layout_list,
    lm_options,
    load_task_data,
    method_options,
    plan_options,
    pop_method_configs,
    train_config,
    train_options,
)
from qanalyze.cli_output import print_metrics, print_most_sensitive, print_plan
from qanalyze.methods.parse import name_list as names


def _console(quiet: bool) -> Any:
    from rich.console import Console

    return Console(stderr=True, quiet=quiet)


@contextmanager
def _interrupts(hint: Callable[[], str]) -> Iterator[None]:
    """Turn Ctrl-C inside the block into one `Interrupted` line that says what was kept and how to go on;
    ``hint`` is asked at that moment, since what is kept depends on how far the work got."""
    from qanalyze.engine.train import TrainingInterrupted
    from qanalyze.errors import Interrupted
    from qanalyze.rundir import checkpoint_dir

    try:
        yield
    except TrainingInterrupted as exc:
        go_on = hint() if checkpoint_dir(exc.run) is not None else "run the command again"
        raise Interrupted(f"{exc}; {go_on}") from None
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; {hint()}") from None


def _resume_hint(out: str | Path) -> Callable[[], str]:
    from qanalyze.rundir import checkpoint_dir

    return lambda: ("continue with the same command and --resume" if checkpoint_dir(Path(out)) is not None
                    else "nothing was kept; run the command again")


def _train(model: str, plan: str | None, mode: str, quiet: bool, kw: dict[str, Any], configs: dict[str, Any],
           what: str) -> None:
    from qanalyze import verbs
    from qanalyze.progress import step_progress
    from qanalyze.rundir import check_run_dir

    config = train_config(kw)
    check_run_dir(kw["out"], overwrite=kw["overwrite"], resume=kw["resume"])  # before the data is read
    data = load_task_data(kw)
    console = _console(quiet)
    console.print(f"[bold]{what}[/] {model} on {data.task.name}: {data.describe()} -> {kw['out']}")
    with _interrupts(_resume_hint(kw["out"])), step_progress(console) as progress:
        record = verbs.train(model, data, config, kw["out"], mode=mode, plan=plan, method_config=configs.get(mode),
                             resume=kw["resume"], overwrite=kw["overwrite"], on_step=progress.on_step,
                             on_eval=progress.on_eval)
    examples = len(data.dev) if isinstance(data.dev, list) else "its windows"
    print_metrics(data.task.name, "dev", record.metrics, examples, record.intervals)
    for rank, metrics in record.rank_metrics.items():
        print_metrics(data.task.name, f"dev at rank {rank}", metrics, examples)
    console.print(f"train {record.timings['train_seconds']:.1f} s, median step "
                  f"{record.timings['step_seconds_median']:.3f} s; run saved in {kw['out']}")


def build_cli() -> click.Group:
    """The command group, with the methods registered now."""
    from qanalyze.methods import METHODS

    @click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
    @click.version_option(package_name="qanalyze", message="qanalyze %(version)s")
    @click.option("--threads", default="auto", show_default=True, envvar="QANALYZE_THREADS",
                  help="CPU threads: a number, or auto (the free cores, measured at start).")
    def cli(threads: str) -> None:
        """How many bits can each part of a transformer take, and what will it cost?

        The flow: finetune (FP32 baseline) -> analyze (sensitivity.json) -> plan (plan.json)
        -> train (quantized run) -> evaluate -> sweep -> report (report.html).
        MODEL is a local Hugging Face model directory, a qanalyze run directory, the alias
        `minilm-l6` (the packaged all-MiniLM-L6-v2 weights) or a hub id (only then is anything
        downloaded).
        """
        from qanalyze.threads import apply_threads, prepare_threads

        apply_threads(prepare_threads(threads))  # the wait policy must be set before torch loads

    @cli.command()
    @click.argument("model")
    @data_options
    @lm_options
    @train_options(epochs=3)
    def finetune(model: str, quiet: bool, **kw: Any) -> None:
        """Fine-tune MODEL in FP32 on a task: the baseline every quantized run is compared with.

        Writes the fine-tuned model and tokenizer, metrics.json (schema qanalyze/run/v1), log.csv
        (one row per step) and evals.csv into --out.
        """
        _train(model, None, "fp32", quiet, kw, {}, "finetune")

    modes = [name for name, method in METHODS.items() if name != "fp32" and method.command == "train"]
    mode_help = "; ".join(f"{name}: {METHODS[name].description}" for name in modes)

    @cli.command("train", cls=SectionedCommand)
    @click.argument("model")
    @click.option("--plan", "plan_spec", default=None,
                  help="plan.json from `qanalyze plan`, or uniform:N (every weight, activation and gradient at N "
                       "bits, one scale per tensor), or uniform:N:channel (one scale per weight row and per input "
                       "token; modes int, qat and ptq-dynamic). Required except for --mode qdylora --base nf4.")
    @click.option("--mode", type=click.Choice(modes), default="int", show_default=True, help=mode_help + ".")
    @data_options
    @lm_options
    @train_options(epochs=3)
    @method_options([METHODS[name] for name in modes])
    def train_command(model: str, plan_spec: str | None, mode: str, quiet: bool, **kw: Any) -> None:
        """Fine-tune MODEL with the bits of a plan, by the method --mode names.

        Writes metrics.json (mode and plan recorded), log.csv, evals.csv, and the run's checkpoint: for
        the modes that swap modules, plan.json, weights.safetensors (integer weights packed to their
        bit-width, float16 scales) and extra.safetensors (biases, norms), which `qanalyze evaluate RUN`
        reloads with the same integer kernels; for qdylora the frozen base with its adapters
        (model.safetensors) and lora.json, evaluated at its full rank and at every --eval-ranks rank.
        """
        configs = pop_method_configs(kw, [mode])
        from qanalyze.methods import get_method

        if plan_spec is None and get_method(mode).needs_plan(configs[mode]):
            raise click.UsageError(get_method(mode).missing_plan())
        _train(model, plan_spec, mode, quiet, kw, configs, f"train --mode {mode} --plan {plan_spec}")

    quantizers = [name for name, method in METHODS.items() if method.command == "quantize"]

    @cli.command(cls=SectionedCommand)
    @click.argument("model")
    @click.option("--plan", "plan_spec", required=True,
                  help="plan.json from `qanalyze plan` (column layouts), or uniform:N:gG (every linear layer at N "
                       "bits in groups of G input columns, asymmetric; uniform:N:gG:sym symmetric; uniform:N:row one "
                       "group per row).")
    @click.option("--method", type=click.Choice(quantizers), default="gptq", show_default=True,
                  help="; ".join(f"{name}: {METHODS[name].description}" for name in quantizers) + ".")
    @data_options
    @lm_options
    @click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory to create.")
    @click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
    @click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
    @click.option("--eval-batch-size", type=click.IntRange(min=1), default=8, show_default=True,
                  help="Windows or examples per evaluation batch.")
    @method_options([METHODS[name] for name in quantizers])
    def quantize(model: str, plan_spec: str, method: str, quiet: bool, **kw: Any) -> None:
        """Quantize MODEL's weights after training, at the bits and column groups of a plan (no training).

        Each planned linear layer gets its plan's bits and group layout, by round-to-nearest (rtn) or GPTQ
        calibrated layer by layer on the task's training split (gptq). The quantized model is evaluated on
        the task (lm: perplexity, and KL divergence and top-1 agreement against MODEL) and written as a run
        directory: plan.json, ptq.json (errors and seconds of every module), weights.safetensors (codes packed
        to their bits, float16 scales, zero points) and extra.safetensors, which `qanalyze evaluate RUN`
        reloads. An interrupted quantization leaves no run directory.
        """
        from qanalyze import verbs
        from qanalyze.progress import stage_progress
        from qanalyze.rundir import check_run_dir

        configs = pop_method_configs(kw, [method])
        check_run_dir(kw["out"], overwrite=kw["overwrite"])  # before the data is read
        data = load_task_data(kw)
        console = _console(quiet)
        console.print(f"[bold]quantize --method {method} --plan {plan_spec}[/] {model} on {data.task.name}: "
                      f"{data.describe()} -> {kw['out']}")
        with _interrupts(lambda: "nothing was kept; run the command again"), stage_progress(console) as progress:
            record = verbs.quantize(model, data, plan_spec, kw["out"], method=method, method_config=configs[method],
                                    overwrite=kw["overwrite"], device=kw["device"],
                                    eval_batch_size=kw["eval_batch_size"], seed=kw["seed"], progress=progress.update)
        examples = len(data.dev) if isinstance(data.dev, list) else "its windows"
        print_metrics(data.task.name, "dev", record.metrics, examples, record.intervals)
        console.print(f"quantized in {record.timings.get('prepare_seconds', 0.0):.1f} s; run saved in {kw['out']}")

    @cli.command()
    @click.argument("model_or_run")
    @data_options
    @lm_options
    @click.option("--split", type=click.Choice(["dev", "train"]), default="dev", show_default=True)
    @click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
    @click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
    @click.option("--out", type=click.Path(dir_okay=False), default=None,
                  help="Write the metrics here (default: eval-<task>-<split>.json inside a run directory).")
    @click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
    @click.option("--ranks", default=None, help="qdylora runs: also evaluate the adapters truncated to these "
                                                "ranks (1,2,4,8,16).")
    def evaluate(model_or_run: str, quiet: bool, **kw: Any) -> None:
        """Evaluate a model or a run directory on a task and print its metrics.

        For a run directory, --task, --data and --max-length default to the run's own; the run is
        reloaded by the method that made it (a quantized run from its packed integer weights, with the
        integer kernels).
        """
        from qanalyze.rundir import check_output_file
        from qanalyze.verbs import evaluate_run

        overwrite = kw.pop("overwrite")
        if kw["out"]:  # never the run's own record, and an existing file only with --overwrite
            check_output_file(kw["out"], inputs=(model_or_run,), overwrite=overwrite)
        console = _console(quiet)
        ranks_text = kw.pop("ranks")
        ranks = int_list(ranks_text) if ranks_text else ()
        with console.status("evaluating"):
            result = evaluate_run(model_or_run, ranks=ranks, **kw)
        record = result.record
        if not result.has_head:
            console.print(f"[yellow]warning:[/] {model_or_run} has no {record.task} head; its new head is random, "
                          "so expect chance-level metrics")
        print_metrics(record.task, record.split, record.metrics, record.examples)
        for rank, metrics in record.rank_metrics.items():
            print_metrics(record.task, f"{record.split} at rank {rank}", metrics, record.examples)
        if result.path is not None:
            console.print(f"metrics written to {result.path}")

    @cli.command()
    @click.argument("model")
    @data_options
    @lm_options
    @analyze_options
    def analyze(model: str, out: str, quiet: bool, **kw: Any) -> None:
        """Measure each quantizable module's sensitivity of MODEL on a task -> sensitivity.json.

        Hutchinson traces of every module from one pass and the quantization error of weights,
        activations and gradients for every bit-width (what the default plan objective needs); Hessian
        top eigenvalues per module and per layer with --metrics eig. MODEL needs a task head: analyze
        a `qanalyze finetune` run.
        """
        from qanalyze.progress import stage_progress
        from qanalyze.rundir import check_output_file
        from qanalyze.sensitivity.analyze import AnalyzeConfig, partial_path
        from qanalyze.verbs import analyze as run_analysis

        check_output_file(out, inputs=(model,), overwrite=kw["overwrite"] or kw["resume"])  # before the data
        console = _console(quiet)
        config = AnalyzeConfig(
            batches=kw["batches"], batch_size=kw["batch_size"], max_length=kw["max_length"] or 128,
            metrics=names(kw["metrics"]), modules=kw["modules"], engine=kw["engine"], eig_method=kw["eig_method"],
            eig_tol=kw["eig_tol"], trace_rel_tol=kw["trace_tol"], hvp_precision=kw["hvp_precision"],
            unpad=kw["unpad"], trace_max_probes=kw["trace_probes"],
            trace_min_probes=min(8, kw["trace_probes"]), trace_refine_params=kw["trace_refine_params"],
            gradient_draws=kw["gradient_draws"], bits=int_list(kw["bits"]),
            gradient_bits=int_list(kw["gradient_bits"]), weight_range=kw["weight_range"],
            score_bits=int_list(kw["score_bits"]), score_labels=kw["score_labels"],
            **({} if kw["analysis_groups"] == "auto" else {"groups": layout_list(kw["analysis_groups"])}),
            measure_delta_loss=kw["measure_delta_loss"], seed=kw["seed"])
        data = load_task_data(kw)
        def kept() -> str:
            partial = partial_path(out)
            return (f"the finished work is kept in {partial}; continue with the same command and --resume"
                    if partial.exists() else "nothing was written; run the command again")

        with _interrupts(kept), stage_progress(console) as progress:
            report = run_analysis(model, data, config, out, resume=kw["resume"], overwrite=kw["overwrite"],
                                  device=kw["device"], pipeline=kw["pipeline"], progress=progress.update)
        print_most_sensitive(report, console)
        counts = report.timings.get("hessian_products")
        console.print(f"sensitivity of {len(report.modules)} modules written to {out} "
                      f"({report.timings.get('seconds', 0.0):.0f} s"
                      + (f", {counts:.0f} Hessian products" if counts else "") + ")")

    @cli.command()
    @click.argument("model", required=False)
    @plan_options
    @data_options
    def plan(model: str | None, budget: str | None, out: str | None, quiet: bool, **kw: Any) -> None:
        """Turn a budget into a per-module weight / activation / gradient bit-width plan -> plan.json.

        The weight bits and group sizes minimise the total predicted damage under the budget (an exact
        multiple-choice knapsack); activation bits do the same under --act-budget; gradient bits are the
        fewest whose measured error stays under --grad-tol. Without a sensitivity file the model is
        analyzed first, with `qanalyze analyze`'s defaults.
        """
        from qanalyze.plan.budget import parse_bits, parse_bops
        from qanalyze.plan.make import PlanConfig
        from qanalyze.progress import stage_progress
        from qanalyze.records import BitPlan
        from qanalyze.sensitivity.analyze import AnalyzeConfig
        from qanalyze.verbs import plan_for

        console = _console(quiet)
        if kw["show"]:
            print_plan(BitPlan.load(kw["show"]), console)
            return
        if not model or not budget or not out:
            raise click.UsageError("plan needs MODEL, --budget and --out (or --show FILE)")
        config = PlanConfig(objective=kw["objective"], bits=int_list(kw["bit_list"]), groups=names(kw["group_sizes"]),
                    keep_float=names(kw["keep_float"]), ties=tuple(kw["tie"]),
                    default_ties=not kw["no_default_ties"], act_budget=parse_bits(kw["act_budget"]),
                    grad_tol=kw["grad_tol"], solver=kw["solver"], seed=kw["seed"],
                    bops=parse_bops(kw["bops"]) if kw["bops"] else None, seq_len=kw["seq_len"],
                    act_group=kw["act_group"], grad_group=kw["grad_group"],
                    grad_budget=parse_bits(kw["grad_budget"]) if kw["grad_budget"] else None, target=kw["target"])
        data = load_task_data(kw, eval_examples=False) if kw["task"] and kw["data"] else None
        with _interrupts(lambda: "run the same command again: an interrupted analysis continues where it stopped"), \
                stage_progress(console) as progress:
            made = plan_for(model, budget, config, out, sensitivity=kw["sensitivity"], baselines=kw["baselines"],
                            any_weights=kw["any_weights"],
                            overwrite=kw["overwrite"], data=data, progress=progress.update,
                            analysis=AnalyzeConfig(max_length=kw["max_length"] or 128, seed=kw["seed"]))
        print_plan(made[0], console)
        from qanalyze.verbs import baseline_path

        for record in made:
            target = baseline_path(out, record.baseline) if record.baseline else Path(out)
            totals = record.totals
            click.echo(f"{target}: {record.baseline or 'hessian'} plan, mean weight bits "
                       f"{totals['weight_bits_mean']:.3f}, {totals['weight_bytes'] / 1e6:.2f} MB, "
                       f"{totals['compression']:.2f}x, predicted damage {totals['predicted_damage']:.4g}")

    sweep_modes = [name for name, method in METHODS.items() if method.sweep_role is not None]

    @cli.command(cls=SectionedCommand)
    @click.argument("model")
    @click.option("--budgets", default="2,3,4,6,8", show_default=True,
                  help="Weight budgets: numbers are bits (4 -> 4bit); 12MB or 8x also work.")
    @click.option("--plans", default="hessian,uniform,random,reversed", show_default=True,
                  help="Plans per budget: the Hessian plan and the baselines of equal cost.")
    @click.option("--modes", "--mode", "modes", default="qat", show_default=True,
                  help=f"How the plans are trained, comma-separated, of {', '.join(sweep_modes)}; a mode with bits "
                       "of its own (int4) adds one uniform reference run.")
    @click.option("--integer-bits", default="auto", show_default=True,
                  help="Uniform integer-training reference points (int mode, W=A=G bits), or `none`; auto: 8,16 when "
                       "a mode trains, none for post-training modes only (rtn, gptq).")
    @click.option("--sensitivity", type=click.Path(dir_okay=False), default=None,
                  help="From `qanalyze analyze` (default: OUT/sensitivity.json, made if missing).")
    @click.option("--objective", type=click.Choice(OBJECTIVE_CHOICES), default="auto", show_default=True,
                  help="As for `qanalyze plan`.")
    @click.option("--act-budget", default="8bit", show_default=True, help="Mean activation bits of every plan.")
    @click.option("--group-sizes", "plan_groups", default="auto", show_default=True,
                  help="Weight group layouts every plan may use, as for `qanalyze plan` (g128p: groups of 128 with a "
                       "shorter last one); the analysis the sweep makes measures them too.")
    @group_options(" in every plan")
    @click.option("--measure-delta-loss", is_flag=True, help="When the sweep analyzes: also measure each module's "
                                                              "loss change (for the report's predictors).")
    @click.option("--weight-range", type=click.Choice(["max", "mse"]), default="max", show_default=True,
                  help="When the sweep analyzes: how weight ranges are set (see `qanalyze analyze --weight-range`); "
                       "with --sensitivity the file's setting holds.")
    @data_options
    @lm_options
    @train_options(epochs=1)
    @method_options([m for name, m in METHODS.items() if name in sweep_modes])
    def sweep(model: str, budgets: str, plans: str, modes: str, integer_bits: str, sensitivity: str | None,
              out: str, quiet: bool, **kw: Any) -> None:
        """Plan and train MODEL at every budget, beside uniform, random and reversed plans of equal cost.

        MODEL is the FP32 fine-tuned model (a `qanalyze finetune` run). Writes into --out: fp32.json,
        sensitivity.json (when none is given), plans/, runs/ (one run directory per distinct plan) and
        sweep.json + sweep.csv with every result. Run it again to continue: finished runs are reused,
        an interrupted one continues from its checkpoint.
        """
        from qanalyze.plan.budget import parse_bits
        from qanalyze.plan.make import PlanConfig
        from qanalyze.progress import sweep_progress
        from qanalyze.sensitivity.analyze import AnalyzeConfig
        from qanalyze.sweep.config import SweepConfig, budget_text
        from qanalyze.sweep.run import SweepHooks
        from qanalyze.sweep.run import sweep as run_sweep
        from qanalyze.sweep.table import sweep_table

        if kw.pop("resume") or kw.pop("overwrite"):
            raise click.UsageError("sweep continues by itself: run it again with the same --out (no --resume or "
                                   "--overwrite); delete a run folder under OUT/runs to redo that run")
        chosen = names(modes)
        groups_text = kw.pop("plan_groups")
        plan_groups = ("auto",) if groups_text == "auto" else layout_list(groups_text)
        config = SweepConfig(
            budgets=tuple(budget_text(b) for b in names(budgets)), plans=names(plans), modes=chosen,
            methods=pop_method_configs(kw, chosen),
            integer_bits=integer_reference_bits(integer_bits, chosen),
            plan=PlanConfig(objective=kw["objective"], act_budget=parse_bits(kw["act_budget"]), seed=kw["seed"],
                    act_group=kw["act_group"], grad_group=kw["grad_group"], groups=plan_groups),
            train=train_config(kw),
            analysis=AnalyzeConfig(max_length=kw["max_length"] or 128, seed=kw["seed"],
                                   weight_range=kw["weight_range"], measure_delta_loss=kw["measure_delta_loss"],
                                   **({} if plan_groups == ("auto",) else {"groups": plan_groups})))
        data = load_task_data(kw)
        console = _console(quiet)
        console.print(f"[bold]sweep[/] {model} on {data.task.name}: budgets {', '.join(config.budgets)} x "
                      f"{', '.join(config.plans)} ({', '.join(config.modes)}), {data.describe()} -> {out}")
        with _interrupts(lambda: "run the same command again to continue: finished runs are reused and an "
                                 "interrupted one resumes from its checkpoint"), sweep_progress(console) as progress:
            hooks = SweepHooks(on_stage=progress.on_stage, on_run_start=progress.on_run_start,
                               on_run_end=progress.on_run_end, on_step=progress.on_step,
                               on_analysis=progress.on_analysis)
            record = run_sweep(model, data, config, out, sensitivity=sensitivity, hooks=hooks)
        table = sweep_table(record)
        click.echo(table.drop(columns=["run", "metric"]).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        console.print(f"sweep of {len(record.rows)} rows written to {Path(out) / 'sweep.json'} and sweep.csv "
                      f"({record.timings.get('seconds', 0.0):.0f} s)")

    @cli.command()
    @click.argument("inputs", nargs=-1, required=True)
    @click.option("--out", required=True, type=click.Path(dir_okay=False), help="report.html to write.")
    @click.option("--png/--no-png", default=True, show_default=True,
                  help="Also write every figure as PNG in OUT's folder, under <name>-figures/.")
    @click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
    @click.option("--quiet", "-q", is_flag=True, help="Print only the path of the page.")
    def report(inputs: tuple[str, ...], out: str, png: bool, overwrite: bool, quiet: bool) -> None:
        """Turn records into one self-contained HTML page with figures and tables.

        INPUTS are sweep folders (`qanalyze sweep --out`), sensitivity.json and plan.json files, or
        run directories, in any mix: the page shows what they hold (provenance, sensitivity, errors,
        plan, Pareto chart, predictors) and says what is missing.
        """
        from qanalyze.progress import task_progress
        from qanalyze.report.inputs import collect
        from qanalyze.rundir import check_output_file
        from qanalyze.verbs import render_report

        check_output_file(out, inputs=inputs, overwrite=overwrite)
        records = collect(list(inputs))  # bad input is refused before any progress line
        with task_progress(_console(quiet), "report") as progress:
            result = render_report(records, out, png=png, progress=progress.update)
        if not quiet:
            click.echo(f"sections with content: {', '.join(result.filled)}"
                       + (f"; {len(result.pngs)} PNG figures" if png else ""), err=True)
        click.echo(str(result.path))

    @cli.command()
    @click.argument("plan_or_run")
    @click.option("--format", "format_name", required=True, type=click.Choice(export_formats()),
                  help="Engine format (every registered exporter).")
    @click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write.")
    @click.option("--snap", type=click.Choice(["none", "up"]), default="none", show_default=True,
                  help="up: store an entry the format cannot hold at the nearest layout at least as precise "
                       "(more bits, smaller groups), recorded in export.json; none: refuse it (plans only: a "
                       "run's codes are never moved).")
    @click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
    @click.option("--quiet", "-q", is_flag=True, help="Print only the folder written.")
    @exporter_options
    def export(plan_or_run: str, format_name: str, out: str, snap: str, overwrite: bool, quiet: bool,
               **settings: Any) -> None:
        """Write a plan as an inference engine's recipe, or a quantized run as a checkpoint it loads.

        PLAN_OR_RUN is a plan.json (-> compressed-tensors quantization_config, GPTQ quantize_config.json
        with dynamic overrides, torchao FqnToConfig JSON and snippet, llama-quantize --tensor-type-file) or an
        rtn/gptq run directory (-> the run's exact integer codes in the format's packed layout, or a GGUF file,
        which the engine loads to the weights qanalyze evaluated). Entries the format cannot store are refused
        by name unless --snap up.
        """
        from qanalyze.verbs import export as export_verb

        options = exporter_settings(format_name, settings)
        with _console(quiet).status(f"exporting to {format_name}"):
            record = export_verb(plan_or_run, format_name, out, snap=snap, overwrite=overwrite, options=options)
        if not quiet:
            for moved in record.snapped:
                click.echo(f"snapped {moved['module']}: {moved['planned']} -> {moved['stored']}", err=True)
            click.echo(f"{record.format} {record.kind} of {record.modules} modules ({record.exact} exact, "
                       f"{len(record.snapped)} snapped), {record.total_bytes / 1e6:,.1f} MB", err=True)
        click.echo(out)

    return cli


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and turn every outcome into an exit code (0, 1, 2, 3 or 130); launched by torchrun as one
    rank of several, joined to the process group and quiet unless rank 0 (`qanalyze.launch`)."""
    from qanalyze.cli_exits import run_command
    from qanalyze.launch import ranked

    return ranked(lambda: run_command(build_cli, argv))
