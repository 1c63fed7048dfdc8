"""The Hessian stage of `qanalyze.sensitivity.analyze.analyze`: per calibration batch, one double-backward graph
serves the units of Hessian work on that batch, in one process or spread over torchrun's ranks.

A batch's units are the Hutchinson traces of every module (``trace``), the top eigenvalue of each layer block
(``block K``) and of each module (its name), and, on the first batch, the spectral density (``density``).
Every unit draws from its own generator, keyed by the seed, the batch and the unit
(`qanalyze.distributed.keyed_generator`), so a unit's numbers do not depend on which units ran before it, on
which rank, or whether the batch was resumed half-way.

Under torchrun the batches go in rounds of one batch per rank. When fewer batches than ranks are left, their
units are split over the ranks instead, so that the per-module Lanczos runs of the last batches share the
work (each rank holds the whole model). Either way the records are gathered and merged in batch order, giving
one process's report.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from qanalyze.distributed import gather_objects, keyed_generator, world
from qanalyze.sensitivity.hvp import NonFiniteError
from qanalyze.sensitivity.sources import HESSIAN_ENGINES

if TYPE_CHECKING:
    from qanalyze.models import ModuleInfo
    from qanalyze.sensitivity.analyze import AnalyzeConfig, Progress, _State

TRACE_UNIT = "trace"
DENSITY_UNIT = "density"


@dataclass(frozen=True)
class HessianTargets:
    """What the Hessian is asked about: module names, their weights, and layer blocks (indices into ``names``)."""

    names: list[str]
    weights: dict[str, torch.nn.Parameter]
    blocks: dict[int, list[int]]

    @classmethod
    def of(cls, infos: list[ModuleInfo], modules: dict[str, torch.nn.Module]) -> HessianTargets:
        """The selected modules' weights and their layer blocks."""
        blocks: dict[int, list[int]] = {}
        for index, info in enumerate(infos):
            if info.block is not None:
                blocks.setdefault(info.block, []).append(index)
        return cls([info.name for info in infos], {info.name: modules[info.name].weight for info in infos}, blocks)


def batch_units(targets: HessianTargets, metrics: set[str], b: int) -> list[str]:
    """The units of Hessian work on batch ``b``, in the order one process does them."""
    units = [TRACE_UNIT] if "trace" in metrics else []
    if "eig" in metrics:
        units += [f"block {block}" for block in sorted(targets.blocks)] + list(targets.names)
    if "density" in metrics and b == 0:
        units.append(DENSITY_UNIT)
    return units


def measure_hessian(model: torch.nn.Module, targets: HessianTargets, batches: list[dict[str, torch.Tensor]],
                    config: AnalyzeConfig, state: _State, report_progress: Progress) -> None:
    """Every batch's pending units into ``state`` (marked per unit and per batch, for ``--resume``); under
    torchrun in rounds over the ranks, the same numbers as one process."""
    todo = [b for b in range(len(batches)) if not state.done(f"hessian_batch_{b}")]
    here = world()
    for start in range(0, len(todo), here.size):
        batch_round = todo[start:start + here.size]
        started = time.perf_counter()
        if here.distributed:
            b, units = assignment(batch_round, here.rank, here.size,
                                  {b: _pending(targets, config, state, b) for b in batch_round})
            part = _scratch_units(model, batches[b], (b, len(batches)), units, targets, config, state,
                                  report_progress)
            parts = gather_objects((b, part))
            for b in batch_round:  # in batch order; a split batch's parts in rank order
                for _, batch_part in (p for p in parts if p[0] == b):
                    _merge(state, b, batch_part)
        else:
            b = batch_round[0]
            _run_units(model, batches[b], (b, len(batches)), _pending(targets, config, state, b), targets, config,
                       state, report_progress)
        timings = state.report.timings
        timings["hessian_seconds"] = timings.get("hessian_seconds", 0.0) + time.perf_counter() - started
        for b in batch_round:
            state.mark(f"hessian_batch_{b}")
    for stage in ("trace", "eig"):
        if stage in config.metrics:
            report_progress(stage, len(batches), len(batches), "done")


def assignment(batch_round: list[int], rank: int, size: int, pending: dict[int, list[str]]) -> tuple[int, list[str]]:
    """The batch and units rank ``rank`` of ``size`` works on in a round of batches: a whole batch each when the
    round has a batch per rank; with fewer, rank r takes batch ``round[r mod len(round)]`` and every g-th of its
    pending units (g the ranks on that batch), so the last batches' Lanczos runs are shared."""
    count = len(batch_round)
    b = batch_round[rank % count]
    group = range(rank % count, size, count)  # the ranks on batch b
    return b, pending[b][group.index(rank)::len(group)]


def _pending(targets: HessianTargets, config: AnalyzeConfig, state: _State, b: int) -> list[str]:
    done = set(state.report.progress.get(f"hessian_batch_{b}_units", []))
    return [unit for unit in batch_units(targets, set(config.metrics), b) if unit not in done]


def _scratch_units(model: torch.nn.Module, batch: dict[str, torch.Tensor], position: tuple[int, int],
                   units: list[str], targets: HessianTargets, config: AnalyzeConfig, state: _State,
                   report_progress: Progress) -> dict[str, Any]:
    """Units of one batch as `_run_units` does them, recorded apart from ``state``: what they add."""
    key = f"hessian_batch_{position[0]}"
    report = copy.copy(state.report)  # its settings and identity; what the units add goes to fresh containers
    report.modules = {name: {"hessian": {}} for name in targets.names}
    report.blocks, report.model_level, report.timings = {}, {}, {}
    report.progress = {key + "_units": []}
    _run_units(model, batch, position, units, targets, config, replace(state, report=report, writes=False),
               report_progress)
    return {"modules": {name: entry["hessian"] for name, entry in report.modules.items() if entry["hessian"]},
            "blocks": report.blocks, "model_level": report.model_level, "units": report.progress[key + "_units"],
            "timings": {k: v for k, v in report.timings.items() if k.startswith("hessian_products_batch_")}}


def _merge(state: _State, b: int, part: dict[str, Any]) -> None:
    for name, hessian in part["modules"].items():
        for key, values in hessian.items():  # per-batch lists: trace_per_batch, eig_per_batch
            state.entry(name)["hessian"].setdefault(key, []).extend(values)
    for block, record in part["blocks"].items():
        state.report.blocks.setdefault(block, {"modules": record["modules"], "per_batch": []})["per_batch"].extend(
            record["per_batch"])
    state.report.model_level.update(part["model_level"])
    for key, products in part["timings"].items():  # a batch split over ranks counts every rank's products
        state.report.timings[key] = state.report.timings.get(key, 0) + products
    state.report.progress.setdefault(f"hessian_batch_{b}_units", []).extend(part["units"])


def _run_units(model: torch.nn.Module, batch: dict[str, torch.Tensor], position: tuple[int, int], units: list[str],
               targets: HessianTargets, config: AnalyzeConfig, state: _State, report_progress: Progress) -> None:
    (b, total), names = position, targets.names
    if not units:
        return
    source = HESSIAN_ENGINES[config.engine](model, batch, targets.weights, config)
    block_names = {f"block {block}": block for block in targets.blocks}
    for unit in units:
        draws = keyed_generator(config.seed, "hessian", b, unit)
        try:
            if unit == TRACE_UNIT:
                report_progress("trace", b, total, f"batch {b + 1}: all {len(names)} modules")
                for name, (estimate, method) in source.traces(names, draws).items():
                    state.entry(name)["hessian"].setdefault("trace_per_batch", []).append(
                        {**asdict(estimate), "method": method})
            elif unit == DENSITY_UNIT:
                report_progress("density", 0, 1, "whole weight Hessian, batch 1")
                state.report.model_level["density"] = source.density(draws)
                report_progress("density", 1, 1, "done")
            elif unit in block_names:
                block = block_names[unit]
                report_progress("eig", b, total, f"batch {b + 1}: layer {block}")
                members = targets.blocks[block]
                estimate = source.top_eigenvalue(members, draws)
                state.report.blocks.setdefault(str(block), {"modules": [names[i] for i in members],
                                                            "per_batch": []})["per_batch"].append(asdict(estimate))
            else:
                report_progress("eig", b, total, f"batch {b + 1}: {unit}")
                estimate = source.top_eigenvalue([names.index(unit)], draws)
                state.entry(unit)["hessian"].setdefault("eig_per_batch", []).append(asdict(estimate))
        except NonFiniteError as exc:
            raise NonFiniteError(f"calibration batch {b + 1}: {exc}") from None
        units_done = state.report.progress.setdefault(f"hessian_batch_{b}_units", [])
        units_done.append(unit)
        state.mark(f"hessian_batch_{b}_units", units_done)
    key = f"hessian_products_batch_{b}"
    state.report.timings[key] = state.report.timings.get(key, 0) + source.products
