"""The export driver: read a plan or a run, check (and with ``snap="up"`` move) its layouts for the format,
write the recipe or the checkpoint into a staging folder beside ``out`` and rename it in.

Everything that can be refused (the format, its packages, the output folder, the source, an inexpressible
entry) is refused before anything is written; an error while writing removes the staging folder, so ``out``
is either complete or untouched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from qanalyze.errors import ConfigError, OutputDirError
from qanalyze.export.base import EXPORT_FILE, ExportRecord
from qanalyze.export.layouts import express


def check_out(out: str | Path, source: str | Path, *, overwrite: bool) -> Path:
    """Refuse an ``out`` that exists (unless ``overwrite``), is a file, or is the source itself."""
    from qanalyze.rundir import check_writable

    target = Path(out)
    resolved, given = target.resolve(), Path(source).resolve()
    if resolved == given or given in resolved.parents or resolved in given.parents:
        raise OutputDirError(f"--out {target} would overlap the input {source}; choose another folder")
    if target.exists() and not target.is_dir():
        raise OutputDirError(f"output path {target} exists and is not a directory")
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise OutputDirError(f"output directory {target} exists; pass --overwrite to replace it")
    check_writable(target)
    return target


@contextlib.contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """A fresh folder beside ``out``; on success it replaces ``out`` (an old ``out`` is removed only then),
    on error it is removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield staging
        staging.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def export(source: str | Path, format: str, out: str | Path, *, snap: str = "none", overwrite: bool = False,
           options: Mapping[str, Any] | None = None) -> ExportRecord:
    """Export plan file or run directory ``source`` to engine ``format`` in folder ``out``.

    A plan gives the format's recipe, a run a checkpoint of its exact codes (`qanalyze.export.base`);
    ``options`` are the format's settings (its `ExporterConfig` fields, e.g. ``{"checkpoint_format": "v2"}``
    for gptq). Returns
    the `ExportRecord` also written to ``out/export.json``. ConfigError (exit 2) for an unknown format, a
    missing package of the ``export`` extra, an entry the format cannot store without ``snap="up"`` (or at
    all: a run's codes are never moved), a run of another mode, or an ``out`` that exists without
    ``overwrite``.
    """
    from qanalyze.export.registry import get_exporter
    from qanalyze.export.source import read_source

    exporter = get_exporter(format)
    config = exporter.make_config(options)
    exporter.check_environment()
    target = check_out(out, source, overwrite=overwrite)
    read = read_source(source)
    if read.other and not exporter.ggml_types:
        name, layout = next(iter(read.other.items()))
        raise ConfigError(f"{exporter.name} cannot store {name} in llama.cpp type {layout}; it stores column "
                          f"groups ({len(read.other)} modules of {source} are in llama.cpp types)")
    expressed = express(read.layouts.values(), exporter.target, exporter.name, snap=snap, can_snap=not read.is_run)
    if not expressed.layouts and not read.other:
        raise ConfigError(f"nothing to export: {source} quantizes no linear layer")
    with staged_dir(target) as staging:
        if read.is_run:
            details = exporter.checkpoint(read, expressed, staging, config)
        else:
            details = {}
            for name, text in exporter.recipe(read, expressed, config).items():
                (staging / name).write_text(text, encoding="utf-8")
        files = {str(path.relative_to(staging)): path.stat().st_size
                 for path in sorted(staging.rglob("*")) if path.is_file()}
        record = ExportRecord(format=exporter.name, kind="checkpoint" if read.is_run else "recipe",
                              source=str(Path(source).resolve()), modules=len(expressed.layouts) + len(read.other),
                              exact=expressed.exact + len(read.other), snapped=[s.to_dict() for s in expressed.snapped],
                              files=files, details={"settings": dataclasses.asdict(config), **details})
        (staging / EXPORT_FILE).write_text(json.dumps(record.to_dict(), indent=1) + "\n", encoding="utf-8")
    return record
