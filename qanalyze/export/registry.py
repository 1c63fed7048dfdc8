"""The registry of export formats (``--format``): every module of `qanalyze.export` holding a module-level
``EXPORTER`` is registered under that exporter's name, so a new format is one module dropped into the package
(``qanalyze/export/llama_cpp.py`` with ``EXPORTER = LlamaCppExporter()``) and nothing else to edit. A format
defined elsewhere (a plug-in, a test) calls `register_exporter`. The exporter modules import their engines
inside their hooks, so reading the registry stays cheap.
"""

from __future__ import annotations

import importlib
import pkgutil

from qanalyze.errors import ConfigError
from qanalyze.export.base import Exporter

EXPORTERS: dict[str, Exporter] = {}
"""Every registered exporter by ``--format`` name."""


def register_exporter(exporter: Exporter, *, replace: bool = False) -> Exporter:
    """Add ``exporter`` to the registry (ConfigError when it lacks a name or target, or its name is taken,
    unless ``replace``)."""
    problem = ("needs a name and a target" if not (exporter.name and exporter.target) else
               "is named like one already registered" if exporter.name in EXPORTERS and not replace else None)
    if problem:
        raise ConfigError(f"exporter {type(exporter).__name__} ({exporter.name!r}) {problem}")
    EXPORTERS[exporter.name] = exporter
    return exporter


def get_exporter(name: str) -> Exporter:
    """The exporter of format ``name``; ConfigError listing the known formats."""
    if name not in EXPORTERS:
        raise ConfigError(f"unknown export format {name!r}; known: {', '.join(sorted(EXPORTERS))}")
    return EXPORTERS[name]


def _discover() -> None:
    import qanalyze.export as package

    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda info: info.name):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        exporter = getattr(module, "EXPORTER", None)
        if isinstance(exporter, Exporter) and exporter.name not in EXPORTERS:
            register_exporter(exporter)


_discover()
