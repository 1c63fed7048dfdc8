"""The fine-tuning loop. FP32 fine-tuning is this loop with no plan; every method of `qanalyze.methods`
reuses it through the method's hooks: it prepares the model from the plan before the optimizer is
built, may draw something before each step (DyLoRA's rank), says whether it trains at all
(``ptq-dynamic`` runs no step and goes straight to evaluation), and saves the finished run its own way.

AdamW with a linear warm-up and decay, gradient clipping, evaluation at the end (and every N
steps when asked), a CSV log per step, and checkpoints that make a killed or interrupted run
resumable to the same numbers.

Under ``torchrun`` every rank runs this loop on its share of each global batch, and the ranks' gradients are
summed into the global batch's (`qanalyze.engine.data_parallel`); rank 0 alone writes the run directory, its
logs and checkpoints (which hold every rank's random state; a resumed run's ranks all read rank 0's checkpoint,
so across machines the run directory must lie on a filesystem they share). Every rank evaluates: the ranks hold
the same weights, so they compute the same figures in the time rank 0 alone would take, and no rank waits at a
collective for the length of an evaluation.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from transformers import get_linear_schedule_with_warmup

from qanalyze.bootstrap import metric_intervals
from qanalyze.data import Encoded, TaskData, encode, epoch_order, num_batches
from qanalyze.distributed import barrier, gather_objects, world
from qanalyze.engine.checkpoint import (
    checkpoint_state,
    discard_checkpoints,
    load_checkpoint,
    random_state,
    save_checkpoint,
)
from qanalyze.engine.data_parallel import (
    check_batch_size,
    check_last_batch,
    loss_items,
    rank_batches,
    rank_seed,
    reduce_step,
    seed_rank_generators,
    share_batch_statistics,
    sum_gradients,
)
from qanalyze.engine.distill import Teacher
from qanalyze.engine.evaluate import EvalResult, evaluate
from qanalyze.errors import ConfigError, Interrupted, NonFiniteError, QAnalyzeError
from qanalyze.interrupts import deferred_interrupt
from qanalyze.methods import Method, MethodConfig, Prepared, get_method
from qanalyze.models import LoadedModel
from qanalyze.records import BitPlan, RunRecord, as_json, atomic_write_text
from qanalyze.rundir import CHECKPOINT_DIR, EVALS_FILE, LOG_FILE, METRICS_FILE, save_predictions


class TrainingInterrupted(Interrupted):
    """Training stopped on Ctrl-C. ``kept`` says what the run directory holds: a checkpoint taken between
    two steps (resuming it gives the numbers of an uninterrupted run), or the trained model saved before
    the final evaluation; the CLI adds how to go on (``--resume``, or running a sweep again)."""

    def __init__(self, step: int, run: Path, kept: str) -> None:
        super().__init__(f"interrupted at step {step}; {kept}")
        self.step, self.run, self.kept = step, run, kept


class CheckpointMismatchError(ConfigError):
    """The checkpoint in a run directory was made with another plan, method, settings or data."""


class TrainingDiverged(QAnalyzeError):
    """The loss became NaN or infinite: not bad input but a finding about the plan or the settings (the
    CLI exits 3; a sweep records it as the run's status). The last periodic checkpoint is kept."""


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one fine-tuning run. Every field except ``save_every`` can change the numbers."""

    epochs: int = 3
    max_steps: int | None = None
    batch_size: int = 32
    lr: float = 1e-4
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    max_length: int = 128
    eval_every: int | None = None
    eval_batch_size: int = 64
    save_every: int = 100
    seed: int = 0
    device: str = "auto"
    distill: float = 0.0
    distill_temperature: float = 1.0

    def __post_init__(self) -> None:
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "max_length": self.max_length,
                    "eval_batch_size": self.eval_batch_size, "save_every": self.save_every}
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be at least 1, got {value}")
        for name in ("max_steps", "eval_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be at least 1, got {value}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup-ratio must lie in [0, 1), got {self.warmup_ratio}")
        if self.weight_decay < 0 or self.max_grad_norm <= 0:
            raise ConfigError("weight-decay must be >= 0 and max-grad-norm > 0")
        if not 0 <= self.distill <= 1 or not self.distill_temperature > 0:
            raise ConfigError(f"distill must lie in [0, 1] and distill-temperature be positive, got {self.distill} and "
                              f"{self.distill_temperature}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")

    def numbers(self) -> dict[str, Any]:
        """The settings that change the results (checked when a run is resumed). Without distillation its two
        settings are left out, so runs recorded before they existed still match."""
        skip = {"save_every", "device"} | ({"distill", "distill_temperature"} if not self.distill else set())
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}


@dataclass(frozen=True)
class StepLog:
    """One optimizer step, as written to ``log.csv`` and shown in progress bars."""

    step: int
    total_steps: int
    epoch: int
    loss: float
    lr: float
    grad_norm: float
    seconds: float


def resolve_device(name: str) -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU; ConfigError for any name but auto,
    cpu and cuda[:N]."""
    if name not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", name):
        raise ConfigError(f"device must be auto, cpu or cuda[:N], got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name} asked for, but no CUDA device is available")
    return torch.device(name)


def _parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # Biases and normalisation gains are not decayed: decay pulls them towards 0, which is not a prior.
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the model's trainable parameters, biases and normalisation gains not decayed.

    PyTorch's fused kernel where every parameter is floating point on a CPU or CUDA device: one pass
    over each tensor instead of the ten elementwise passes of the per-tensor loop that is the CPU
    default, which on minilm-l6's 22.7M parameters was a quarter of an FP32 training step.
    """
    groups = _parameter_groups(model, weight_decay)
    params = [p for group in groups for p in group["params"]]
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=lr, fused=True if fused else None)


def _csv(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _label_names(loaded: LoadedModel, data: TaskData) -> None:
    if getattr(data.task, "labels", None) is not None:
        loaded.model.config.id2label = dict(enumerate(data.task.labels))
        loaded.model.config.label2id = {label: i for i, label in enumerate(data.task.labels)}


class _Trainer:
    """State of one run; `train` is its only user."""

    def __init__(self, loaded: LoadedModel, data: TaskData, config: TrainConfig, run: Path,
                 plan: BitPlan | None, method: Method, method_config: MethodConfig,
                 on_prepare: Callable[[str, int, int, str], None] | None = None) -> None:
        self.loaded, self.data, self.config, self.run = loaded, data, config, run
        self.model = loaded.model.to(resolve_device(config.device))
        self.method, self.method_config, self.plan = method, method_config, plan
        self.mode = method.name
        # Copied before any module is quantized: the teacher is the model the run starts from.
        self.teacher = Teacher(self.model, config.distill, config.distill_temperature) if config.distill else None
        self.train_enc: Encoded = encode(data.train, loaded.tokenizer, max_length=config.max_length)
        self.dev_enc: Encoded = encode(data.dev, loaded.tokenizer, max_length=config.max_length)
        self.batches_per_epoch = num_batches(len(self.train_enc), config.batch_size)
        self.total_steps = (config.max_steps or config.epochs * self.batches_per_epoch) if method.trains else 0
        self.world = world()
        self.writes = self.world.is_main
        self.parallel = self.world.distributed and method.trains  # a post-training method shares no step
        if self.parallel:
            check_batch_size(config.batch_size)
            check_last_batch(len(self.train_enc), config.batch_size, self.total_steps)
        began = time.perf_counter()
        self.prepared: Prepared = method.prepare_with_data(self.model, plan, method_config, seed=config.seed,
                                                           calibration=self.train_enc, progress=on_prepare)
        self.prepare_seconds = time.perf_counter() - began  # a post-training method's whole quantization
        if self.parallel:
            seed_rank_generators(self.prepared.generators, self.prepared.shared_generators)
            share_batch_statistics(self.model)
        self.recorded = method.recorded(method_config)
        self.plan_hash = plan_hash(plan)
        self.optimizer = adamw(self.model, config.lr, config.weight_decay)
        self.scheduler = get_linear_schedule_with_warmup(
            self.optimizer, round(config.warmup_ratio * self.total_steps), max(self.total_steps, 1))
        self.step = 0
        self.log: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []
        self.train_seconds = 0.0
        self.last_saved = 0
        self.mid_step = False
        self.stop_agreed = False  # on several ranks: whether any rank was asked to stop at the last step

    @property
    def ranks(self) -> int:
        """How many ranks train the run (1 in one process)."""
        return self.world.size if self.parallel else 1

    def progress_state(self) -> dict[str, Any]:
        return {"step": self.step, "total_steps": self.total_steps, "settings": self.config.numbers(),
                "data_hash": self.data.identity.get("hash"), "model": self.loaded.identity,
                "mode": self.mode, "plan_hash": self.plan_hash, "method": as_json(self.recorded),
                "train_seconds": self.train_seconds, "log": self.log, "evals": self.evals,
                **({"ranks": self.ranks} if self.parallel else {})}

    def save(self) -> None:
        # Every rank gets here at the same step; rank 0 writes every rank's random state with its own.
        others = gather_objects(random_state(self._generators()))[1:] if self.parallel else []
        if self.writes:
            save_checkpoint(self.run, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                            state=self.progress_state(), generators=self._generators(), other_ranks=others)
        self.last_saved = self.step

    def restore(self) -> None:
        # The run's own settings are compared before its tensors are loaded: a checkpoint of another method
        # or plan holds other tensors, and "missing keys" would hide the reason.
        state = checkpoint_state(self.run)
        self._check_resumable(state)
        state = load_checkpoint(self.run, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                generators=self._generators(), rank=self.world.rank if self.parallel else 0)
        self.step, self.log, self.evals = state["step"], state["log"], state["evals"]
        self.train_seconds = state["train_seconds"]
        self.last_saved = self.step

    def _check_resumable(self, state: dict[str, Any]) -> None:
        if (state.get("mode", "fp32"), state.get("plan_hash")) != (self.mode, self.plan_hash):
            raise CheckpointMismatchError(f"cannot resume {self.run} with a different plan or mode (it was "
                                          f"{state.get('mode', 'fp32')}): start a new run directory")
        if state.get("method", {}) != as_json(self.recorded):
            raise CheckpointMismatchError(f"cannot resume {self.run} with different {self.mode} settings: start a "
                                          "new run directory")
        saved = state.get("settings", {})
        changed = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in self.config.numbers().items() if saved.get(k) != v]
        if changed:
            raise CheckpointMismatchError(f"cannot resume {self.run} with different settings: {', '.join(changed)}")
        if state.get("ranks", 1) != self.ranks:
            raise CheckpointMismatchError(f"cannot resume {self.run} on {self.ranks} rank(s): it was trained on "
                                          f"{state.get('ranks', 1)}, whose random states the checkpoint holds")
        if state.get("data_hash") != self.data.identity.get("hash"):
            raise CheckpointMismatchError(f"cannot resume {self.run}: the training/evaluation data differ from the "
                                          "saved run")

    def kept(self) -> str:
        """Where the last checkpoint is, for a message."""
        if self.last_saved:
            return f"the last checkpoint is step {self.last_saved} in {self.run / CHECKPOINT_DIR}"
        return f"no checkpoint was saved yet (--save-every {self.config.save_every})"

    def _generators(self) -> dict[str, torch.Generator]:
        return self.prepared.generators

    def evaluate(self) -> EvalResult:
        return evaluate(self.model, self.loaded.tokenizer, self.dev_enc, self.data.task,
                        batch_size=self.config.eval_batch_size, reference=self.prepared.reference)

    def one_step(self, batch: dict[str, torch.Tensor], epoch: int, stop: bool = False) -> StepLog:
        """One optimizer step on ``batch`` (this rank's share of the global batch); ``stop``: this rank was asked
        to stop (Ctrl-C), shared with the other ranks in ``stop_agreed``."""
        start = time.perf_counter()
        device = next(self.model.parameters()).device
        self.mid_step = True
        self.prepared.before_step()
        global_loss = None
        try:
            inputs = {k: v.to(device) for k, v in batch.items()}
            out = self.model(**inputs)
            loss = out.loss if self.teacher is None else self.teacher.mix(out.loss, out.logits, inputs)
            if self.parallel:
                global_loss = self._backward_across_ranks(loss, inputs, stop)
            else:
                if not torch.isfinite(loss):
                    raise NonFiniteError(f"loss {float(loss.detach())}")
                loss.backward()
        except NonFiniteError as exc:
            # The log up to the bad step is what tells a too-high lr from a plan that cannot train.
            self.log.append({"step": self.step + 1, "epoch": epoch, "loss": float("nan"),
                             "lr": self.scheduler.get_last_lr()[0], "grad_norm": float("nan"),
                             "seconds": round(time.perf_counter() - start, 4)})
            if self.writes:
                atomic_write_text(self.run / LOG_FILE, _csv(self.log))
            raise TrainingDiverged(f"training diverged at step {self.step + 1} ({exc}); the loss of every step is in "
                                   f"{self.run / LOG_FILE}; {self.kept()}") from None
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.mid_step = False
        seconds = time.perf_counter() - start
        self.train_seconds += seconds
        logged = float(loss.detach()) if global_loss is None else global_loss
        return StepLog(self.step, self.total_steps, epoch, logged, lr, float(grad_norm), seconds)

    def _backward_across_ranks(self, loss: torch.Tensor, inputs: dict[str, torch.Tensor], stop: bool) -> float:
        """The backward pass of this rank's share, weighted by its share of the global batch's items, and the
        gradients summed over the ranks; returns the global batch's loss. NonFiniteError on every rank when
        any rank's loss is not finite."""
        totals = reduce_step(loss, loss_items(self.model, inputs), stop)
        self.stop_agreed = totals.stop
        if not totals.finite:
            raise NonFiniteError(f"loss {totals.loss}")
        (loss * totals.weight).backward()
        sum_gradients(self.model.parameters())
        return totals.loss


def plan_hash(plan: BitPlan | None) -> str | None:
    """The sha256 of a plan's JSON (None without a plan): what a run records and a resume compares."""
    if plan is None:
        return None
    return hashlib.sha256(json.dumps(plan.to_dict(), sort_keys=True).encode()).hexdigest()


def _plan_summary(plan: BitPlan, prepared: Prepared) -> dict[str, Any]:
    return {"budget": plan.budget.get("text"), "totals": plan.totals, "sha256": plan_hash(plan),
            "swapped_modules": prepared.swapped}



def train(
    loaded: LoadedModel,
    data: TaskData,
    config: TrainConfig,
    run: str | Path,
    *,
    resume: bool = False,
    on_step: Callable[[StepLog], None] | None = None,
    on_eval: Callable[[int, EvalResult], None] | None = None,
    plan: BitPlan | None = None,
    mode: str = "fp32",
    plan_source: str | None = None,
    method_config: MethodConfig | None = None,
    on_prepare: Callable[[str, int, int, str], None] | None = None,
) -> RunRecord:
    """Fine-tune ``loaded.model`` on ``data`` into the run directory ``run`` and return its record.

    ``run`` must exist (see `qanalyze.rundir.prepare_run_dir`; the verb `qanalyze.train` makes it). With
    ``resume`` the newest checkpoint in ``run`` is restored first and must have been made with the same
    settings and data. ``mode`` names a method of `qanalyze.methods` (``fp32``: no plan, float); it
    prepares the model from ``plan`` with ``method_config`` (its default config when None), trains it
    (or not: ``ptq-dynamic``) and saves it its own way. ``plan_source`` (a path or ``uniform:N``) is
    recorded in ``metrics.json``; ``on_prepare(stage, done, total, detail)`` hears a long preparation (GPTQ's
    modules). The run holds ``metrics.json``, ``log.csv`` and ``evals.csv``; the
    checkpoint is removed at the end.
    """
    run = Path(run)
    method = get_method(mode)
    method_config = method_config if method_config is not None else method.make_config()
    if not isinstance(method_config, method.config_class):
        raise ConfigError(f"mode {mode} takes a {method.config_class.__name__}, not {type(method_config).__name__}")
    method.check(loaded.model, plan, method_config)
    trainer = _Trainer(loaded, data, config, run, plan, method, method_config, on_prepare)
    model = trainer.model
    # Dropout draws from the global generator: seed it for this run only and give the caller's state back.
    devices = [torch.cuda.current_device()] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(rank_seed(config.seed))
        if resume:
            trainer.restore()
        model.train()
        _train_steps(trainer, on_step, on_eval)
    try:
        record = _finish(trainer, on_eval, plan_source)
    except KeyboardInterrupt:
        kept = (f"the trained model is saved in {run / CHECKPOINT_DIR}; --resume evaluates it"
                if trainer.step and trainer.last_saved == trainer.step else "nothing was trained, so nothing is kept")
        raise TrainingInterrupted(trainer.step, run, f"during the final evaluation; {kept}") from None
    if trainer.writes:
        discard_checkpoints(run)
    barrier()  # on several ranks, none returns before rank 0 has written the run
    return record


def _train_steps(trainer: _Trainer, on_step: Callable[[StepLog], None] | None,
                 on_eval: Callable[[int, EvalResult], None] | None) -> None:
    """Run the remaining steps. A Ctrl-C is acted on between steps only, after a checkpoint of that state;
    the finished model is checkpointed too, so an interrupted final evaluation loses no training."""
    config, loaded = trainer.config, trainer.loaded
    with deferred_interrupt() as interrupt:

        def stopping() -> bool:
            # On several ranks a Ctrl-C counts from the step at which every rank has heard of it, so that they
            # save and stop at the same step.
            return trainer.stop_agreed if trainer.parallel else interrupt.requested

        try:
            while trainer.step < trainer.total_steps and not stopping():
                epoch, first = divmod(trainer.step, trainer.batches_per_epoch)
                order = epoch_order(len(trainer.train_enc), seed=config.seed, epoch=epoch)
                for batch in rank_batches(trainer.train_enc, loaded.tokenizer, batch_size=config.batch_size,
                                          order=order, start=first):
                    log = trainer.one_step(batch, epoch, interrupt.requested)
                    trainer.log.append({k: v for k, v in asdict(log).items() if k != "total_steps"})
                    if on_step is not None:
                        on_step(log)
                    done = trainer.step >= trainer.total_steps
                    if config.eval_every and trainer.step % config.eval_every == 0 and not done:
                        result = trainer.evaluate()
                        trainer.evals.append({"step": trainer.step, **result.to_dict()})
                        if on_eval is not None:
                            on_eval(trainer.step, result)
                    if done or stopping() or trainer.step % config.save_every == 0:
                        trainer.save()
                    if done or stopping():
                        break
        except KeyboardInterrupt:  # a second Ctrl-C, or one raised by a callback between steps
            if trainer.mid_step:  # weights, moments and random state of two different steps: not worth saving
                raise TrainingInterrupted(trainer.step, trainer.run,
                                          f"stopped inside a step without saving; {trainer.kept()}") from None
            if trainer.parallel:  # saving is a collective, which the ranks not interrupted here would not join
                raise TrainingInterrupted(trainer.step, trainer.run,
                                          f"stopped without saving; {trainer.kept()}") from None
            trainer.save()
            raise TrainingInterrupted(trainer.step, trainer.run,
                                      f"checkpoint saved in {trainer.run / CHECKPOINT_DIR}") from None
        if stopping():
            raise TrainingInterrupted(trainer.step, trainer.run, f"checkpoint saved in {trainer.run / CHECKPOINT_DIR}")


def _finish(trainer: _Trainer, on_eval: Callable[[int, EvalResult], None] | None,
            plan_source: str | None) -> RunRecord:
    """The final evaluation, the method's saved model, the logs and ``metrics.json``."""
    model, loaded, data, config, run = trainer.model, trainer.loaded, trainer.data, trainer.config, trainer.run
    trainer.prepared.before_eval()
    final = trainer.evaluate()
    trainer.evals.append({"step": trainer.step, **final.to_dict()})
    if on_eval is not None:
        on_eval(trainer.step, final)
    rank_metrics, rank_parameters = trainer.prepared.extra_evaluations(trainer.evaluate)
    _label_names(loaded, data)
    if trainer.writes:
        trainer.method.save(run, model, loaded.tokenizer, trainer.plan, trainer.method_config, trainer.prepared)
        atomic_write_text(run / LOG_FILE, _csv(trainer.log))
        atomic_write_text(run / EVALS_FILE, _csv(trainer.evals))
    intervals = {}
    if final.predictions is not None and final.labels is not None and len(final.labels):
        intervals = metric_intervals(data.task.metrics, final.predictions, final.labels, seed=config.seed)
        if trainer.writes:
            save_predictions(run, final.predictions, final.labels)
    steps = [row["seconds"] for row in trainer.log]
    plan = trainer.plan
    record = RunRecord(
        task=data.task.name, mode=trainer.mode, plan=plan_source, metrics=final.metrics,
        model=loaded.identity, data=data.identity,
        settings={**config.numbers(), "total_steps": trainer.total_steps, "device": str(model.device),
                  **({"ranks": trainer.ranks} if trainer.parallel else {}),
                  **({"plan": _plan_summary(plan, trainer.prepared)} if plan is not None else {}),
                  **trainer.recorded},
        timings={"train_seconds": round(trainer.train_seconds, 3),
                 "step_seconds_median": round(statistics.median(steps), 4) if steps else 0.0,
                 "eval_seconds": round(final.seconds, 3), "prepare_seconds": round(trainer.prepare_seconds, 3)},
        eval_history=trainer.evals, rank_metrics=rank_metrics, rank_parameters=rank_parameters, intervals=intervals,
    )
    if trainer.writes:
        record.save(run / METRICS_FILE)
    return record
