"""Task registry: which columns hold the texts and the label, how labels map to class indices, and
which metrics judge a model, for the GLUE tasks, language modelling (``lm``) and any task described in
a JSON file.

A task is data, so a new task is configuration, not code: register one with :func:`register_task`,
or pass the path of a JSON file with the same field names to :func:`get_task`. Each spec class has a
``kind`` ("classification" for :class:`TaskSpec`, "lm" for :class:`LMTaskSpec`) that the data
loaders and evaluators are registered under; a task file selects it with a ``"kind"`` key.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from qanalyze.errors import ConfigError, UnknownTaskError
from qanalyze.metrics import METRICS

# F1 of the positive class (index 1) means nothing for regression or for more than two classes
_BINARY_METRICS = frozenset({"f1"})
_TUPLE_FIELDS = ("text_columns", "labels", "metrics", "columns", "label_range", "hub_text_columns")


@dataclass(frozen=True)
class TaskSpec:
    """One task: where its texts and label live (GLUE TSV and hub dataset), its labels and metrics.

    ``labels`` are the raw values as written in the GLUE files, in class-index order (the same order
    as the hub dataset's integer labels); ``None`` makes the task a regression. The first metric is
    the main one. ``columns`` names every column of a header-less TSV (CoLA). ``hub_text_columns``
    empty means the hub dataset uses the same names as the TSV.
    """

    name: str
    text_columns: tuple[str, ...]
    label_column: str
    labels: tuple[str, ...] | None
    metrics: tuple[str, ...]
    glue_dir: str
    train_file: str = "train.tsv"
    dev_file: str = "dev.tsv"
    columns: tuple[str, ...] | None = None
    label_range: tuple[float, float] | None = None
    hub_path: str = "nyu-mll/glue"
    hub_config: str = ""
    hub_text_columns: tuple[str, ...] = ()
    hub_label_column: str = "label"
    hub_dev_split: str = "validation"
    kind: ClassVar[str] = "classification"

    def __post_init__(self) -> None:
        for field in _TUPLE_FIELDS:
            value = getattr(self, field)
            if isinstance(value, str):
                raise ConfigError(f"task '{self.name}': {field} must be a list, not the string {value!r}")
            if isinstance(value, list):
                # JSON gives lists; a frozen spec must hold tuples to stay hashable and immutable
                object.__setattr__(self, field, tuple(value))
        _validate(self)

    @property
    def num_labels(self) -> int:
        """Number of model outputs: the number of classes, or 1 for regression."""
        return 1 if self.labels is None else len(self.labels)

    @property
    def is_regression(self) -> bool:
        """True when the label is a real number (``labels`` is None)."""
        return self.labels is None

    @property
    def main_metric(self) -> str:
        """The metric that ranks models for this task (the first one listed)."""
        return self.metrics[0]

    @property
    def hub_texts(self) -> tuple[str, ...]:
        """Text column names in the hub dataset (the TSV names when none are given)."""
        return self.hub_text_columns or self.text_columns

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict with the field names of the dataclass (tuples become lists)."""
        return {
            f.name: list(value) if isinstance(value, tuple) else value
            for f in dataclasses.fields(self)
            for value in [getattr(self, f.name)]
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskSpec:
        """Build a spec from a dict with the dataclass's field names; unknown or missing keys are errors.

        Label values may be given as numbers; they are read as the strings the files hold.
        """
        values = _checked_fields(cls, data)
        if isinstance(values.get("labels"), list):
            values["labels"] = [_label_text(v) for v in values["labels"]]
        return cls(**values)


def _checked_fields(cls: type, data: Any) -> dict[str, Any]:
    """``data`` as keyword arguments of the dataclass ``cls``; unknown or missing keys are ConfigErrors."""
    if not isinstance(data, dict):
        raise ConfigError(f"a task must be a JSON object, not {type(data).__name__}")
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown task field(s) {', '.join(unknown)}; fields are: {', '.join(known)}")
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [name for name in required if name not in data]
    if missing:
        raise ConfigError(f"task is missing field(s) {', '.join(missing)}")
    return dict(data)


LM_METRICS = ("perplexity",)
"""What an ``lm`` task reports: exp of the token-weighted mean next-token loss (`qanalyze.metrics.perplexity`)."""


@dataclass(frozen=True)
class LMTaskSpec:
    """Language modelling: text cut into windows of ``seq_len`` tokens, scored by next-token perplexity.

    ``train_files`` / ``eval_files`` are the file names looked for in a data folder, the first present
    one taken (WikiText-2 ships valid.txt for calibration and training and test.txt for the reported
    figure); ``text_field`` is the column read from JSON / CSV / Parquet files and hub datasets, whose
    splits are looked up in ``hub_train_splits`` / ``hub_eval_splits`` order. The model is the
    checkpoint's own causal LM: no classification head (``num_labels`` is None).
    """

    name: str = "lm"
    seq_len: int = 512
    text_field: str = "text"
    train_files: tuple[str, ...] = ("train.txt", "valid.txt")
    eval_files: tuple[str, ...] = ("test.txt", "valid.txt")
    hub_train_splits: tuple[str, ...] = ("train", "validation")
    hub_eval_splits: tuple[str, ...] = ("test", "validation")
    kind: ClassVar[str] = "lm"
    num_labels: ClassVar[None] = None
    is_regression: ClassVar[bool] = False
    metrics: ClassVar[tuple[str, ...]] = LM_METRICS

    def __post_init__(self) -> None:
        where = f"task '{self.name}'"
        for field in ("train_files", "eval_files", "hub_train_splits", "hub_eval_splits"):
            value = getattr(self, field)
            if isinstance(value, list):
                object.__setattr__(self, field, tuple(value))
            if not _is_names(getattr(self, field)) or not getattr(self, field):
                raise ConfigError(f"{where}: {field} must be a non-empty list of names, got {value!r}")
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"a task name must be a non-empty string, not {self.name!r}")
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ConfigError(f"{where}: seq_len must be a whole number of at least 2, got {self.seq_len!r}")
        if not isinstance(self.text_field, str) or not self.text_field:
            raise ConfigError(f"{where}: text_field must be a non-empty string, got {self.text_field!r}")

    @property
    def main_metric(self) -> str:
        """Perplexity: what ranks language models (lower is better)."""
        return self.metrics[0]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict with ``kind`` and the dataclass's fields (tuples become lists)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"kind": self.kind, **{k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LMTaskSpec:
        """Build a spec from a dict with the dataclass's field names (``kind`` may be given as "lm")."""
        values = dict(data) if isinstance(data, dict) else data
        if isinstance(values, dict) and values.get("kind", cls.kind) == cls.kind:
            values.pop("kind", None)
        return cls(**_checked_fields(cls, values))


AnyTask = TaskSpec | LMTaskSpec
"""A registered task of any kind."""

TASK_KINDS: dict[str, type] = {TaskSpec.kind: TaskSpec, LMTaskSpec.kind: LMTaskSpec}
"""Spec classes by ``kind``, as a task file's ``"kind"`` key names them."""


def _label_text(value: Any) -> Any:
    # Files hold labels as text, so a JSON 0 means the text "0"; booleans are no label text
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


def _is_names(value: Any) -> bool:
    return isinstance(value, tuple) and all(isinstance(v, str) and v for v in value)


def _validate(spec: TaskSpec) -> None:
    where = f"task '{spec.name}'"
    if not isinstance(spec.name, str) or not spec.name:
        raise ConfigError(f"a task name must be a non-empty string, not {spec.name!r}")
    if not _is_names(spec.text_columns) or not 1 <= len(spec.text_columns) <= 2:
        raise ConfigError(f"{where}: text_columns must name one or two columns, got {spec.text_columns!r}")
    if spec.label_column in spec.text_columns:
        raise ConfigError(f"{where}: label_column '{spec.label_column}' is also a text column")
    for field in ("label_column", "glue_dir", "train_file", "dev_file", "hub_label_column", "hub_dev_split"):
        value = getattr(spec, field)
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: {field} must be a non-empty string, got {value!r}")
    if spec.labels is not None:
        if not _is_names(spec.labels) or not spec.labels:
            raise ConfigError(f"{where}: labels must be a non-empty list of strings or null, got {spec.labels!r}")
        if len(set(spec.labels)) != len(spec.labels):
            raise ConfigError(f"{where}: labels repeat a value: {', '.join(spec.labels)}")
    if not _is_names(spec.metrics) or not spec.metrics:
        raise ConfigError(f"{where}: metrics must be a non-empty list of metric names, got {spec.metrics!r}")
    for metric in spec.metrics:
        if metric not in METRICS:
            raise ConfigError(f"{where}: unknown metric '{metric}'; known metrics: {', '.join(sorted(METRICS))}")
    binary_only = [m for m in spec.metrics if m in _BINARY_METRICS]
    if binary_only and spec.num_labels != 2:
        raise ConfigError(f"{where}: metric {binary_only[0]} needs exactly two labels, the task has {spec.num_labels}")
    if spec.columns is not None:
        if not _is_names(spec.columns):
            raise ConfigError(f"{where}: columns must be a list of column names, got {spec.columns!r}")
        absent = [c for c in (*spec.text_columns, spec.label_column) if c not in spec.columns]
        if absent:
            raise ConfigError(f"{where}: columns {list(spec.columns)} lack {', '.join(absent)}")
    if spec.hub_text_columns and (
        not _is_names(spec.hub_text_columns) or len(spec.hub_text_columns) != len(spec.text_columns)
    ):
        raise ConfigError(
            f"{where}: hub_text_columns must name as many columns as text_columns, got {spec.hub_text_columns!r}"
        )
    if not isinstance(spec.hub_path, str) or not isinstance(spec.hub_config, str):
        raise ConfigError(f"{where}: hub_path and hub_config must be strings")
    if spec.label_range is not None:
        if spec.labels is not None:
            raise ConfigError(f"{where}: label_range applies to regression tasks only (labels must be null)")
        low_high = spec.label_range
        if (
            len(low_high) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in low_high)
            or not all(math.isfinite(v) for v in low_high)
            or not low_high[0] < low_high[1]
        ):
            raise ConfigError(f"{where}: label_range must be [low, high] with low < high, got {low_high!r}")


def register_task(spec: AnyTask) -> None:
    """Add ``spec`` under ``spec.name``; re-registering an equal spec is a no-op.

    Raises ConfigError when the name is already taken by a different spec.
    """
    if not isinstance(spec, (TaskSpec, LMTaskSpec)):
        raise ConfigError(f"register_task needs a TaskSpec or an LMTaskSpec, not {type(spec).__name__}")
    if spec.name in TASKS and TASKS[spec.name] != spec:
        raise ConfigError(f"task '{spec.name}' is already registered with a different spec")
    TASKS[spec.name] = spec


def _normalize(name: str) -> str:
    # "SST-2", "STS-B" and "sst2" name the same task
    return name.lower().replace("-", "").replace("_", "")


def get_task(name: str) -> AnyTask:
    """The task registered as ``name`` (case and dashes ignored), or read from a ``.json`` task file.

    Raises UnknownTaskError listing the known task names, or ConfigError for an invalid task file.
    """
    if name in TASKS:
        return TASKS[name]
    by_normal = {_normalize(key): spec for key, spec in TASKS.items()}
    if _normalize(name) in by_normal:
        return by_normal[_normalize(name)]
    if name.endswith(".json") and Path(name).is_file():
        return _read_task_file(Path(name))
    hint = " (no such task file)" if name.endswith(".json") else ""
    raise UnknownTaskError(f"unknown task '{name}'{hint}; known tasks: {', '.join(sorted(TASKS))}")


def _read_task_file(path: Path) -> AnyTask:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read task file {path}: {err}") from err
    try:
        if not isinstance(data, dict):
            raise ConfigError(f"a task must be a JSON object, not {type(data).__name__}")
        fields = dict(data)
        kind = fields.pop("kind", TaskSpec.kind)
        if kind not in TASK_KINDS:
            raise ConfigError(f"unknown task kind {kind!r}; kinds are: {', '.join(TASK_KINDS)}")
        return TASK_KINDS[kind].from_dict(fields)
    except ConfigError as err:
        raise ConfigError(f"task file {path}: {err}") from err
    except TypeError as err:
        raise ConfigError(f"task file {path}: {err}") from err


_GLUE_TASKS = (
    TaskSpec(
        name="sst2",
        text_columns=("sentence",),
        label_column="label",
        labels=("0", "1"),
        metrics=("accuracy",),
        glue_dir="SST-2",
        hub_config="sst2",
    ),
    TaskSpec(
        name="mrpc",
        text_columns=("#1 String", "#2 String"),
        label_column="Quality",
        labels=("0", "1"),
        metrics=("f1", "accuracy"),
        glue_dir="MRPC",
        hub_config="mrpc",
        hub_text_columns=("sentence1", "sentence2"),
    ),
    TaskSpec(
        name="rte",
        text_columns=("sentence1", "sentence2"),
        label_column="label",
        labels=("entailment", "not_entailment"),
        metrics=("accuracy",),
        glue_dir="RTE",
        hub_config="rte",
    ),
    TaskSpec(
        name="stsb",
        text_columns=("sentence1", "sentence2"),
        label_column="score",
        labels=None,
        metrics=("pearson", "spearman"),
        glue_dir="STS-B",
        label_range=(0.0, 5.0),
        hub_config="stsb",
    ),
    TaskSpec(
        name="cola",
        text_columns=("sentence",),
        label_column="label",
        labels=("0", "1"),
        metrics=("mcc", "accuracy"),
        glue_dir="CoLA",
        # the original CoLA TSVs have no header row
        columns=("source", "label", "original_label", "sentence"),
        hub_config="cola",
    ),
    TaskSpec(
        name="qnli",
        text_columns=("question", "sentence"),
        label_column="label",
        labels=("entailment", "not_entailment"),
        metrics=("accuracy",),
        glue_dir="QNLI",
        hub_config="qnli",
    ),
    TaskSpec(
        name="mnli",
        text_columns=("sentence1", "sentence2"),
        label_column="gold_label",
        labels=("entailment", "neutral", "contradiction"),
        metrics=("accuracy",),
        glue_dir="MNLI",
        dev_file="dev_matched.tsv",
        hub_config="mnli",
        hub_text_columns=("premise", "hypothesis"),
        hub_dev_split="validation_matched",
    ),
    TaskSpec(
        name="qqp",
        text_columns=("question1", "question2"),
        label_column="is_duplicate",
        labels=("0", "1"),
        metrics=("f1", "accuracy"),
        glue_dir="QQP",
        hub_config="qqp",
    ),
)

TASKS: dict[str, AnyTask] = {spec.name: spec for spec in (*_GLUE_TASKS, LMTaskSpec())}
"""Registry of tasks by name (the GLUE tasks and ``lm``, plus any added with :func:`register_task`)."""
