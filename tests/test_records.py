import json
import os

import pytest

from qanalyze.errors import RecordError
from qanalyze.records import RUN_SCHEMA, RunRecord, atomic_path, atomic_write_json, read_record


def _record(**overrides):
    fields = dict(task="sst2", mode="fp32", metrics={"accuracy": 0.9}, model={"source": "m"},
                  data={"task": "sst2"}, settings={"seed": 0}, timings={"train_seconds": 1.0})
    fields.update(overrides)
    return RunRecord(**fields)


def test_run_record_round_trip(tmp_path):
    record = _record()
    record.save(tmp_path / "metrics.json")
    raw = json.loads((tmp_path / "metrics.json").read_text())
    assert raw["schema"] == RUN_SCHEMA
    assert next(iter(raw)) == "schema"
    assert "torch" in raw["versions"]
    assert RunRecord.load(tmp_path / "metrics.json") == record


def test_run_record_rejects_unknown_mode():
    with pytest.raises(RecordError, match="run mode"):
        _record(mode="int3")


def test_read_record_checks_schema(tmp_path):
    atomic_write_json(tmp_path / "x.json", {"schema": "qanalyze/plan/v1"})
    with pytest.raises(RecordError, match="expected 'qanalyze/run/v1'"):
        read_record(tmp_path / "x.json", RUN_SCHEMA)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(RecordError, match="corrupt or truncated: not valid JSON"):
        read_record(tmp_path / "bad.json", RUN_SCHEMA)
    with pytest.raises(RecordError, match="not found"):
        read_record(tmp_path / "missing.json", RUN_SCHEMA)


def test_non_finite_numbers_become_null(tmp_path):
    atomic_write_json(tmp_path / "m.json", {"pearson": float("nan"), "x": [float("inf"), 1.0]})
    assert json.loads((tmp_path / "m.json").read_text()) == {"pearson": None, "x": [None, 1.0]}


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "out.json"
    atomic_write_json(target, {"v": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash while writing")
    assert json.loads(target.read_text()) == {"v": 1}
    assert os.listdir(tmp_path) == ["out.json"]
