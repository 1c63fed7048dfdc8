"""What the command line prints for records: the most-sensitive table of an analysis without Hessian figures."""

from __future__ import annotations

import io
from types import SimpleNamespace

from rich.console import Console

from qanalyze.cli_output import print_most_sensitive


def _printed(report) -> str:
    buffer = io.StringIO()
    print_most_sensitive(report, Console(file=buffer, width=200), count=2)
    return buffer.getvalue()


def test_an_analysis_without_hessian_ranks_by_the_fisher_score():
    modules = {name: {"hessian": [], "params": 64, "fisher_error": {"3": {"g32": score, "row": 1.0}}}
               for name, score in (("a", 1e-4), ("b", 3e-4), ("c", 2e-4))}
    printed = _printed(SimpleNamespace(modules=modules))
    assert "Fisher score" in printed and "3 bits, g32" in printed
    assert printed.index("b") < printed.index("c") and " a " not in printed  # the top two, largest first


def test_an_analysis_with_hessian_ranks_by_omega():
    modules = {"a": {"hessian": {"omega": 2.0, "avg_trace": 1.0}}, "b": {"hessian": {"omega": 5.0}}}
    printed = _printed(SimpleNamespace(modules=modules))
    assert "Ω" in printed and printed.index("b") < printed.index("a")
