"""Two gloo ranks on the CPU give one process's numbers: `analyze` (weights, Fisher, activation and gradient
errors, traces) and GPTQ `quantize` under ``torchrun --nproc-per-node 2``; bad input and a failing rank stop
every rank with one line from rank 0 (`qanalyze.distributed`, `qanalyze.launch`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rank_helpers import free_port, rank_env, two_ranks
from safetensors.torch import load_file

from qanalyze.distributed import World, all_reduce_floats, gather_objects, keyed_generator, shard, world

VENV_BIN = Path(sys.executable).parent
ANALYZE_TOLERANCE = 1e-6
"""Relative: the Fisher sums are float32 sums over passes, added in another order when two ranks share them
(measured worst 9e-9 on the tiny LLaMA); every other number is the same arithmetic on the same batch."""


def _one(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qanalyze", *map(str, args)], env=rank_env(), capture_output=True,
                          text=True, timeout=300)


def _torchrun(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", str(free_port()),
                           "-m", "qanalyze", *map(str, args)], env=rank_env(), capture_output=True, text=True,
                          timeout=300)


def _messages(err: str) -> list[str]:
    # what qanalyze itself says (the environment's import-time warnings are not ours)
    return [line for line in err.splitlines() if line.startswith(("error:", "internal error:"))]


def _close(a: object, b: object, where: str = "") -> float:
    """The largest relative difference of the numbers of two JSON values, which must match in structure."""
    if isinstance(a, dict):
        assert set(a) == set(b), (where, set(a) ^ set(b))
        return max((_close(a[k], b[k], f"{where}.{k}") for k in a), default=0.0)
    if isinstance(a, list):
        assert len(a) == len(b), where
        return max((_close(x, y, f"{where}[{i}]") for i, (x, y) in enumerate(zip(a, b))), default=0.0)
    if isinstance(a, float):
        return abs(a - b) / max(abs(a), abs(b), 1e-30)
    assert a == b, (where, a, b)
    return 0.0


def test_helpers_are_the_identity_in_one_process():
    assert world() == World(0, 1) and world().is_main and not world().distributed
    assert shard(3, "batches") == [0, 1, 2]
    assert all_reduce_floats([1.5, 2.0]) == [1.5, 2.0] and gather_objects({"a": 1}) == [{"a": 1}]
    first = torch.rand(4, generator=keyed_generator(0, "labels", 3))
    assert torch.equal(first, torch.rand(4, generator=keyed_generator(0, "labels", 3)))
    assert not torch.equal(first, torch.rand(4, generator=keyed_generator(0, "labels", 4)))


def test_analyze_on_two_ranks_matches_one_process(tmp_path, tiny_llama_dir, wikitext_sample_dir):
    # three windows on two ranks: a round of one window each, then the last window's Lanczos runs split by module
    args = ["analyze", tiny_llama_dir, "--task", "lm", "--data", wikitext_sample_dir, "--seq-len", 32, "--batches", 3,
            "--batch-size", 1, "--metrics", "weights,fisher,trace,eig,activations,gradients", "--trace-probes", 3,
            "--eig-tol", "0.3", "--hvp-precision", "float32", "-q"]
    one = _one(*args, "--out", tmp_path / "one.json")
    assert one.returncode == 0, one.stderr
    two = _torchrun(*args, "--out", tmp_path / "two.json")
    assert two.returncode == 0, two.stderr
    a, b = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json"))
    assert b["complete"] and not (tmp_path / "two.json.partial").exists()
    assert _close(a["modules"], b["modules"], "modules") < ANALYZE_TOLERANCE
    assert _close(a["blocks"], b["blocks"], "blocks") < ANALYZE_TOLERANCE
    hessian = a["modules"]["model.layers.0.mlp.up_proj"]["hessian"]  # the traces and eigenvalues were compared
    assert len(hessian["trace_per_batch"]) == len(hessian["eig_per_batch"]) == 3


def test_gptq_on_two_ranks_gives_the_same_codes(tmp_path, tiny_llama_dir, wikitext_sample_dir):
    args = ["quantize", tiny_llama_dir, "--plan", "uniform:4:g32", "--method", "gptq", "--task", "lm", "--data",
            wikitext_sample_dir, "--seq-len", 32, "--calib-windows", 8, "--calib-batch", 2, "-q"]
    one = _one(*args, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    two = _torchrun(*args, "--out", tmp_path / "two")
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("perplexity") == 1  # rank 0 speaks, rank 1 is quiet
    a, b = (load_file(tmp_path / name / "weights.safetensors") for name in ("one", "two"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-exact codes and scales


def test_more_ranks_than_calibration_windows_exit_2_with_one_line(tmp_path, tiny_llama_dir, wikitext_sample_dir):
    ranks = two_ranks("-m", "qanalyze", "analyze", str(tiny_llama_dir), "--task", "lm", "--data",
                   str(wikitext_sample_dir), "--seq-len", "32", "--batches", "1", "--batch-size", "1",
                   "--metrics", "weights", "--out", str(tmp_path / "s.json"))
    assert [r.returncode for r in ranks] == [2, 2]
    assert _messages(ranks[0].stderr) == ["error: 2 ranks need at least 2 calibration batches (--batches, times "
                                          "--batch-size for task lm, whose windows are batches of one); there are 1"]
    assert _messages(ranks[1].stderr) == [] and ranks[1].stdout == ""
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
    import os
    import signal
    import time

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

    resumed = _one(*args, "--out", out, "--resume")  # one process finishes what two ranks started
    assert resumed.returncode == 0, resumed.stderr
    for name, entry in json.loads(out.read_text())["modules"].items():
        done = kept[name]["hessian"]["trace_per_batch"]
        assert len(done) >= 2 and entry["hessian"]["trace_per_batch"][:len(done)] == done
        assert len(entry["hessian"]["trace_per_batch"]) == 6
