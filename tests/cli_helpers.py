"""Running the command line in the test process, and what every refusal must look like: exit 2, one line on
stderr that starts with ``error:``, no traceback. Imported by the CLI tests (conftest puts this folder on the
path)."""

from __future__ import annotations

from qanalyze.cli import main


def run_cli(capfd, *args):
    """``qanalyze ARGS`` in this process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in args])
    out, err = capfd.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    """Exit 2 and one ``error:`` line holding every fragment."""
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
