"""Resumable training state: model weights, optimizer, scheduler, random state and progress.

A checkpoint is written to ``checkpoint.tmp`` and swapped in by renames, so a run killed at any
moment leaves at least one complete checkpoint behind (see `qanalyze.rundir.checkpoint_dir`).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from qanalyze.errors import RecordError
from qanalyze.records import CHECKPOINT_SCHEMA, atomic_write_json, read_record
from qanalyze.rundir import CHECKPOINT_DIR, CHECKPOINT_STATE, checkpoint_dir

_WEIGHTS = "model.safetensors"
_TRAINER = "trainer.pt"


def save_checkpoint(
    run: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    generators: Mapping[str, torch.Generator] | None = None,
    other_ranks: Sequence[Mapping[str, Any]] = (),
) -> Path:
    """Write a complete checkpoint of the training state into ``run/checkpoint`` and return it.

    ``generators`` are the engine's stochastic-rounding generators (by module name): their states
    are saved so a resumed quantized run draws the same roundings as an uninterrupted one.
    ``other_ranks`` are the `random_state` of ranks 1 to N-1 of a run on N ranks (each draws its own).
    """
    final = run / CHECKPOINT_DIR
    tmp = run / (CHECKPOINT_DIR + ".tmp")
    old = run / (CHECKPOINT_DIR + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        # save_model, unlike save_file, copes with tied parameters (GPT-2, LLaMA heads).
        safetensors.torch.save_model(model, str(tmp / _WEIGHTS))
        ranks = {"ranks": list(other_ranks)} if other_ranks else {}
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    **random_state(generators), **ranks}, tmp / _TRAINER)
        atomic_write_json(tmp / CHECKPOINT_STATE, {"schema": CHECKPOINT_SCHEMA, **state})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk leaves no half checkpoint behind
        raise
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_state(run: Path) -> dict[str, Any]:
    """The saved progress state of the newest checkpoint (step, settings, mode, plan hash), without loading
    any tensor."""
    folder = checkpoint_dir(run)
    if folder is None:
        raise RecordError(f"no complete checkpoint in {run}")
    return read_record(folder / CHECKPOINT_STATE, CHECKPOINT_SCHEMA)


def load_checkpoint(
    run: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    generators: Mapping[str, torch.Generator] | None = None,
    rank: int = 0,
) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and random state in place; return the saved progress state.
    ``rank`` r > 0 of a run on several ranks takes its own random state (``other_ranks[r - 1]``)."""
    folder = checkpoint_dir(run)
    if folder is None:
        raise RecordError(f"no complete checkpoint in {run}")
    state = read_record(folder / CHECKPOINT_STATE, CHECKPOINT_SCHEMA)
    device = next(model.parameters()).device
    missing, unexpected = safetensors.torch.load_model(model, str(folder / _WEIGHTS), strict=False,
                                                       device=str(device))
    if missing or unexpected:
        raise RecordError(f"checkpoint in {folder} does not fit this model "
                          f"(missing {len(missing)}, unexpected {len(unexpected)} tensors)")
    trainer = torch.load(folder / _TRAINER, map_location=device, weights_only=True)
    optimizer.load_state_dict(trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    if rank:
        others = trainer.get("ranks", [])
        if len(others) < rank:
            raise RecordError(f"checkpoint in {folder} has no random state for rank {rank}: it was made on fewer ranks")
        trainer = others[rank - 1]
    torch.set_rng_state(trainer["rng"]["cpu"].cpu())
    if "cuda" in trainer["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in trainer["rng"]["cuda"]])
    saved = trainer.get("generators", {})
    for name, generator in (generators or {}).items():
        if name not in saved:
            raise RecordError(f"checkpoint in {folder} has no random state for {name}: it was made with another plan")
        generator.set_state(saved[name].cpu())
    return state


def random_state(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """This process's random state as a checkpoint stores it: the global CPU (and CUDA) generators' states and
    ``generators``' states by name."""
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {"rng": rng, "generators": {name: generator.get_state() for name, generator in (generators or {}).items()}}


def discard_checkpoints(run: Path) -> None:
    """Remove every checkpoint folder of a finished run (they hold optimizer state, twice the model)."""
    for suffix in ("", ".old", ".tmp"):
        shutil.rmtree(run / (CHECKPOINT_DIR + suffix), ignore_errors=True)
