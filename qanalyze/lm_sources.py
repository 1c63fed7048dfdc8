"""Where an ``lm`` task's text comes from: the train and evaluation text that `--data` names.

`--data` may be
1. a folder holding text files: the task's ``train_files`` (``train.txt``, else ``valid.txt``) for
   calibration and training, its ``eval_files`` (``test.txt``, else ``valid.txt``) for the reported
   figure (WikiText-2 as shipped in ``../shared/data/wikitext-2`` has valid.txt and test.txt),
2. one ``.txt`` file, or one JSON / JSONL / CSV / Parquet file whose ``text_field`` column holds the
   text (rows joined by newlines): the same text serves both splits,
3. ``TRAIN,EVAL``: two such files,
4. a hub dataset name, ``name`` or ``name:config`` (``wikitext:wikitext-2-raw-v1``), the only case that
   may download anything.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qanalyze.data import _FILE_FORMATS, _datasets_errors, _looks_like_hub_name, _one_line, read_table
from qanalyze.errors import DataError
from qanalyze.lm_data import LMText
from qanalyze.records import recorded_source
from qanalyze.tasks import LMTaskSpec

_TEXT_SUFFIX = ".txt"
_SUFFIXES = (_TEXT_SUFFIX, *(s for s in _FILE_FORMATS if s != ".tsv"))


@dataclass(frozen=True)
class LMSplits:
    """The train and evaluation text of an ``lm`` task, where they came from, and an identity for records."""

    train: LMText
    dev: LMText
    identity: dict[str, Any]


@dataclass(frozen=True)
class _Found:
    format: str  # "text" | "files" | "hub"
    location: str  # what is read: absolute path(s) or the hub name
    read: Callable[[], tuple[tuple[str, str], tuple[str, str]]]  # -> ((train text, where), (eval text, where))


def _read_txt(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text: {err}") from err
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from err


def _column_text(table: Any, field: str, where: str) -> str:
    if field not in table.column_names:
        raise DataError(
            f"{where} has no column {field!r} (--text-field); columns are: {', '.join(table.column_names) or '(none)'}"
        )
    return "\n".join("" if value is None else str(value) for value in table[field])


def _read_table(path: Path, field: str) -> str:
    return _column_text(read_table(path, (field,)), field, str(path))


def _read_file(path: Path, field: str) -> tuple[str, str]:
    text = _read_txt(path) if path.suffix.lower() == _TEXT_SUFFIX else _read_table(path, field)
    return text, str(path)


def _check_file(path: Path) -> Path:
    if not path.is_file():
        raise DataError(f"data path not found: {path}")
    if path.suffix.lower() not in _SUFFIXES:
        raise DataError(f"{path}: unsupported text file type; use one of {', '.join(_SUFFIXES)} or a folder")
    return path


def _files(train: Path, dev: Path, field: str, fmt: str) -> _Found:
    location = str(train.resolve()) if train == dev else f"{train.resolve()},{dev.resolve()}"
    return _Found(fmt, location, lambda: (_read_file(train, field), _read_file(dev, field)))


def _folder(folder: Path, spec: LMTaskSpec) -> _Found:
    def first(names: tuple[str, ...], role: str) -> Path:
        for name in names:
            if (folder / name).is_file():
                return folder / name
        raise DataError(f"no {' or '.join(names)} in {folder} (the {role} text of task {spec.name})")

    return _files(first(spec.train_files, "training"), first(spec.eval_files, "evaluation"), spec.text_field, "text")


def _hub(name: str, spec: LMTaskSpec) -> _Found:
    dataset, _, config = name.partition(":")

    def read() -> tuple[tuple[str, str], tuple[str, str]]:
        import datasets

        try:
            splits = datasets.load_dataset(dataset, config or None)
        except _datasets_errors() as err:
            raise DataError(
                f"cannot load '{name}': it is not a local path, and as a hub dataset: {_one_line(err)}"
            ) from err

        def pick(names: tuple[str, ...]) -> tuple[str, str]:
            split = next((s for s in names if s in splits), None)
            if split is None:
                raise DataError(f"hub dataset '{name}' has none of the splits {', '.join(names)}; it has: "
                                f"{', '.join(splits)}")
            where = f"{name} [{split}]"
            return _column_text(splits[split], spec.text_field, where), where

        return pick(spec.hub_train_splits), pick(spec.hub_eval_splits)

    return _Found("hub", name, read)


def _find(data: str, spec: LMTaskSpec) -> _Found:
    path = Path(data).expanduser()
    if path.is_dir():
        return _folder(path, spec)
    if path.is_file():
        return _files(_check_file(path), path, spec.text_field, "text" if path.suffix == _TEXT_SUFFIX else "files")
    parts = data.split(",")
    if len(parts) == 2:
        train, dev = (_check_file(Path(p.strip()).expanduser()) for p in parts)
        return _files(train, dev, spec.text_field, "files")
    dataset = data.partition(":")[0]
    if _looks_like_hub_name(dataset) and not data.endswith(_SUFFIXES):
        return _hub(data, spec)
    raise DataError(f"data path not found: {data}")


def _split_hash(text: str, split: str, settings: dict[str, Any]) -> str:
    # the text and every setting that decides which windows of it are scored
    head = json.dumps([split, sorted(settings.items())])
    return hashlib.sha256(f"{head}\n{text}".encode()).hexdigest()


def load_lm_splits(spec: LMTaskSpec, data: str, *, max_train_windows: int | None = None,
                   max_eval_windows: int | None = None, seed: int = 0) -> LMSplits:
    """Read the train and evaluation text ``data`` names for ``spec`` (see the module docstring).

    The windows are cut later, by the model's tokenizer (`qanalyze.lm_data.encode_text`); the identity
    hashes the text and every setting that decides the windows, so with the tokenizer (part of the
    model's identity) it fixes them.
    """
    found = _find(data, spec)
    (train_text, train_where), (dev_text, dev_where) = found.read()
    train = LMText(train_text, train_where, spec.seq_len, max_train_windows, seed)
    dev = LMText(dev_text, dev_where, spec.seq_len, max_eval_windows, seed)
    shared = {"seq_len": spec.seq_len, "text_field": spec.text_field, "seed": seed}
    train_hash = _split_hash(train_text, "train", {**shared, "max_windows": max_train_windows})
    dev_hash = _split_hash(dev_text, "dev", {**shared, "max_windows": max_eval_windows})
    identity = {
        "task": spec.name, "source": recorded_source(data), "format": found.format, "location": found.location,
        "train_text": recorded_source(train_where), "dev_text": recorded_source(dev_where),
        "train_chars": len(train_text), "dev_chars": len(dev_text),
        **shared, "max_train_windows": max_train_windows, "max_eval_windows": max_eval_windows,
        "hash": hashlib.sha256(f"{train_hash}\n{dev_hash}".encode("ascii")).hexdigest(),
        "train_hash": train_hash,
        "dev_hash": dev_hash,
    }
    return LMSplits(train, dev, identity)
