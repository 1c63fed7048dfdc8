"""Building blocks of the command line: option groups shared by several commands, the options of every
registered method (generated from its config's fields), and ``--help`` with a heading per section."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import click

from qanalyze.methods import METHODS, Method, MethodConfig
from qanalyze.quant.targets import TARGETS

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


class SectionOption(click.Option):
    """An option listed under its own heading in ``--help`` (``section``; None: the general options)."""

    def __init__(self, *args: Any, section: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.section = section


class SectionedCommand(click.Command):
    """A command whose ``--help`` lists the general options first, then each section under its heading."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """Group the option rows by section."""
        sections: dict[str | None, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            row = param.get_help_record(ctx)
            if row is not None:
                sections.setdefault(getattr(param, "section", None), []).append(row)
        for title, rows in sections.items():
            with formatter.section(title or "Options"):
                formatter.write_dl(rows)


def option_group(*options: Decorator) -> Decorator:
    """A decorator adding ``options`` to a command, in the order given (shared by several commands)."""
    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            fn = option(fn)
        return fn
    return decorate


PLAN_BITS = "2,3,4,5,6,8,12,16"
TARGET_NAMES = tuple(TARGETS)
PLAN_GROUPS = "auto"
"""``--group-sizes`` default: the task's layouts (`qanalyze.plan.costs.resolve_groups`)."""


def _param_name(method: Method, spec: dataclasses.Field) -> str:
    # an option shared by several methods (a field of their common base config, ``shared=True``) is one option
    if spec.metadata.get("shared"):
        return f"shared__{spec.name}"
    return f"{method.name.replace('-', '_')}__{spec.name}"


def _click_type(meta: Mapping[str, Any], value: Any) -> Any:
    if "choices" in meta:
        return click.Choice(list(meta["choices"]))
    if "range" in meta:
        low, high, low_open = meta["range"]
        kind = meta.get("type", type(value))
        if kind is int:
            return click.IntRange(min=low, max=high, min_open=low_open)
        return click.FloatRange(min=low, max=high, min_open=low_open)
    if "parse" in meta:
        return str
    return meta.get("type")


def _chooser(method: Method) -> str:
    """The option that picks ``method``: ``--method`` of ``qanalyze quantize`` or ``--mode``."""
    return "--method" if method.command == "quantize" else "--mode"


def _shown(value: Any) -> Any:
    return ",".join(map(str, value)) if isinstance(value, tuple) else value


def method_options(methods: Iterable[Method] | None = None) -> Decorator:
    """Options for every field of every method's config, each method under its own heading."""
    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        added: set[str] = set()
        for method in reversed(list(methods if methods is not None else METHODS.values())):
            for spec in reversed(dataclasses.fields(method.config_class)):
                if _param_name(method, spec) in added:
                    continue
                added.add(_param_name(method, spec))
                meta = spec.metadata
                flag = meta.get("flag") or f"--{spec.name.replace('_', '-')}"
                switch = f"{flag}/{meta['secondary']}" if meta.get("secondary") else flag
                decls = [switch, _param_name(method, spec)]
                section = f"{method.name} options ({_chooser(method)} {method.name})"
                fn = click.option(*decls, cls=SectionOption, section=section,
                                  default=_shown(spec.default), show_default=not meta.get("is_flag"),
                                  is_flag=bool(meta.get("is_flag") or meta.get("secondary")),
                                  type=_click_type(meta, spec.default),
                                  help=meta.get("help", ""))(fn)
        return fn
    return decorate


def pop_method_configs(kw: dict[str, Any], modes: Iterable[str]) -> dict[str, MethodConfig]:
    """Take every method option out of ``kw``; return the config of each of ``modes``. An option of a method
    that is not among ``modes`` is refused when the user typed it."""
    ctx = click.get_current_context()
    chosen = set(modes)
    configs: dict[str, MethodConfig] = {}
    shared: set[str] = set()
    for method in METHODS.values():
        values = {}
        for spec in dataclasses.fields(method.config_class):
            name = _param_name(method, spec)
            if name not in kw:
                continue
            is_shared = bool(spec.metadata.get("shared"))
            value = kw[name] if is_shared else kw.pop(name)  # a shared option is popped once all methods read it
            if is_shared:
                shared.add(name)
            if method.name not in chosen:
                # a shared option belongs to the chosen methods too when any of them takes it
                if not (is_shared and any(_takes(m, spec.name) for m in chosen)):
                    _refuse_typed(ctx, name, spec, method)
                continue
            parse = spec.metadata.get("parse")
            values[spec.name] = parse(value) if parse is not None and isinstance(value, str) else value
        if method.name in chosen:
            configs[method.name] = method.make_config(values)
    for name in shared:
        kw.pop(name)
    return configs


def _takes(mode: str, field_name: str) -> bool:
    return mode in METHODS and field_name in {f.name for f in dataclasses.fields(METHODS[mode].config_class)}


def _refuse_typed(ctx: click.Context, name: str, spec: dataclasses.Field, method: Method) -> None:
    if ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE:
        flag = spec.metadata.get("flag") or f"--{spec.name.replace('_', '-')}"
        raise click.UsageError(f"{flag} applies to {_chooser(method)} {method.name} only")


def int_list(text: str) -> tuple[int, ...]:
    """``2-16`` or ``2,3,4,8`` -> a tuple of ints (click's BadParameter for anything else)."""
    from qanalyze.errors import ConfigError
    from qanalyze.methods.parse import int_list as parse

    try:
        return parse(text)
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from None


def layout_list(text: str) -> tuple[str, ...]:
    """``g32,g128p,channel`` -> the canonical layout names, once each (click's BadParameter for anything else)."""
    from qanalyze.errors import ConfigError
    from qanalyze.methods.parse import name_list
    from qanalyze.quant.layouts import parse_layout

    try:
        return tuple(dict.fromkeys(parse_layout(name) for name in name_list(text)))
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="--group-sizes") from None


def integer_reference_bits(text: str, modes: Iterable[str]) -> tuple[int, ...]:
    """A sweep's ``--integer-bits``: ``none``, bits (``8,16``), or ``auto``: 8 and 16 when a mode trains, none for
    post-training modes only."""
    value = text.strip().lower()
    if value == "auto":
        trains = any(name in METHODS and METHODS[name].command == "train" for name in modes)
        return (8, 16) if trains else ()
    return () if value == "none" else int_list(text)


data_options = option_group(
    click.option("--task", help="Task name (sst2, mrpc, rte, stsb, cola, qnli, mnli, qqp; lm: language modelling "
                                "on text) or a task JSON file."),
    click.option("--data", help="GLUE root or task folder, CSV/TSV/JSON/Parquet file or folder, or a "
                                "`datasets` hub name; for --task lm a folder with valid.txt/test.txt (or "
                                "train.txt), a .txt, JSON/CSV/Parquet file, or a hub name[:config]."),
    # for task lm the examples are the token windows, so the window flags are the same settings
    click.option("--max-train-examples", "--max-train-windows", "max_train_examples", type=click.IntRange(min=1),
                 default=None, help="Use a subset of this many training examples (lm: windows), chosen by --seed."),
    click.option("--max-eval-examples", "--max-eval-windows", "max_eval_examples", type=click.IntRange(min=1),
                 default=None, help="Use a subset of this many evaluation examples (lm: windows), chosen by --seed."),
    click.option("--max-length", type=click.IntRange(min=8), default=None,
                 help="Truncate inputs to this many tokens (default 128; batches pad dynamically)."),
    click.option("--seed", type=int, default=0, show_default=True, help="Seed for subsets, order, init."),
    click.option("--quiet", "-q", is_flag=True, help="No progress output; results only."),
)
"""Options shared by every command that reads task data."""


lm_options = option_group(
    click.option("--seq-len", "lm_seq_len", type=click.IntRange(min=2), default=None,
                 help="Task lm: tokens per window (default 512, the task's); the text is cut into non-overlapping "
                      "windows, the last partial one dropped."),
    click.option("--text-field", default=None,
                 help="Task lm: the column holding the text in JSON/CSV/Parquet files and hub datasets "
                      "(default: text)."),
)
"""Options of the language-model task (`lm`); `load_task_data` passes them on when a command has them."""


def train_options(epochs: int) -> Decorator:
    """Options of every training command; ``epochs`` is the command's default."""
    return option_group(
        click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory to create."),
        click.option("--epochs", type=click.IntRange(min=1), default=epochs, show_default=True),
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


def train_config(kw: dict[str, Any]) -> Any:
    """The `TrainConfig` the training options in ``kw`` give (removed from ``kw``)."""
    from qanalyze.engine.train import TrainConfig

    return TrainConfig(
        epochs=kw.pop("epochs"), max_steps=kw.pop("max_steps"), batch_size=kw.pop("batch_size"), lr=kw.pop("lr"),
        warmup_ratio=kw.pop("warmup_ratio"), weight_decay=kw.pop("weight_decay"),
        max_grad_norm=kw.pop("max_grad_norm"), max_length=kw["max_length"] or 128, eval_every=kw.pop("eval_every"),
        save_every=kw.pop("save_every"), seed=kw["seed"], device=kw.pop("device"), distill=kw.pop("distill"),
        distill_temperature=kw.pop("distill_temperature"))


def load_task_data(kw: dict[str, Any], *, eval_examples: bool = True) -> Any:
    """The task data the data options in ``kw`` name; both --task and --data are required."""
    from qanalyze.data import load_task

    missing = [flag for flag, key in (("--task", "task"), ("--data", "data")) if not kw.get(key)]
    if missing:
        raise click.UsageError(f"missing option {' and '.join(missing)}")
    return load_task(kw["task"], kw["data"], max_train_examples=kw["max_train_examples"],
                     max_eval_examples=kw["max_eval_examples"] if eval_examples else None, seed=kw["seed"],
                     seq_len=kw.get("lm_seq_len"), text_field=kw.get("text_field"))


def group_options(what: str) -> Decorator:
    """``--act-group`` and ``--grad-group`` (plan and sweep); ``what`` says whose layers they set."""
    return option_group(
        click.option("--act-group", type=click.Choice(["tensor", "token"]), default="tensor", show_default=True,
                     help=f"Scales of each linear layer's input{what}: one per tensor, or one per token "
                          "(modes int, qat and ptq-dynamic)."),
        click.option("--grad-group", type=click.Choice(["tensor", "row"]), default="tensor", show_default=True,
                     help=f"Scales of each linear layer's output gradient{what}: one per tensor, or per row (per "
                          "token for the input gradient, per output channel for the weight gradient; mode int)."),
    )


analyze_options = option_group(
    click.option("--out", required=True, type=click.Path(dir_okay=False), help="sensitivity.json to write."),
    click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True),
    click.option("--batches", type=click.IntRange(min=1), default=4, show_default=True,
                 help="Calibration batches (Q-BERT: eigenvalues per batch, Ω = |mean| + std)."),
    click.option("--metrics", default="trace,weights,activations,gradients", show_default=True,
                 help="Any of eig, trace, density, weights, activations, gradients, fisher, output-gradient (eig: "
                      "Q-BERT's per-module and per-layer top eigenvalues, for --objective eig; fisher and "
                      "output-gradient: one-pass scores, fisher always added for task lm)."),
    click.option("--score-bits", default="2,3,4,5,6,8", show_default=True,
                 help="Bits the output-gradient score is measured at."),
    click.option("--score-labels", type=click.Choice(["sampled", "data"]), default="sampled", show_default=True,
                 help="Labels of the fisher and output-gradient passes: drawn from the model (the true Fisher) or "
                      "the data's."),
    click.option("--modules", default=None, help="Only modules whose name matches this regular expression."),
    click.option("--engine", type=click.Choice(["native", "pyhessian"]), default="native", show_default=True),
    click.option("--eig-method", type=click.Choice(["lanczos", "power"]), default="lanczos", show_default=True),
    click.option("--hvp-precision", type=click.Choice(["auto", "float32", "bfloat16"]), default="auto",
                 show_default=True, help="Products for traces and density in bfloat16 (Lanczos eigenvalues "
                 "finished in float32); auto: bfloat16 where the CPU or GPU multiplies it natively."),
    click.option("--unpad/--no-unpad", default=True, show_default=True,
                 help="Run Hessian products on length buckets of each batch without their shared padding (same "
                   "loss and Hessian, fewer rows); --no-unpad: the padded batch, as PyHessian takes it."),
    click.option("--eig-tol", type=float, default=1e-3, show_default=True),
    click.option("--trace-tol", type=float, default=0.05, show_default=True,
                 help="Relative standard error to stop at."),
    click.option("--trace-probes", type=click.IntRange(min=2), default=12,
                 show_default=True, help="Most Hutchinson probes per batch."),
    click.option("--trace-refine-params", type=click.IntRange(min=0), default=0, show_default=True,
                 help="Modules with at most this many weights also get a trace of their own (restricted products; "
                      "their one-pass trace is dominated by the large modules' cross terms); 0: none."),
    click.option("--gradient-draws", type=click.IntRange(min=1), default=2, show_default=True,
                 help="Stochastic-rounding draws per batch for the gradient errors."),
    click.option("--bits", default="2-16", show_default=True, help="Bit-widths for weight and activation errors."),
    click.option("--gradient-bits", default="2,3,4,5,6,8,12,16", show_default=True),
    click.option("--group-sizes", "analysis_groups", default="auto", show_default=True,
                 help="Weight group layouts to measure: row layouts (tensor, channel, head, 128, 64, 32) and column "
                      "layouts (g32, g64, g128, row; g128p lets the last group of a row be shorter); auto: "
                      "g32,g64,g128,row for task lm, the row layouts otherwise."),
    click.option("--weight-range", type=click.Choice(["max", "mse"]), default="max", show_default=True,
                 help="How each weight group's range is set for its errors, and so in the plans made from this "
                   "file and the runs that train them: max|w| (Q-BERT, Q8BERT), or the clipping that minimizes "
                   "||Q(W) - W||^2 (far less error at 2-4 bits)."),
    click.option("--measure-delta-loss", is_flag=True,
                 help="Also measure the loss change of quantizing each module alone."),
    click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N]."),
    click.option("--resume", is_flag=True, help="Continue from OUT.partial, skipping finished work."),
    click.option("--pipeline", is_flag=True,
                 help="Under torchrun, split a LLaMA-style decoder's layers over the ranks, each loading only its "
                      "own, for a model too big for one process (task lm; metrics weights, fisher and trace; no "
                      "resume)."),
    click.option("--overwrite", is_flag=True, help="Replace OUT if it exists."),
)
"""Options of `qanalyze analyze`; the defaults are `AnalyzeConfig`'s (a test holds them equal)."""

OBJECTIVE_CHOICES = ["auto", "trace", "eig", "measured", "fisher", "output-gradient"]
"""``--objective``: auto and the planner's objectives (`qanalyze.plan.costs.OBJECTIVES`, which a test holds
equal; not imported here, since the planner pulls in torch and ``--help`` should answer at once)."""

plan_options = option_group(
    click.option("--budget", help="Weight budget: 4bit, 3.5bit (mean bits, scales counted), 12MB, 12MiB, 0.5GB, 8x."),
    click.option("--sensitivity", type=click.Path(dir_okay=False), default=None,
                 help="From `qanalyze analyze` (default: sensitivity.json beside OUT, made if missing)."),
    click.option("--out", type=click.Path(dir_okay=False), default=None, help="plan.json to write."),
    click.option("--objective", type=click.Choice(OBJECTIVE_CHOICES), default="auto", show_default=True,
                 help="Predicted damage: (tr H / n)·‖ΔW‖² (trace, HAWQ-V2), Ω·‖ΔW‖² (eig, Q-BERT), measured Δloss, "
                      "Σ F_ii ΔW² (fisher) or Σ (∂L/∂Y)² (Y − Y_q)² (output-gradient, ModelOpt); auto: fisher for "
                      "task lm (it measured best there), trace otherwise."),
    click.option("--bits", "bit_list", default=PLAN_BITS, show_default=True,
                 help="Allowed bit-widths."),
    click.option("--group-sizes", default=PLAN_GROUPS, show_default=True,
                 help="Allowed group layouts: rows per scale (tensor, channel, head, 128, 64, 32; symmetric) or "
                      "input columns per scale and zero point (g32, g64, g128, row; asymmetric, for PTQ); auto: "
                      "g32,g64,g128,row for task lm, tensor,channel,head,128,64,32 otherwise."),
    click.option("--keep-float", default="layernorm,rmsnorm,head", show_default=True,
                 help="Kinds (linear, embedding, layernorm), stages (embeddings, head) or re:REGEX kept in float."),
    click.option("--tie", multiple=True, help="Regex of modules that share bits within a layer (repeatable), "
                                              "besides the default ties."),
    click.option("--no-default-ties", is_flag=True, help="Do not tie the modules inference engines fuse (q/k/v "
                                                          "of one attention, gate/up of one MLP, the experts of "
                                                          "one MoE layer)."),
    click.option("--target", type=click.Choice(list(TARGET_NAMES)), default="any", show_default=True,
                 help="Offer only the bits and column layouts this inference engine loads (gptq: 2/3/4/8 bits; "
                      "torchao: int4 g32-g128, int8 per row; gguf: Q4_1, Q5_1, Q8_0 in blocks of 32; "
                      "compressed-tensors: 4/8 bits)."),
    click.option("--act-budget", default="8bit", show_default=True, help="Mean activation bits."),
    group_options(""),
    click.option("--bops", default=None, help="Also cap bit operations per sequence (MACs x W bits x A bits): "
                                              "2e12, 500G."),
    click.option("--seq-len", type=click.IntRange(min=1), default=128, show_default=True,
                 help="Sequence length the BOPs count assumes."),
    click.option("--grad-tol", type=float, default=0.05, show_default=True,
                 help="Gradient bits: the fewest whose relative gradient error stays under this."),
    click.option("--grad-budget", default=None, help="Instead of --grad-tol: mean gradient bits (e.g. 8bit), "
                                                  "allocated to minimise the measured gradient error."),
    click.option("--solver", type=click.Choice(["ilp", "highs", "cbc", "dp"]), default="ilp", show_default=True,
                 help="ilp: exact, HiGHS (else CBC); dp: dynamic programming on a discretised cost."),
    click.option("--baselines", is_flag=True, help="Also write uniform, random and reversed plans beside OUT."),
    click.option("--any-weights", is_flag=True, help="Plan with a sensitivity file measured on other weights of "
                                                      "the same architecture (refused by default)."),
    click.option("--show", "show", type=click.Path(dir_okay=False), default=None,
                 help="Pretty-print this plan and exit."),
    click.option("--overwrite", is_flag=True, help="Replace OUT if it exists."),
)
"""Options of `qanalyze plan`; the defaults are `PlanConfig`'s (a test holds them equal)."""


def exporter_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--<format>-<setting>`` for every field of every registered exporter's config (its choices and help);
    the keyword is ``<format>__<setting>``."""
    from qanalyze.export.registry import EXPORTERS

    for exporter in reversed(list(EXPORTERS.values())):
        for item in reversed(dataclasses.fields(exporter.config_class)):
            flag = f"--{exporter.name}-{item.name}".replace("_", "-")
            keyword = f"{exporter.name.replace('-', '_')}__{item.name}"
            command = click.option(flag, keyword, type=click.Choice(item.metadata["choices"]), default=None,
                                   help=f"--format {exporter.name}: {item.metadata['help']} [default: "
                                        f"{item.default}]")(command)
    return command


def exporter_settings(format_name: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings given by `exporter_options`' flags, by field name of ``format_name``'s config; ConfigError for
    a flag of another format."""
    from qanalyze.errors import ConfigError

    given = {key: value for key, value in settings.items() if value is not None}
    prefix = format_name.replace("-", "_") + "__"
    stray = [key for key in given if not key.startswith(prefix)]
    if stray:
        raise ConfigError(f"--{stray[0].replace('__', '-').replace('_', '-')} is not a setting of --format "
                          f"{format_name}")
    return {key.removeprefix(prefix): value for key, value in given.items()}


def export_formats() -> list[str]:
    """The ``--format`` names of every registered exporter."""
    from qanalyze.export.registry import EXPORTERS

    return sorted(EXPORTERS)
