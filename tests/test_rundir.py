import pytest

from qanalyze.errors import OutputDirError
from qanalyze.records import CHECKPOINT_SCHEMA, atomic_write_json
from qanalyze.rundir import check_run_dir, checkpoint_dir, is_run_dir, prepare_run_dir


def test_new_and_empty_directories_are_accepted(tmp_path):
    assert prepare_run_dir(tmp_path / "a" / "run").is_dir()
    (tmp_path / "empty").mkdir()
    assert prepare_run_dir(tmp_path / "empty").is_dir()


def test_foreign_directory_is_refused_unless_overwrite(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="is not a qanalyze run; pass --overwrite"):
        check_run_dir(run)
    assert (run / "notes.txt").exists()
    prepare_run_dir(run, overwrite=True)
    assert list(run.iterdir()) == []


def test_resume_needs_a_checkpoint(tmp_path):
    with pytest.raises(OutputDirError, match="nothing to resume"):
        check_run_dir(tmp_path, resume=True)
    atomic_write_json(tmp_path / "checkpoint.old" / "state.json", {"schema": CHECKPOINT_SCHEMA, "step": 3})
    assert checkpoint_dir(tmp_path) == tmp_path / "checkpoint.old"
    assert is_run_dir(tmp_path)
    assert check_run_dir(tmp_path, resume=True) == tmp_path
    with pytest.raises(OutputDirError, match="a qanalyze run; pass --overwrite to replace it or --resume"):
        check_run_dir(tmp_path)
    with pytest.raises(OutputDirError, match="contradict"):
        check_run_dir(tmp_path, resume=True, overwrite=True)
