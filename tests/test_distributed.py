"""Two gloo ranks on the CPU give one process's numbers: `analyze` (weights, Fisher, activation and gradient
errors, traces, eigenvalues) and GPTQ `quantize` under ``torchrun --nproc-per-node 2`` (`qanalyze.distributed`).
Bad input and failing ranks: tests/test_distributed_failures.py."""

from __future__ import annotations

import json

import torch
from rank_helpers import largest_difference, one_process, torchrun
from safetensors.torch import load_file

from qanalyze.distributed import World, all_reduce_floats, gather_objects, keyed_generator, shard, world

ANALYZE_TOLERANCE = 1e-6
"""Relative: the Fisher sums are float32 sums over passes, added in another order when two ranks share them
(measured worst 9e-9 on the tiny LLaMA); every other number is the same arithmetic on the same batch."""


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
    one = one_process(*args, "--out", tmp_path / "one.json")
    assert one.returncode == 0, one.stderr
    two = torchrun(*args, "--out", tmp_path / "two.json")
    assert two.returncode == 0, two.stderr
    a, b = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json"))
    assert b["complete"] and not (tmp_path / "two.json.partial").exists()
    assert largest_difference(a["modules"], b["modules"], "modules") < ANALYZE_TOLERANCE
    assert largest_difference(a["blocks"], b["blocks"], "blocks") < ANALYZE_TOLERANCE
    hessian = a["modules"]["model.layers.0.mlp.up_proj"]["hessian"]  # the traces and eigenvalues were compared
    assert len(hessian["trace_per_batch"]) == len(hessian["eig_per_batch"]) == 3


def test_gptq_on_two_ranks_gives_the_same_codes(tmp_path, tiny_llama_dir, wikitext_sample_dir):
    args = ["quantize", tiny_llama_dir, "--plan", "uniform:4:g32", "--method", "gptq", "--task", "lm", "--data",
            wikitext_sample_dir, "--seq-len", 32, "--calib-windows", 8, "--calib-batch", 2, "-q"]
    one = one_process(*args, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    two = torchrun(*args, "--out", tmp_path / "two")
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("perplexity") == 1  # rank 0 speaks, rank 1 is quiet
    a, b = (load_file(tmp_path / name / "weights.safetensors") for name in ("one", "two"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-exact codes and scales
