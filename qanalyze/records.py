"""Versioned records on disk and the one way qanalyze writes files: atomically.

Every record carries ``"schema": "qanalyze/<kind>/v1"`` and the qanalyze version, so a file can
be checked before it is trusted. Writes go to a temporary file in the same folder, then
``os.replace`` it over the target: a reader never sees half a file, and a crash leaves the old
one (or none) in place.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import platform
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar, Self

from qanalyze.errors import RecordError
from qanalyze.plan.entries import FloatEntry, PlanEntry, entry_from_dict

RUN_SCHEMA = "qanalyze/run/v1"
CHECKPOINT_SCHEMA = "qanalyze/checkpoint/v1"
EVAL_SCHEMA = "qanalyze/eval/v1"


def qanalyze_version() -> str:
    """The installed qanalyze version (``0+unknown`` when run from a bare checkout)."""
    try:
        return metadata.version("qanalyze")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def environment() -> dict[str, str]:
    """Versions of the parts that change the numbers, and torch's CPU thread count, for provenance."""
    versions = {"qanalyze": qanalyze_version(), "python": platform.python_version()}
    for package in ("torch", "transformers", "datasets"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "absent"
    torch = sys.modules.get("torch")
    if torch is not None:
        # float reductions split by thread: the same run on 1 and 2 threads can differ in the last bits
        versions["torch_threads"] = str(torch.get_num_threads())
    return versions


def utc_now() -> str:
    """The current time in UTC, ISO 8601, to the second."""
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp makes the file private (0600); a record or page is as readable as any file the user makes
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def recorded_source(spec: str) -> str:
    """How a record stores a model or data argument: local paths resolved (each part of ``TRAIN,EVAL``), so
    that the same inputs give the same records from any working directory; names (an alias, a hub id, a
    hub dataset) as they are."""
    parts = spec.split(",")
    if all(part and Path(part).exists() for part in parts):
        return ",".join(str(Path(part).resolve()) for part in parts)
    return spec


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _json_safe(value: Any) -> Any:
    # JSON has no NaN or infinity; a metric that is undefined is written as null, not as invalid JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def as_json(value: Any) -> Any:
    """What ``value`` becomes once written to JSON and read back (tuples come back as lists): the form a
    setting must have to be compared with one read from a record."""
    return json.loads(json.dumps(value))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(_json_safe(obj), indent=2, sort_keys=False) + "\n")


def read_record(path: str | os.PathLike[str], schema: str) -> dict[str, Any]:
    """Read a JSON record and check its schema; any problem is a `RecordError` naming the file."""
    p = Path(path)
    if not p.is_file():
        raise RecordError(f"record not found: {p}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RecordError(f"{p} is corrupt or truncated: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecordError(f"{p} is not a readable JSON record ({exc.__class__.__name__})") from None
    if not isinstance(data, dict) or data.get("schema") != schema:
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise RecordError(f"{p} has schema {found!r}, expected {schema!r}")
    return data


class JsonRecord:
    """What every versioned record shares: JSON round trip with a schema check, atomic save, load.

    Subclasses are dataclasses with a ``schema`` field defaulting to their ``SCHEMA``; ``KIND``
    names the record in messages.
    """

    SCHEMA: ClassVar[str] = ""
    KIND: ClassVar[str] = "record"

    def to_dict(self) -> dict[str, Any]:
        """The record as plain JSON-ready data, schema first."""
        data = asdict(self)  # type: ignore[call-overload]
        return {"schema": data.pop("schema"), **data}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Rebuild and validate a record; unknown keys are ignored so newer files with extra fields load."""
        if data.get("schema") != cls.SCHEMA:
            raise RecordError(f"{cls.KIND} has schema {data.get('schema')!r}, expected {cls.SCHEMA!r}")
        known = set(cls.__dataclass_fields__)  # type: ignore[attr-defined]
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise RecordError(f"{cls.KIND} is incomplete: {exc}") from None

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the record atomically."""
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Self:
        """Read and validate a record."""
        return cls.from_dict(read_record(path, cls.SCHEMA))


@dataclass
class RunRecord(JsonRecord):
    """``metrics.json`` of a run directory: what was trained, on what, how, and how well."""

    task: str
    mode: str
    metrics: dict[str, float]
    model: dict[str, Any]
    data: dict[str, Any]
    settings: dict[str, Any]
    timings: dict[str, float]
    plan: str | None = None
    eval_history: list[dict[str, Any]] = field(default_factory=list)
    # qdylora: the dev metrics of the one trained run truncated to each rank ({"4": {"accuracy": ...}})
    rank_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    # qdylora: trainable parameters at each rank of rank_metrics (the adapters cut there, plus the task head)
    rank_parameters: dict[str, int] = field(default_factory=dict)
    # 95 % bootstrap interval of each metric over the dev examples ({"accuracy": [low, high]}; classification)
    intervals: dict[str, list[float]] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=environment)
    created: str = field(default_factory=utc_now)
    schema: str = RUN_SCHEMA
    SCHEMA: ClassVar[str] = RUN_SCHEMA
    KIND: ClassVar[str] = "run record"

    def __post_init__(self) -> None:
        from qanalyze.methods import method_names  # the registry: a plug-in's runs are runs too

        if self.mode not in method_names():
            raise RecordError(f"run mode {self.mode!r} is not one of {', '.join(method_names())}")


@dataclass
class EvalRecord(JsonRecord):
    """``eval-<task>-<split>.json``: one evaluation of a model or run on a task's split."""

    task: str
    split: str
    model: dict[str, Any]
    data: dict[str, Any]
    metrics: dict[str, float]
    loss: float
    settings: dict[str, Any]
    timings: dict[str, float]
    examples: int = 0
    # qdylora runs: the metrics of the adapters cut at each rank ({"4": {"accuracy": ...}})
    rank_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=environment)
    created: str = field(default_factory=utc_now)
    schema: str = EVAL_SCHEMA
    SCHEMA: ClassVar[str] = EVAL_SCHEMA
    KIND: ClassVar[str] = "eval record"


SENSITIVITY_SCHEMA = "qanalyze/sensitivity/v1"
MODULE_KINDS = ("linear", "embedding", "layernorm", "rmsnorm")


@dataclass
class SensitivityReport(JsonRecord):
    """``sensitivity.json``: per quantizable module, Hessian metrics and quantization errors.

    ``modules`` maps a fully qualified module name to its entry (keys fixed in DESIGN.md:
    kind, block, shape, params, hessian, weight_error, activation_error, gradient_error,
    delta_loss); ``blocks`` holds Q-BERT's per-layer eigenvalues; ``complete`` is false only in
    the ``.partial`` file a running analysis keeps for ``--resume``.
    """

    model: dict[str, Any]
    data: dict[str, Any]
    settings: dict[str, Any]
    modules: dict[str, dict[str, Any]]
    blocks: dict[str, dict[str, Any]] = field(default_factory=dict)
    model_level: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    progress: dict[str, Any] = field(default_factory=dict)
    complete: bool = False
    versions: dict[str, str] = field(default_factory=environment)
    created: str = field(default_factory=utc_now)
    schema: str = SENSITIVITY_SCHEMA
    SCHEMA: ClassVar[str] = SENSITIVITY_SCHEMA
    KIND: ClassVar[str] = "sensitivity record"

    def __post_init__(self) -> None:
        if "fingerprint" not in self.model:
            raise RecordError("sensitivity record lacks model.fingerprint")
        for name, entry in self.modules.items():
            if entry.get("kind") not in MODULE_KINDS:
                raise RecordError(f"sensitivity record: module {name} has kind {entry.get('kind')!r}")



PLAN_SCHEMA = "qanalyze/plan/v1"


@dataclass
class BitPlan(JsonRecord):
    """``plan.json``: the bit-width of every module's weights, activations and gradients.

    ``modules`` is the on-disk map from a module name to its entry (``{"weight_bits", "group", ...}`` or
    ``{"float": true}``); read it through `entries` or `entry`, which give typed records
    (`qanalyze.plan.entries`: `QuantizedEntry`, `FloatEntry`) with every default applied.
    ``model.modules`` records the architecture (name -> weight shape) the plan was made for, and
    ``model.fingerprint`` its hash: a plan applies to any checkpoint of that architecture.
    """

    model: dict[str, Any]
    budget: dict[str, Any]
    objective: str
    totals: dict[str, Any]
    modules: dict[str, dict[str, Any]]
    sensitivity: dict[str, Any] = field(default_factory=dict)
    solver: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    baseline: str | None = None
    # No creation time and no solve time: the same inputs must give a byte-identical plan.
    versions: dict[str, str] = field(default_factory=lambda: {"qanalyze": qanalyze_version()})
    schema: str = PLAN_SCHEMA
    SCHEMA: ClassVar[str] = PLAN_SCHEMA
    KIND: ClassVar[str] = "plan"

    def __post_init__(self) -> None:
        if "fingerprint" not in self.model or "modules" not in self.model:
            raise RecordError("plan lacks model.fingerprint or model.modules (the architecture it was made for)")
        for name, spec in self.modules.items():
            entry_from_dict(name, spec)  # validates; the records themselves are made on demand

    @property
    def entries(self) -> dict[str, PlanEntry]:
        """Every listed module's entry as a typed record, in file order.

        Read afresh from `modules` on each access: `modules` is a plain dict that callers (and tests) may
        change after loading, and a cached copy would silently disagree with it.
        """
        return {name: entry_from_dict(name, spec) for name, spec in self.modules.items()}

    def entry(self, name: str) -> PlanEntry:
        """The typed entry of module ``name``; a `FloatEntry` for a module the plan does not list."""
        spec = self.modules.get(name)
        return FloatEntry(name) if spec is None else entry_from_dict(name, spec)



SWEEP_SCHEMA = "qanalyze/sweep/v1"


@dataclass
class SweepRecord(JsonRecord):
    """``sweep.json``: one row per budget x plan (and per uniform integer reference) with its metrics.

    Each row holds ``budget``, ``plan`` (hessian, uniform, random, reversed or int<N>), ``mode``,
    ``run`` and ``plan_file`` (relative to the sweep folder), the plan's totals (``weight_bits_mean``,
    ``weight_bytes``, ``compression``, ``predicted_damage``, ...), ``metrics``, ``metric`` (the task's
    main one), ``value``, ``delta_pts`` (against ``fp32``, in points), ``status`` and timings.
    ``complete`` is false while the sweep is still running.
    """

    model: dict[str, Any]
    data: dict[str, Any]
    settings: dict[str, Any]
    sensitivity: dict[str, Any]
    fp32: dict[str, Any]
    rows: list[dict[str, Any]]
    timings: dict[str, float] = field(default_factory=dict)
    complete: bool = False
    versions: dict[str, str] = field(default_factory=environment)
    created: str = field(default_factory=utc_now)
    schema: str = SWEEP_SCHEMA
    SCHEMA: ClassVar[str] = SWEEP_SCHEMA
    KIND: ClassVar[str] = "sweep record"

    def __post_init__(self) -> None:
        for row in self.rows:
            missing = {"plan", "mode", "run", "metrics"} - set(row)
            if missing:
                raise RecordError(f"sweep record: a row lacks {', '.join(sorted(missing))}")
