"""The exporter plug-in: what one engine format implements, and the record ``qanalyze export`` writes.

An exporter is one module holding an `Exporter` subclass and one ``EXPORTER = ...`` line that
`qanalyze.export.registry` registers. It names the `qanalyze.quant.targets.TARGETS` entry that says which bits
and column layouts its engine loads (``target``), and implements three hooks:

- `Exporter.recipe`: the engine's recipe for a plan, as file name -> text;
- `Exporter.checkpoint`: a checkpoint of a run's exact codes, written into a staging folder;
- `Exporter.load`: the engine's own loader for such a checkpoint, giving a float-computing ``torch`` model
  the tests and ``benchmarks/export_check.py`` evaluate (never qanalyze's own loader).

An exporter with settings names an `ExporterConfig` subclass (``config_class``) whose fields are made with
`export_option`: the command line offers each as ``--<format>-<field>`` (``--gptq-checkpoint-format``), read
from the field's choices and help, as the methods' options are.

The driver (`qanalyze.export.run.export`) reads the source, checks and snaps its layouts (`express`), stages
the output in a folder beside ``--out`` and renames it in, so a failure leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from qanalyze.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from qanalyze.export.layouts import Expressed
    from qanalyze.export.source import ExportSource

EXPORT_FILE = "export.json"
"""The record every export folder holds (`ExportRecord`)."""

EXPORT_SCHEMA = "qanalyze/export/v1"


def export_option(default: str, *, choices: tuple[str, ...], help: str) -> Any:
    """A field of an `ExporterConfig`: its default, the values it takes and its ``--help`` line."""
    return field(default=default, metadata={"choices": choices, "help": help})


@dataclass(frozen=True)
class ExporterConfig:
    """An exporter's settings (none unless a subclass adds fields with `export_option`)."""

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            choices = item.metadata.get("choices")
            if choices and getattr(self, item.name) not in choices:
                raise ConfigError(f"{item.name.replace('_', '-')} must be one of {', '.join(choices)}, not "
                                  f"{getattr(self, item.name)!r}")


class Exporter:
    """One engine format. Subclasses set the class attributes and implement the hooks."""

    name: ClassVar[str] = ""
    """The ``--format`` name."""
    target: ClassVar[str] = ""
    """The `TARGETS` entry listing the (bits, layout) pairs the engine loads."""
    description: ClassVar[str] = ""
    """One line for ``--help`` and error messages."""
    requires: ClassVar[tuple[str, ...]] = ()
    """Python packages the hooks import (the ``export`` extra); checked before anything is read."""
    config_class: ClassVar[type[ExporterConfig]] = ExporterConfig
    """The exporter's settings."""
    ggml_types: ClassVar[bool] = False
    """Whether the format also stores modules in llama.cpp (GGML) types (`ExportSource.other`); the driver
    refuses such modules, by name, for a format that does not."""

    def make_config(self, values: Mapping[str, Any] | None = None) -> ExporterConfig:
        """The config from ``values`` (field name -> value); ConfigError naming an unknown setting."""
        known = {item.name for item in dataclasses.fields(self.config_class)}
        unknown = sorted(set(values or {}) - known)
        if unknown:
            raise ConfigError(f"--format {self.name} has no setting {', '.join(unknown)}"
                              + (f"; it takes {', '.join(sorted(known))}" if known else ""))
        return self.config_class(**dict(values or {}))

    def check_environment(self) -> None:
        """ConfigError naming the missing packages of `requires`."""
        import importlib.util

        missing = [name for name in self.requires if importlib.util.find_spec(name) is None]
        if missing:
            raise ConfigError(f"--format {self.name} needs {', '.join(missing)}: pip install -e '.[export]'")

    def recipe(self, source: ExportSource, expressed: Expressed, config: ExporterConfig) -> dict[str, str]:
        """The engine's recipe for the plan: file name -> text."""
        raise NotImplementedError

    def checkpoint(self, source: ExportSource, expressed: Expressed, staging: Path,
                   config: ExporterConfig) -> dict[str, Any]:
        """Write the run's codes into ``staging`` as the engine's checkpoint; returns facts for export.json
        (the format's variant, say)."""
        raise NotImplementedError

    def load(self, path: Path) -> torch.nn.Module:
        """The checkpoint in ``path`` loaded by the engine's own code, in eval mode."""
        raise NotImplementedError

    def overhead_bytes(self, expressed: Expressed) -> int:
        """Bytes the checkpoint stores beyond the plan's weight bytes (the format's known overhead: wider
        scales, unpacked codes, index tensors); `benchmarks/export_check.py` compares file sizes with it."""
        return 0


@dataclass
class ExportRecord:
    """``export.json``: what was exported, to which format, which modules were snapped, and the files."""

    format: str
    kind: str
    source: str
    modules: int
    exact: int
    snapped: list[dict[str, str]]
    files: dict[str, int]
    details: dict[str, Any] = field(default_factory=dict)
    schema: str = EXPORT_SCHEMA

    @property
    def total_bytes(self) -> int:
        """Bytes of every file written (export.json excluded)."""
        return sum(self.files.values())

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-ready data."""
        return {"schema": self.schema, "format": self.format, "kind": self.kind, "source": self.source,
                "modules": self.modules, "exact": self.exact, "snapped": self.snapped, "files": self.files,
                "details": self.details}
