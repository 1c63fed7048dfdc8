"""`analyze_pipelined`: the ``analyze`` verb's weight errors, Fisher scores and Hutchinson traces for a causal
LM split by decoder layers over the ranks (`qanalyze.sensitivity.stages`, `qanalyze.sensitivity.pipeline`,
`qanalyze.sensitivity.pipeline_fisher`), so that a model too big for one process is analysed by several, each
holding one stage.

It writes the sensitivity.json of ``analyze --metrics`` any of weights, fisher and trace: the same module
entries (identity fields, ``weight_error``, ``fisher_error``, ``hessian.trace_per_batch`` and what `summarise`
derives), the same model and data identity, and under ``model_level["pipeline"]`` the ranks, their layer ranges
and parameter bytes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from qanalyze.data import TaskData
from qanalyze.distributed import gather_objects, world
from qanalyze.errors import ConfigError
from qanalyze.models import LoadedModel, ModelSource, ModuleInfo, check_max_length, resolve_model
from qanalyze.records import SensitivityReport
from qanalyze.sensitivity.analyze import (
    AnalyzeConfig,
    fisher_errors,
    matching_modules,
    measure_weight_errors,
    new_report,
)
from qanalyze.sensitivity.calibration import calibration_batches
from qanalyze.sensitivity.pipeline import PipelinedHVP, module_order, pipelined_traces
from qanalyze.sensitivity.pipeline_fisher import pipelined_fisher
from qanalyze.sensitivity.stages import Stage, load_stage
from qanalyze.sensitivity.summary import summarise

PIPELINE_METRICS = ("weights", "fisher", "trace")
"""What `analyze_pipelined` measures; the other metrics need the whole model in one process."""

Progress = Callable[[str, int, int, str], None]
"""``progress(stage, done, total, detail)``, as `qanalyze.sensitivity.analyze.Progress`."""


def analyze_pipelined(model: str | Path, data: TaskData, config: AnalyzeConfig, out: str | Path, *,
                      progress: Progress | None = None) -> SensitivityReport:
    """Measure the ``weights``, ``fisher`` and ``trace`` metrics of ``config`` on task ``lm`` data with ``model`` (what
    `qanalyze.models.load_model` takes, but local: a LLaMA-style causal LM's folder with safetensors files and a
    tokenizer, or a GGUF file or alias, read from its converted folder) split by decoder layers over the
    launcher's ranks (one rank: the whole model). Every rank calls it with the same arguments; rank 0 writes
    ``out`` atomically and every rank returns the same report, whose model identity is `load_model`'s.

    The Fisher scores are one process's (`pipelined_fisher`: the same sampled labels, gradients and candidate
    steps, within float32 rounding). The traces are the normal analysis's one-pass Hutchinson estimates with its
    stopping rule (`pipelined_traces`) in float32 products, from probes drawn per module
    (`qanalyze.sensitivity.pipeline.draw_probe`) rather than one stream over the block: equal in distribution,
    not draw for draw, to one process's ``analyze``. No resume. ConfigError for another metric, engine,
    precision or task, and for a model `load_stage` cannot split.
    """
    report_progress = progress or (lambda *_: None)
    _check(data, config)
    here = world()
    source, folder, weights_hash = _local(str(model))
    stage = load_stage(folder, here.rank, here.size)
    config = replace(config, hvp_precision="float32")
    loaded = _loaded(str(model), source, folder, weights_hash, stage)
    batches = calibration_batches(data, loaded.tokenizer, config)
    check_max_length(stage.model, batches[0]["input_ids"].shape[1], flag="--seq-len")
    infos = matching_modules(stage.infos, config.modules)
    # the report of one process's analysis: it reads only the config, identity and module list of the model
    report = new_report(loaded, data, config, infos, stage.infos)
    started = time.perf_counter()
    if "weights" in config.metrics:  # each rank the modules its stage owns
        measure_weight_errors(report, dict(stage.model.named_modules()), infos, config,
                              lambda _, info: stage.split.owns(info.name), report_progress)
        report.timings["weights_seconds"] = time.perf_counter() - started
    if "fisher" in config.metrics:
        _fisher(stage, infos, batches, config, report, report_progress)
    if "trace" in config.metrics:
        _traces(stage, [info.name for info in infos], batches, config, report, report_progress)
    report.model_level["pipeline"] = {
        "ranks": here.size,
        "layers": [[split.start, split.stop] for split in gather_objects(stage.split)],
        "parameter_bytes": gather_objects(stage.parameter_bytes),
    }
    report.timings["seconds"] = time.perf_counter() - started
    summarise(report)
    report.complete = True
    if here.is_main:
        report.save(out)
    return report


def _check(data: TaskData, config: AnalyzeConfig) -> None:
    other = sorted(set(config.metrics) - set(PIPELINE_METRICS))
    if other:
        raise ConfigError(f"a pipelined analysis measures {', '.join(PIPELINE_METRICS)}, not {', '.join(other)}")
    if config.engine != "native":
        raise ConfigError(f"a pipelined analysis runs the native engine, not {config.engine}")
    if config.hvp_precision not in ("auto", "float32"):
        raise ConfigError(f"a pipelined analysis computes its products in float32, not {config.hvp_precision}")
    kind = getattr(data.task, "kind", None)
    if kind != "lm":
        raise ConfigError(f"a pipelined analysis needs task lm (windows of a causal LM's text), not {kind!r}")


def _local(spec: str) -> tuple[ModelSource, Path, str]:
    """Where ``spec``'s safetensors are, and the weights hash `load_model` records: a GGUF file's SHA-256 (its
    converted folder made by rank 0 while the others wait), else "" (hashed later from the folder)."""
    from qanalyze.distributed import barrier, broadcast_object

    source = resolve_model(spec)
    if source.kind == "hub":
        raise ConfigError(f"a pipelined analysis reads a local model folder or GGUF file, not the hub id {spec!r}")
    if source.kind != "gguf":
        return source, Path(source.location), ""
    from qanalyze.gguf_source import converted_folder, file_sha256

    digest = broadcast_object(file_sha256(Path(source.location)) if world().is_main else None)
    if world().is_main:
        converted_folder(Path(source.location), digest)
    barrier()
    return source, converted_folder(Path(source.location), digest), digest


def _loaded(spec: str, source: ModelSource, folder: Path, weights_hash: str, stage: Stage) -> LoadedModel:
    """The stage as a `LoadedModel` with the identity `qanalyze.models.load_model` gives the whole model."""
    from transformers import AutoTokenizer

    from qanalyze.models import hash_config, hash_weights, prepare_tokenizer
    from qanalyze.records import recorded_source

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if stage.split.first:  # the tokenizer's size is checked against the embedding rows where they are
        prepare_tokenizer(tokenizer, stage.model, source)
    elif tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not weights_hash:  # a folder's files, hashed by rank 0 alone
        weights_hash = gather_objects(hash_weights(folder) if world().is_main else "")[0]
    identity = {"source": recorded_source(spec), "location": source.location,
                "config_hash": hash_config(source, str(folder)), "weights_hash": weights_hash,
                **({"converted": str(folder)} if str(folder) != source.location else {})}
    return LoadedModel(model=stage.model, tokenizer=tokenizer, source=source, identity=identity)


def _fisher(stage: Stage, infos: list[ModuleInfo], batches: list[dict[str, Any]], config: AnalyzeConfig,
            report: SensitivityReport, report_progress: Progress) -> None:
    """Each rank the Fisher diagonal of its modules (`pipelined_fisher`) and their ``fisher_error`` at every
    bits x group layout (`CandidateSteps.weighted_errors`, as one process), gathered on every rank."""
    started = time.perf_counter()
    found = pipelined_fisher(stage, batches, labels=config.score_labels, seed=config.seed,
                             modules=[info.name for info in infos], progress=report_progress)
    weights = stage.weights()
    measured = {}
    for i, info in enumerate(infos):
        if info.name not in found.fisher:
            continue
        report_progress("fisher errors", i, len(infos), info.name)
        measured[info.name] = fisher_errors(weights[info.name].detach(), info, config,
                                            report.modules[info.name]["head_dim"], found.fisher[info.name])
    for part in gather_objects(measured):
        for name, errors in part.items():
            report.modules[name]["fisher_error"] = errors
    report.timings["score_passes"] = found.passes
    report.timings["scores_seconds"] = time.perf_counter() - started


def _traces(stage: Stage, names: list[str], batches: list[dict[str, Any]], config: AnalyzeConfig,
            report: SensitivityReport, report_progress: Progress) -> None:
    """Per batch, one pipelined product per probe gives every module's trace (`pipelined_traces`)."""
    from qanalyze.sensitivity.hvp import NonFiniteError

    order = None
    started = time.perf_counter()
    for b, batch in enumerate(batches):
        report_progress("trace", b, len(batches), f"batch {b + 1}: all {len(names)} modules")
        try:
            op = PipelinedHVP.build(stage, batch, names)
            order = order or module_order(op)
            estimates = pipelined_traces(op, seed=config.seed, batch=b, max_probes=config.trace_max_probes,
                                         min_probes=config.trace_min_probes, rel_tol=config.trace_rel_tol,
                                         order=order)
        except NonFiniteError as exc:
            raise NonFiniteError(f"calibration batch {b + 1}: {exc}") from None
        for name, estimate in estimates.items():
            report.modules[name]["hessian"].setdefault("trace_per_batch", []).append(
                {**asdict(estimate), "method": "one-pass"})
        report.timings[f"hessian_products_batch_{b}"] = op.count
    report_progress("trace", len(batches), len(batches), "done")
    report.timings["hessian_products"] = sum(v for k, v in report.timings.items()
                                             if k.startswith("hessian_products_batch_"))
    report.timings["hessian_seconds"] = time.perf_counter() - started
