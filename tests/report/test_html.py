"""render_report and `qanalyze report`: sections from whatever records exist, PNGs beside the page, no
network references, and bad input refused with one line and no page."""

import re

import pytest

from qanalyze.cli import main
from qanalyze.errors import RecordError
from qanalyze.report.html import SECTIONS, render_report
from qanalyze.report.inputs import collect


def test_a_sweep_folder_fills_every_section(sweep_folder, tmp_path):
    inputs = collect([sweep_folder])
    assert inputs.plan is not None and inputs.plan.budget["text"] == "4bit" and inputs.sensitivity is not None
    result = render_report(inputs, tmp_path / "r.html", png_dir=tmp_path / "png")
    assert result.filled == list(SECTIONS)
    html = (tmp_path / "r.html").read_text()
    assert {p.name for p in result.pngs} == {"sensitivity.png", "density.png", "weight-error.png",
                                             "activation-error.png", "gradient-error.png", "plan.png", "pareto.png",
                                             "ranks.png", "predictors.png", "layers.png"}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in result.pngs)
    # self-contained: nothing is fetched from anywhere
    assert not re.search(r"""(src|href)=["'](https?:)?//""", html)
    assert "the Hessian plan reaches" in html and "Spearman" in html
    # two training modes of the same plans: each verdict names its mode; the int4 reference is named as such
    assert "At 4bit (qdylora) the Hessian plan reaches" in html and "int4 training (4-bit)" in html
    assert "4bit hessian: best at rank 4 with 84.00 (-1.00 pt against FP32), 4 ranks from one run." in html


@pytest.mark.parametrize("given, filled", [
    ("sensitivity.json", {"provenance", "sensitivity", "errors", "predictors"}),
    ("plans/plan-3bit.json", {"provenance", "plan"}),
])
def test_each_record_alone_makes_a_report(sweep_folder, tmp_path, given, filled):
    result = render_report(collect([sweep_folder / given]), tmp_path / "r.html")
    assert set(result.filled) == filled and result.pngs == []
    html = (tmp_path / "r.html").read_text()
    assert all(f'id="{section}"' in html for section in SECTIONS)


def test_report_command_writes_page_and_figures(capfd, sweep_folder, tmp_path):
    out = tmp_path / "site" / "report.html"
    assert main(["report", str(sweep_folder), "--out", str(out)]) == 0
    stdout, _ = capfd.readouterr()
    assert stdout.strip() == str(out) and out.is_file()
    assert len(list((tmp_path / "site" / "report-figures").glob("*.png"))) == 10


def test_bad_report_inputs_get_one_line_and_no_page(capfd, tmp_path, sweep_folder):
    (tmp_path / "notes.json").write_text('{"hello": 1}')
    for bad, fragment in ((tmp_path / "missing", "not found"), (tmp_path / "notes.json", "holds no")):
        assert main(["report", str(bad), "--out", str(tmp_path / "r.html")]) == 2
        _, err = capfd.readouterr()
        assert len(err.strip().splitlines()) == 1 and fragment in err and "Traceback" not in err
    assert not (tmp_path / "r.html").exists()
    with pytest.raises(RecordError, match="nothing to report"):
        render_report(collect([]), tmp_path / "r.html")


def _run(folder, mode, accuracy, plan=None):
    from qanalyze.records import RunRecord

    folder.mkdir()
    data = {"task": "sst2", "dev_hash": "ef" * 32}
    settings = {"plan": {"budget": "4bit", "totals": plan.totals}} if plan is not None else {}
    RunRecord(task="sst2", mode=mode, metrics={"accuracy": accuracy}, model={"source": "tiny-bert"}, data=data,
              settings=settings, timings={"train_seconds": 10.0}).save(folder / "metrics.json")
    return folder


def test_single_runs_make_a_pareto_section(sweep_folder, tmp_path):
    from qanalyze.records import BitPlan

    plan = BitPlan.load(sweep_folder / "plans" / "plan-4bit.json")
    fp32 = _run(tmp_path / "fp32", "fp32", 0.85)
    quantized = _run(tmp_path / "int", "int", 0.83, plan)
    inputs = collect([sweep_folder / "sensitivity.json", sweep_folder / "plans" / "plan-4bit.json", fp32, quantized])
    assert len(inputs.runs) == 2 and inputs.plan.budget["text"] == "4bit"
    result = render_report(inputs, tmp_path / "r.html")
    assert "pareto" in result.filled
    html = (tmp_path / "r.html").read_text()
    assert "Single runs" in html and "-2" in html  # the integer run's 2-point loss against the FP32 run
