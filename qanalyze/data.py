"""Task data: read a task's train and dev examples from GLUE TSVs, data files or the hub, then
tokenize them once and serve padded batches in a reproducible, resumable order.

`--data` may be
1. a GLUE-layout folder holding the task's train and dev TSVs (``train.tsv``, ``dev.tsv``),
2. a GLUE root holding the task's folder (``glue/`` with ``--task sst2`` reads ``glue/SST-2/``),
3. CSV / TSV / JSON / JSONL / Parquet files, read through `datasets`: a folder holding
   ``train.<ext>`` and ``dev.<ext>`` or ``validation.<ext>``, a ``train.<ext>`` file with its dev
   file beside it, or ``TRAIN,DEV`` (two paths joined by a comma),
4. a hub dataset name (``nyu-mll/glue``), the only case that may download anything.
Files may use the task's GLUE column names or its hub column names. The ``lm`` task reads text
instead (`qanalyze.lm_sources`), cut into token windows once the tokenizer is known (`encode`).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qanalyze.errors import ConfigError, DataError
from qanalyze.lm_data import LMText, Windows, encode_text
from qanalyze.records import recorded_source
from qanalyze.tasks import AnyTask, LMTaskSpec, TaskSpec, get_task


@dataclass(frozen=True)
class Example:
    """One example: one or two texts and its label (a class index, or a float for regression)."""

    texts: tuple[str, ...]
    label: int | float


@dataclass
class TaskData:
    """A task's train and dev examples, where they came from, and an identity for records.

    ``identity`` holds task, source (as given), format ("glue" | "files" | "hub"), location (the
    absolute path(s) read, or the hub name), train_examples,
    dev_examples, and SHA-256 hashes of the selected examples: ``hash`` over both splits,
    ``train_hash`` and ``dev_hash`` over each. For the ``lm`` task ``train`` and ``dev`` are each one
    `LMText` (dev: the text the reported perplexity comes from) and the identity holds the text
    hashes and window settings instead of example counts (`qanalyze.lm_sources.load_lm_splits`).
    """

    task: AnyTask
    train: list[Example] | LMText
    dev: list[Example] | LMText
    source: str
    identity: dict[str, Any]

    def describe(self) -> str:
        """What the splits hold, for a progress line: example counts, or the lm task's text and windows."""
        if isinstance(self.train, LMText) and isinstance(self.dev, LMText):
            return (f"{self.train.seq_len}-token windows of {self.train.where} (train) and {self.dev.where} "
                    "(evaluation)")
        return f"{len(self.train)} train / {len(self.dev)} dev examples"


# ---------------------------------------------------------------------------------------------
# Reading raw columns


@dataclass
class _Columns:
    """The needed columns of one split, before labels are checked and mapped."""

    where: str  # file path or "hub-name [split]", for messages
    texts: list[list[Any]]  # one list per text column
    labels: list[Any]
    locate: Callable[[int], str]  # example index -> "line 12" / "row 12"
    ints_are_indices: bool  # hub labels are ClassLabel integers: the integer is the class index


def _resolve_columns(task: TaskSpec, present: Sequence[str], where: str) -> tuple[tuple[str, ...], str]:
    """Text and label column names to use: the task's GLUE names, else its hub names."""
    candidates = [(task.text_columns, task.label_column), (task.hub_texts, task.hub_label_column)]
    for texts, label in candidates:
        if all(name in present for name in (*texts, label)):
            return texts, label
    missing = next(name for name in (*task.text_columns, task.label_column) if name not in present)
    hub_names = (*task.hub_texts, task.hub_label_column)
    alternative = ""
    if hub_names != (*task.text_columns, task.label_column):
        alternative = f" (or the hub names {', '.join(repr(n) for n in hub_names)})"
    raise DataError(
        f"{where} has no column {missing!r} needed by task {task.name}{alternative}; "
        f"columns are: {', '.join(present) if present else '(none)'}"
    )


def _read_glue_tsv(path: Path, task: TaskSpec) -> _Columns:
    """Read a GLUE TSV with the csv module: tab-split, no quoting, BOM stripped, strict field count."""
    where = str(path)
    texts: list[list[str]] = []
    labels: list[str] = []
    lines: list[int] = []
    try:
        # utf-8-sig: the MRPC files start with a byte-order mark that would glue onto "Quality".
        # QUOTE_NONE: STS-B sentences hold unbalanced quotes that a quoting reader would join across lines.
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = list(task.columns) if task.columns is not None else next(reader, None)
            if header is None:
                raise DataError(f"{where} is empty: it has no header line")
            text_names, label_name = _resolve_columns(task, header, where)
            text_at = [header.index(name) for name in text_names]
            label_at = header.index(label_name)
            texts = [[] for _ in text_at]
            for row in reader:
                if not row:  # a blank line (often a trailing one) holds no example
                    continue
                if len(row) != len(header):
                    raise DataError(
                        f"{where} line {reader.line_num}: {len(row)} tab-separated fields, "
                        f"expected {len(header)} ({', '.join(header)})"
                    )
                for column, index in zip(texts, text_at):
                    column.append(row[index])
                labels.append(row[label_at])
                lines.append(reader.line_num)
    except UnicodeDecodeError as err:
        raise DataError(f"{where} is not UTF-8 text: {err}") from err
    except csv.Error as err:
        raise DataError(f"{where}: malformed TSV: {err}") from err
    except OSError as err:
        raise DataError(f"cannot read {where}: {err.strerror or err}") from err
    return _Columns(where, texts, labels, lambda i: f"line {lines[i]}", ints_are_indices=False)


# builder name and its options per file suffix, for datasets.load_dataset
_FILE_FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    # na_filter=False keeps empty cells and words such as "NA" or "null" as the text they are
    ".csv": ("csv", {"na_filter": False, "encoding": "utf-8-sig"}),
    ".tsv": ("csv", {"sep": "\t", "quoting": csv.QUOTE_NONE, "na_filter": False, "encoding": "utf-8-sig"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
}


def _datasets_errors() -> tuple[type[BaseException], ...]:
    from datasets.exceptions import DatasetsError

    return (OSError, ValueError, DatasetsError)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _read_data_file(path: Path, task: TaskSpec) -> _Columns:
    """Read a CSV / TSV / JSON / JSONL / Parquet file through `datasets`."""
    table = read_table(path, {*task.text_columns, *task.hub_texts})
    return _columns_of(table, task, str(path))


def read_table(path: Path, text_columns: Iterable[str]) -> Any:
    """A CSV / TSV / JSON / JSONL / Parquet file as a `datasets.Dataset`; DataError naming the file when it
    cannot be read. ``text_columns`` stay strings in CSV / TSV files."""
    import datasets  # imported here: it costs a second, and GLUE folders do not need it

    builder, options = _FILE_FORMATS[path.suffix.lower()]
    if builder == "csv":
        # pandas would read a text such as "1.50" as the number 1.5: keep every text column a string
        options = {**options, "converters": dict.fromkeys(sorted(text_columns), str)}
    # a local file converts in well under a second: its progress bars would only clutter the CLI's output
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(builder, data_files={"split": str(path)}, split="split", **options)
    except _datasets_errors() as err:
        raise DataError(f"cannot read {path}: {_one_line(err)}") from err
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()


def _columns_of(table: Any, task: TaskSpec, where: str, *, ints_are_indices: bool = False) -> _Columns:
    text_names, label_name = _resolve_columns(task, list(table.column_names), where)
    texts = [list(table[name]) for name in text_names]
    labels = list(table[label_name])
    return _Columns(where, texts, labels, lambda i: f"row {i + 1}", ints_are_indices=ints_are_indices)


def _read_hub(name: str, task: TaskSpec) -> tuple[_Columns, _Columns]:
    """Load a hub dataset (this may download: the user named it) and take its train and dev splits."""
    import datasets

    # The task's hub config ("sst2") names a config of the task's own hub dataset; another dataset has its own
    same_dataset = name.split("/")[-1] == task.hub_path.split("/")[-1]
    config = (task.hub_config or None) if same_dataset else None
    try:
        splits = datasets.load_dataset(name, config)
    except _datasets_errors() as err:
        raise DataError(
            f"cannot load '{name}': it is not a local path, and as a hub dataset: {_one_line(err)}"
        ) from err
    dev_split = next((s for s in (task.hub_dev_split, "validation", "dev") if s in splits), None)
    if "train" not in splits or dev_split is None:
        raise DataError(
            f"hub dataset '{name}' needs a train split and a '{task.hub_dev_split}' split; it has: {', '.join(splits)}"
        )
    return (
        _columns_of(splits["train"], task, f"{name} [train]", ints_are_indices=True),
        _columns_of(splits[dev_split], task, f"{name} [{dev_split}]", ints_are_indices=True),
    )


# ---------------------------------------------------------------------------------------------
# Finding the files


@dataclass
class _Source:
    format: str  # "glue" | "files" | "hub"
    location: str  # what is actually read: absolute path(s), or the hub name
    read: Callable[[], tuple[_Columns, _Columns]]


def _glue_source(train: Path, dev: Path, task: TaskSpec) -> _Source:
    location = str(train.parent.resolve()) if train.parent == dev.parent else f"{train.resolve()},{dev.resolve()}"
    return _Source("glue", location, lambda: (_read_glue_tsv(train, task), _read_glue_tsv(dev, task)))


def _files_source(train: Path, dev: Path, task: TaskSpec) -> _Source:
    location = f"{train.resolve()},{dev.resolve()}"
    return _Source("files", location, lambda: (_read_data_file(train, task), _read_data_file(dev, task)))


def _find_pair(folder: Path) -> tuple[Path, Path] | None:
    """train.<ext> and dev.<ext> or validation.<ext> in ``folder``, for the first suffix that has both."""
    for suffix in _FILE_FORMATS:
        train = folder / f"train{suffix}"
        for dev_stem in ("dev", "validation"):
            dev = folder / f"{dev_stem}{suffix}"
            if train.is_file() and dev.is_file():
                return train, dev
    return None


def _folder_source(folder: Path, task: TaskSpec) -> _Source:
    train, dev = folder / task.train_file, folder / task.dev_file
    if train.is_file() and dev.is_file():
        return _glue_source(train, dev, task)
    task_folder = folder / task.glue_dir
    if task_folder.is_dir() and not (train.is_file() or dev.is_file()):
        for path in (task_folder / task.train_file, task_folder / task.dev_file):
            if not path.is_file():
                raise DataError(
                    f"no {path.name} in {task_folder} (a GLUE root holds {task.glue_dir}/"
                    f"{task.train_file} and {task.glue_dir}/{task.dev_file} for task {task.name})"
                )
        return _glue_source(task_folder / task.train_file, task_folder / task.dev_file, task)
    pair = _find_pair(folder)
    if pair is not None:
        return _files_source(*pair, task)
    if train.is_file() or dev.is_file():
        missing = dev if train.is_file() else train
        raise DataError(
            f"no {missing.name} in {folder} (a GLUE-layout folder holds {task.train_file} and {task.dev_file})"
        )
    raise DataError(
        f"no {task.train_file} in {folder}: looked for {task.train_file} and {task.dev_file} there, "
        f"for a {task.glue_dir}/ folder, and for train and dev (or validation) "
        f"{'/'.join(_FILE_FORMATS)} files"
    )


def _file_source(path: Path, task: TaskSpec) -> _Source:
    if path.suffix.lower() not in _FILE_FORMATS:
        raise DataError(f"{path}: unsupported data file type; use one of {', '.join(_FILE_FORMATS)} or a folder")
    if path.name == task.train_file and (path.parent / task.dev_file).is_file():
        return _glue_source(path, path.parent / task.dev_file, task)
    if "train" in path.name:
        for dev_stem in ("dev", "validation"):
            dev = path.with_name(path.name.replace("train", dev_stem, 1))
            if dev.is_file():
                return _files_source(path, dev, task)
        raise DataError(
            f"no dev file beside {path}: looked for {path.name.replace('train', 'dev', 1)} "
            f"and {path.name.replace('train', 'validation', 1)}"
        )
    raise DataError(
        f"{path}: cannot tell train from dev; pass a folder, a train.<ext> file with dev.<ext> beside it, or TRAIN,DEV"
    )


# a hub id: "name" or "owner/name", no path syntax, no data-file suffix
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def _looks_like_hub_name(data: str) -> bool:
    return bool(_HUB_NAME.fullmatch(data)) and Path(data).suffix.lower() not in _FILE_FORMATS


def _pair_source(data: str, task: TaskSpec) -> _Source | None:
    parts = data.split(",")
    if len(parts) != 2:
        return None
    train, dev = (Path(p.strip()).expanduser() for p in parts)
    for path in (train, dev):
        if not path.is_file():
            raise DataError(f"data path not found: {path} (the {'train' if path is train else 'dev'} half of {data})")
    for path in (train, dev):
        if path.suffix.lower() not in _FILE_FORMATS:
            raise DataError(f"{path}: unsupported data file type; use one of {', '.join(_FILE_FORMATS)}")
    if train.name == task.train_file and dev.name == task.dev_file:
        return _glue_source(train, dev, task)
    return _files_source(train, dev, task)


def _find_source(data: str, task: TaskSpec) -> _Source:
    path = Path(data).expanduser()
    if path.is_dir():
        return _folder_source(path, task)
    if path.is_file():
        return _file_source(path, task)
    pair = _pair_source(data, task)
    if pair is not None:
        return pair
    if _looks_like_hub_name(data):
        return _Source("hub", data, lambda: _read_hub(data, task))
    raise DataError(f"data path not found: {data}")


# ---------------------------------------------------------------------------------------------
# Labels, examples, subsets


def _class_index(raw: Any, task: TaskSpec, ints_are_indices: bool) -> int | None:
    """The class index of a raw label, or None when it is not one of the task's labels."""
    labels = task.labels or ()
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)  # Parquet / pandas may store integer labels as floats
    is_int = isinstance(raw, int) and not isinstance(raw, bool)
    if is_int and ints_are_indices:
        return raw if 0 <= raw < len(labels) else None
    text = raw.strip() if isinstance(raw, str) else str(raw) if is_int else None
    if text in labels:
        return labels.index(text)
    # files written from a hub dataset hold the class index itself
    if is_int and 0 <= raw < len(labels):
        return raw
    return None


def _regression_value(raw: Any, task: TaskSpec, where: str) -> float:
    value = None
    if isinstance(raw, str):
        try:
            value = float(raw.strip())
        except ValueError:
            value = None
    elif isinstance(raw, (int, float)) and not isinstance(raw, bool):
        value = float(raw)
    if value is None or not math.isfinite(value):
        raise DataError(f"{where}: {task.name} label {raw!r} is not a number")
    if task.label_range is not None:
        low, high = task.label_range
        if not low <= value <= high:
            raise DataError(f"{where}: {task.name} label {value:g} is outside the range {low:g} to {high:g}")
    return value


def _examples(columns: _Columns, task: TaskSpec) -> list[Example]:
    if not columns.labels:
        raise DataError(f"{columns.where} holds no examples")
    examples = []
    for i, raw in enumerate(columns.labels):
        where = f"{columns.where} {columns.locate(i)}"
        if task.is_regression:
            label: int | float = _regression_value(raw, task, where)
        else:
            index = _class_index(raw, task, columns.ints_are_indices)
            if index is None:
                raise DataError(f"{where}: label {raw!r} is not one of {', '.join(task.labels)} for task {task.name}")
            label = index
        texts = []
        for column in columns.texts:
            text = column[i]
            if text is None:
                raise DataError(f"{where}: a text is missing")
            texts.append(text if isinstance(text, str) else str(text))
        examples.append(Example(tuple(texts), label))
    return examples


def _check_limit(name: str, value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a whole number of at least 1, or None for all; got {value!r}")


def _subset(examples: list[Example], limit: int | None, seed: int) -> list[Example]:
    """A seeded random choice of ``limit`` examples, kept in file order; all of them when None."""
    if limit is None or limit >= len(examples):
        return examples
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(examples), generator=generator)[:limit].sort().values
    return [examples[i] for i in chosen.tolist()]


def _hash(examples: Sequence[Example], split: str) -> str:
    digest = hashlib.sha256()
    for example in examples:
        line = json.dumps([split, list(example.texts), example.label], ensure_ascii=False)
        digest.update(line.encode("utf-8") + b"\n")
    return digest.hexdigest()


def _identity(task: TaskSpec, data: str, source: _Source, train: list[Example], dev: list[Example]) -> dict:
    train_hash, dev_hash = _hash(train, "train"), _hash(dev, "dev")
    return {
        "task": task.name,
        "source": recorded_source(data),
        "format": source.format,
        "location": source.location,
        "train_examples": len(train),
        "dev_examples": len(dev),
        "hash": hashlib.sha256(f"{train_hash}\n{dev_hash}".encode("ascii")).hexdigest(),
        "train_hash": train_hash,
        "dev_hash": dev_hash,
    }


def load_task(
    task: str | AnyTask,
    data: str,
    *,
    max_train_examples: int | None = None,
    max_eval_examples: int | None = None,
    seed: int = 0,
    seq_len: int | None = None,
    text_field: str | None = None,
) -> TaskData:
    """Read ``task``'s train and dev examples from ``data`` (see the module docstring for the forms).

    Every row is checked (columns present, label in the task's label set or range), then
    ``max_train_examples`` / ``max_eval_examples`` keep a random subset chosen by ``seed``, in file
    order. For the ``lm`` task the limits count windows, and ``seq_len`` / ``text_field`` replace the
    task's window length and text column (they apply to that task only). Raises DataError (one line,
    naming the file) for bad data, ConfigError for bad limits and UnknownTaskError for an unknown task name.
    """
    spec = task if isinstance(task, (TaskSpec, LMTaskSpec)) else get_task(task)
    _check_limit("max_train_examples", max_train_examples)
    _check_limit("max_eval_examples", max_eval_examples)
    if isinstance(data, os.PathLike):
        data = os.fspath(data)
    if not isinstance(data, str) or not data:
        raise DataError(f"data must name a folder, file or hub dataset, not {data!r}")
    given = {k: v for k, v in (("seq_len", seq_len), ("text_field", text_field)) if v is not None}
    if not isinstance(spec, LMTaskSpec):
        if given:
            raise ConfigError(f"{', '.join(given)} applies to language-model tasks (lm) only, not {spec.name}")
        return _load_examples(spec, data, max_train_examples, max_eval_examples, seed)
    from qanalyze.lm_sources import load_lm_splits

    spec = dataclasses.replace(spec, **given)
    splits = load_lm_splits(spec, data, max_train_windows=max_train_examples, max_eval_windows=max_eval_examples,
                            seed=seed)
    return TaskData(spec, splits.train, splits.dev, data, splits.identity)


def _load_examples(spec: TaskSpec, data: str, max_train_examples: int | None, max_eval_examples: int | None,
                   seed: int) -> TaskData:
    source = _find_source(data, spec)
    train_columns, dev_columns = source.read()
    train = _subset(_examples(train_columns, spec), max_train_examples, seed)
    dev = _subset(_examples(dev_columns, spec), max_eval_examples, seed)
    return TaskData(spec, train, dev, data, _identity(spec, data, source, train, dev))


# ---------------------------------------------------------------------------------------------
# Tokenizing and batching


@dataclass
class Encoded:
    """Tokenized examples: unpadded tokenizer outputs per example, and all labels as one tensor."""

    features: list[dict[str, list[int]]]
    labels: torch.Tensor

    def __len__(self) -> int:
        """Number of examples."""
        return len(self.features)


@functools.singledispatch
def encode(examples: Sequence[Example], tokenizer: Any, *, max_length: int = 128) -> Encoded:
    """Tokenize all examples in one batched call (text pairs for two-text tasks), truncated, unpadded.

    Labels become a long tensor when every label is an int, else float32 (regression). An `LMText` (the
    ``lm`` task's split) becomes its `Windows` instead: tokenized as a whole and cut into windows of
    the length its task set, so ``max_length`` does not apply to it.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ConfigError(f"max_length must be a whole number of at least 1, got {max_length!r}")
    arity = {len(example.texts) for example in examples}
    if len(arity) > 1:
        raise ValueError(f"examples mix one-text and two-text inputs ({sorted(arity)} texts)")
    is_regression = any(not isinstance(e.label, int) or isinstance(e.label, bool) for e in examples)
    dtype = torch.float32 if is_regression else torch.long
    labels = torch.tensor([e.label for e in examples], dtype=dtype)
    if not examples:
        return Encoded([], labels)
    columns = list(zip(*(example.texts for example in examples)))
    batch = tokenizer(*(list(c) for c in columns), truncation=True, max_length=max_length)
    names = list(batch.keys())
    features = [dict(zip(names, values)) for values in zip(*(batch[name] for name in names))]
    return Encoded(features, labels)


@encode.register
def _encode_lm_text(examples: LMText, tokenizer: Any, *, max_length: int = 128) -> Windows:
    return encode_text(examples, tokenizer)


@functools.singledispatch
def collate(encoded: Encoded, indices: Sequence[int], tokenizer: Any) -> dict[str, torch.Tensor]:
    """The examples at ``indices`` as one batch, padded to its longest example, with ``labels``; for the
    ``lm`` task's `Windows`, the windows at ``indices`` as their own labels (next-token loss)."""
    if tokenizer.pad_token is None:
        raise ConfigError("the tokenizer has no padding token; set tokenizer.pad_token (for example to its eos_token)")
    indices = list(indices)
    batch = tokenizer.pad([encoded.features[i] for i in indices], padding="longest", return_tensors="pt")
    out = dict(batch)
    out["labels"] = encoded.labels[indices]
    return out


@collate.register
def _collate_windows(windows: Windows, indices: Sequence[int], tokenizer: Any) -> dict[str, torch.Tensor]:
    ids = windows.input_ids[list(indices)]
    return {"input_ids": ids, "labels": ids}


def epoch_order(n: int, *, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a permutation of range(n) fixed by (seed, epoch).

    A fresh generator per epoch makes the order independent of anything drawn before, so a run
    resumed at any epoch sees the same order as an uninterrupted one.
    """
    generator = torch.Generator().manual_seed(seed * 1000003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def num_batches(n: int, batch_size: int) -> int:
    """Number of batches for ``n`` examples (the last one may be smaller)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch size must be a whole number of at least 1, got {batch_size!r}")
    if n < 0:
        raise ValueError(f"number of examples must be >= 0, got {n}")
    return -(-n // batch_size)


def iter_batches(
    encoded: Encoded | Windows,
    tokenizer: Any,
    *,
    batch_size: int,
    order: Sequence[int] | None = None,
    start: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of consecutive slices of ``order`` (default: file order), from batch index ``start``.

    ``start`` skips the batches a resumed run has already seen. Arguments are checked at the call,
    not at the first batch.
    """
    order = list(range(len(encoded))) if order is None else list(order)
    total = num_batches(len(order), batch_size)
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= total:
        raise ConfigError(f"start batch must lie in 0..{total}, got {start!r}")
    return (collate(encoded, order[b * batch_size : (b + 1) * batch_size], tokenizer) for b in range(start, total))
