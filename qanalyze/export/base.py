"""The exporter plug-in: what one engine format implements, and the record ``qanalyze export`` writes.

An exporter is one module holding an `Exporter` subclass and one ``EXPORTER = ...`` line that
`qanalyze.export.registry` registers. It names the `qanalyze.quant.targets.TARGETS` entry that says which bits
and column layouts its engine loads (``target``), and implements three hooks:

- `Exporter.recipe`: the engine's recipe for a plan, as file name -> text;
- `Exporter.checkpoint`: a checkpoint of a run's exact codes, written into a staging folder;
- `Exporter.load`: the engine's own loader for such a checkpoint, giving a float-computing ``torch`` model
  the tests and ``benchmarks/export_check.py`` evaluate (never qanalyze's own loader).

The driver (`qanalyze.export.run.export`) reads the source, checks and snaps its layouts (`express`), stages
the output in a folder beside ``--out`` and renames it in, so a failure leaves nothing behind.
"""

from __future__ import annotations

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

    def check_environment(self) -> None:
        """ConfigError naming the missing packages of `requires`."""
        import importlib.util

        missing = [name for name in self.requires if importlib.util.find_spec(name) is None]
        if missing:
            raise ConfigError(f"--format {self.name} needs {', '.join(missing)}: pip install -e '.[export]'")

    def recipe(self, source: ExportSource, expressed: Expressed) -> dict[str, str]:
        """The engine's recipe for the plan: file name -> text."""
        raise NotImplementedError

    def checkpoint(self, source: ExportSource, expressed: Expressed, staging: Path) -> dict[str, Any]:
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
