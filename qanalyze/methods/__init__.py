"""The registry of training and quantization methods (``--mode``): one module per method.

Adding a method is one module with a `Method` subclass (and its `MethodConfig`), plus one line in
``BUILTIN`` below; a method defined elsewhere (a plug-in, a test) calls `register`. The CLI's
``--mode`` choices and options, the run record's modes, the sweep's choices and `evaluate`'s loader
all come from here.
"""

from __future__ import annotations

import importlib

from qanalyze.errors import ConfigError
from qanalyze.methods.base import LoadedRun, Method, MethodConfig, Prepared, option

BUILTIN = (
    "qanalyze.methods.fp32",
    "qanalyze.methods.qat",
    "qanalyze.methods.integer",
    "qanalyze.methods.ptq_dynamic",
    "qanalyze.methods.int4",
    "qanalyze.methods.qdylora",
    "qanalyze.methods.rtn",
    "qanalyze.methods.gptq",
)
"""Modules of the methods qanalyze ships, each with a module-level ``METHOD``."""

METHODS: dict[str, Method] = {}
"""Every registered method by name, in registration order."""


def register(method: Method, *, replace: bool = False) -> Method:
    """Add ``method`` to the registry (ConfigError when its name is taken, unless ``replace``)."""
    if not method.name:
        raise ConfigError(f"{type(method).__name__} has no name")
    if method.name in METHODS and not replace:
        raise ConfigError(f"a method named {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a method from the registry (a test's toy method, say)."""
    METHODS.pop(name, None)


def get_method(name: str) -> Method:
    """The method registered under ``name``; ConfigError lists the known ones."""
    if name not in METHODS:
        raise ConfigError(f"unknown mode {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]


def method_names() -> tuple[str, ...]:
    """The registered methods' names."""
    return tuple(METHODS)


for _module in BUILTIN:
    register(importlib.import_module(_module).METHOD)

__all__ = ["METHODS", "LoadedRun", "Method", "MethodConfig", "Prepared", "get_method", "method_names", "option",
           "register", "unregister"]
