"""Pipelined Hessian-vector products on SmolLM2-135M: each rank's parameter bytes and seconds per probe, against
one process's `HVP` on the whole model, with the per-module samples v_mᵀ(Hv)_m of the same keyed probes.

    # the stages (2 ranks, 1 thread each)
    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 benchmarks/pipeline_smollm2.py pipeline --out /tmp/pipe.json
    # one process, the whole model (1 thread)
    OMP_NUM_THREADS=1 python benchmarks/pipeline_smollm2.py whole --out /tmp/whole.json
    python benchmarks/pipeline_smollm2.py compare /tmp/pipe.json /tmp/whole.json

The model is the float32 safetensors folder qanalyze converts the bundled GGUF into (`smollm2-135m`); the
window is the first ``--tokens`` tokens of WikiText-2's validation text beside the checkout.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

WIKITEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2" / "valid.txt"


def _folder() -> Path:
    from qanalyze.gguf_source import converted_folder
    from qanalyze.models import resolve_model

    return converted_folder(Path(resolve_model("smollm2-135m").location))


def _window(folder: Path, tokens: int) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    ids = tokenizer(WIKITEXT.read_text(encoding="utf-8")[:20000], return_tensors="pt")["input_ids"][:, :tokens]
    return {"input_ids": ids, "labels": ids}


def _samples(v: dict[str, torch.Tensor], hv: dict[str, torch.Tensor]) -> dict[str, float]:
    return {name: float(torch.dot(v[name].reshape(-1), hv[name].reshape(-1))) for name in hv}


def pipeline(args: argparse.Namespace) -> dict:
    """Each rank loads its stage, builds the batch's sweeps and runs ``--probes`` products."""
    from qanalyze.distributed import gather_objects, world
    from qanalyze.sensitivity.pipeline import PipelinedHVP
    from qanalyze.sensitivity.stages import load_stage

    here = world()
    folder = _folder()
    started = time.perf_counter()
    stage = load_stage(folder, here.rank, here.size)
    load_s = time.perf_counter() - started
    batch = _window(folder, args.tokens)
    started = time.perf_counter()
    op = PipelinedHVP.build(stage, batch)
    build_s = time.perf_counter() - started
    probe_s, probe_cpu_s, samples = [], [], {}
    for probe in range(args.probes):
        started, cpu = time.perf_counter(), time.process_time()
        v = op.probe(seed=0, batch=0, probe=probe)
        hv = op(v)
        probe_s.append(time.perf_counter() - started)
        probe_cpu_s.append(time.process_time() - cpu)
        samples[probe] = _samples(v, hv)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    ranks = gather_objects({"rank": here.rank, "layers": [stage.split.start, stage.split.stop],
                            "parameter_bytes": stage.parameter_bytes, "load_s": load_s, "build_s": build_s,
                            "probe_s": probe_s, "probe_cpu_s": probe_cpu_s, "max_rss_gib": rss, "samples": samples})
    return {"mode": "pipeline", "ranks": ranks, "loss": op.loss}


def whole(args: argparse.Namespace) -> dict:
    """One process: the whole model and `HVP` over every quantizable weight, the same keyed probes."""
    from transformers import LlamaForCausalLM

    from qanalyze.models import inventory
    from qanalyze.sensitivity.hvp import HVP
    from qanalyze.sensitivity.pipeline import draw_probe

    folder = _folder()
    started = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(str(folder), attn_implementation="eager", dtype=torch.float32).eval()
    load_s = time.perf_counter() - started
    modules = dict(model.named_modules())
    names = [info.name for info in inventory(model)]
    batch = _window(folder, args.tokens)
    started = time.perf_counter()
    op = HVP.build(model, batch, {name: modules[name].weight for name in names})
    build_s = time.perf_counter() - started
    shapes = {name: modules[name].weight.shape for name in names}
    probe_s, probe_cpu_s, samples = [], [], {}
    for probe in range(args.probes):
        started, cpu = time.perf_counter(), time.process_time()
        v = draw_probe(shapes, seed=0, batch=0, probe=probe)
        hv = dict(zip(names, op([v[name] for name in names])))
        probe_s.append(time.perf_counter() - started)
        probe_cpu_s.append(time.process_time() - cpu)
        samples[probe] = _samples(v, hv)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"mode": "whole", "parameter_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "load_s": load_s, "build_s": build_s, "probe_s": probe_s, "probe_cpu_s": probe_cpu_s, "max_rss_gib": rss,
            "samples": samples,
            "loss": op.loss}


def compare(pipe: dict, one: dict) -> dict:
    """The largest relative difference of the per-module samples, and the losses."""
    worst = 0.0
    for probe, reference in one["samples"].items():
        mine = {name: value for rank in pipe["ranks"] for name, value in rank["samples"][probe].items()}
        for name, value in reference.items():
            worst = max(worst, abs(mine[name] - value) / max(abs(value), 1e-30))
    return {"worst_relative_sample_difference": worst, "loss": [pipe["loss"], one["loss"]]}


def main() -> None:
    """Run one mode and write its JSON to ``--out`` (rank 0)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["pipeline", "whole", "compare"])
    parser.add_argument("files", nargs="*")
    parser.add_argument("--out")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--probes", type=int, default=2)
    args = parser.parse_args()
    if args.mode == "compare":
        pipe, one = (json.loads(Path(f).read_text()) for f in args.files)
        json.dump(compare(pipe, one), sys.stdout, indent=1)
        return
    result = pipeline(args) if args.mode == "pipeline" else whole(args)
    result["threads"] = torch.get_num_threads()
    from qanalyze.distributed import world

    if world().is_main and args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
