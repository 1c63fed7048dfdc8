"""Bad input and failing ranks under torchrun: more ranks than calibration batches is one line from rank 0 and
exit 2 on every rank; a rank that fails stops the others with its message; a rank that is killed stops the
others within the collective timeout and leaves a partial file one process resumes (`qanalyze.launch`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from rank_helpers import free_port, messages, one_process, rank_env, two_ranks


def test_more_ranks_than_calibration_windows_exit_2_with_one_line(tmp_path, tiny_llama_dir, wikitext_sample_dir):
    ranks = two_ranks("-m", "qanalyze", "analyze", str(tiny_llama_dir), "--task", "lm", "--data",
                   str(wikitext_sample_dir), "--seq-len", "32", "--batches", "1", "--batch-size", "1",
                   "--metrics", "weights", "--out", str(tmp_path / "s.json"))
    assert [r.returncode for r in ranks] == [2, 2]
    assert messages(ranks[0].stderr) == ["error: 2 ranks need at least 2 calibration batches (--batches, times "
                                          "--batch-size for task lm, whose windows are batches of one); there are 1"]
    assert messages(ranks[1].stderr) == [] and ranks[1].stdout == ""
    assert not list(tmp_path.iterdir())


FAILING_RANK = """
import sys
from qanalyze import distributed
from qanalyze.errors import ConfigError
from qanalyze.launch import ranked, shared_failures

def command():
    try:
        with shared_failures():
            if distributed.world().rank == 1:
                raise ConfigError("calibration batch 4: the loss is nan")
            distributed.barrier()
    except Exception as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    return 0

sys.exit(ranked(command))
"""


def test_a_failing_rank_stops_the_other_with_its_message():
    ranks = two_ranks("-c", FAILING_RANK)
    assert [r.returncode for r in ranks] == [2, 2]
    assert "RankInputError: calibration batch 4: the loss is nan" in ranks[0].stderr
    assert ranks[1].stderr == ""  # quiet: rank 0 said it


@pytest.mark.parametrize("value", ["0", "soon"])
def test_a_bad_collective_timeout_is_refused(monkeypatch, value):
    from qanalyze.distributed import timeout
    from qanalyze.errors import ConfigError

    monkeypatch.setenv("QANALYZE_DIST_TIMEOUT", value)
    with pytest.raises(ConfigError, match="QANALYZE_DIST_TIMEOUT"):
        timeout()


def test_a_killed_rank_stops_the_other_and_its_partial_file_resumes(tmp_path, tiny_llama_dir, wikitext_sample_dir):
    args = ["analyze", str(tiny_llama_dir), "--task", "lm", "--data", str(wikitext_sample_dir), "--seq-len", "32",
            "--batches", "6", "--batch-size", "1", "--metrics", "trace", "--trace-probes", "16", "--trace-tol",
            "1e-9", "--hvp-precision", "float32", "-q"]
    out = tmp_path / "two.json"
    port = str(free_port())
    ranks = [subprocess.Popen([sys.executable, "-m", "qanalyze", *args, "--out", str(out)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=rank_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                           MASTER_PORT=port, QANALYZE_DIST_TIMEOUT="20")) for r in range(2)]
    partial = tmp_path / "two.json.partial"
    deadline = time.monotonic() + 120
    while '"hessian_batch_1": true' not in (partial.read_text() if partial.exists() else ""):
        assert time.monotonic() < deadline and ranks[0].poll() is None, ranks[0].communicate()
        time.sleep(0.05)
    os.kill(ranks[1].pid, signal.SIGKILL)  # dies without a word, in the middle of the second round
    started = time.monotonic()
    _, err = ranks[0].communicate(timeout=60)
    ranks[1].communicate()
    assert ranks[0].returncode not in (0, None) and time.monotonic() - started < 30, err
    assert not out.exists() and partial.exists()
    kept = json.loads(partial.read_text())["modules"]

    resumed = one_process(*args, "--out", out, "--resume")  # one process finishes what two ranks started
    assert resumed.returncode == 0, resumed.stderr
    for name, entry in json.loads(out.read_text())["modules"].items():
        done = kept[name]["hessian"]["trace_per_batch"]
        assert len(done) >= 2 and entry["hessian"]["trace_per_batch"][:len(done)] == done
        assert len(entry["hessian"]["trace_per_batch"]) == 6
