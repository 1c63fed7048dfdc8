"""Issue 3 targets: qanalyze's Hessian engine against PyHessian 0.1 on minilm-l6 fine-tuned on SST-2.

Same model, same batch (16 SST-2 training sentences), ratios measured in one run:

A. traces of every quantizable module's weight block: qanalyze's one pass (one global product
   per Hutchinson probe serves every module) against PyHessian run one module at a time with the
   same number of probes. Target: >= 20x less wall time, values within the standard errors.
   qanalyze takes the word-embedding table as the rows the batch looks up, as `qanalyze analyze`
   does (`sparse_embeddings`): the other rows' Hessian rows and columns are zero; and it runs the
   batch as length buckets without their shared padding (`unpad`, also `analyze`'s default).
B. per-layer (Q-BERT block) top eigenvalue at equal accuracy: Lanczos on products restricted to each
   layer from one gradient graph (what `qanalyze analyze` does) against PyHessian's power iteration with
   one hessian object per layer. Target: >= 3x less wall time. The float32 row is also run on the
   padded batch (`--no-unpad`), to show what the buckets and what Lanczos each contribute.

bfloat16 products are measured only where the CPU multiplies bfloat16 natively (elsewhere
`--hvp-precision auto` never picks them, and emulated they are 10x slower).

    .venv/bin/python benchmarks/hessian_sst2.py --model runs/bench/sst2-fp32
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch

import qanalyze
from qanalyze.data import collate, encode
from qanalyze.sensitivity.buckets import LengthBuckets
from qanalyze.sensitivity.estimators import hutchinson_traces, lanczos, refined_lanczos
from qanalyze.sensitivity.hvp import HVP, pyhessian_adapter, resolve_precision
from qanalyze.sensitivity.sources import Restricted

ROOT = Path(__file__).resolve().parents[1]


def fine_tuned_model(path: Path, data_dir: str) -> str:
    """The SST-2 fine-tuned minilm-l6 (fine-tuned here, 8,000 examples, 1 epoch, if missing)."""
    if not (path / "metrics.json").exists():
        from qanalyze.rundir import prepare_run_dir

        print(f"fine-tuning minilm-l6 on 8,000 SST-2 examples into {path} ...", flush=True)
        data = qanalyze.load_task("sst2", data_dir, max_train_examples=8000, seed=0)
        torch.manual_seed(0)
        loaded = qanalyze.load_model("minilm-l6", num_labels=2)
        qanalyze.train(loaded, data, qanalyze.TrainConfig(epochs=1, max_length=64, save_every=10**6),
                       prepare_run_dir(path, overwrite=True))
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "runs/bench/sst2-fp32"))
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/glue"))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--trace-tol", type=float, default=0.05)
    parser.add_argument("--trace-probes", type=int, default=64)
    parser.add_argument("--skip", default="", help="comma list of parts to skip: traces, eig")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    model_dir = fine_tuned_model(Path(args.model), args.data)
    loaded = qanalyze.load_model(model_dir, num_labels=2, eager_attention=True)
    model = loaded.model.eval()
    data = qanalyze.load_task("sst2", args.data, max_train_examples=args.batch_size, seed=0)
    batch = collate(encode(data.train, loaded.tokenizer, max_length=args.max_length), range(args.batch_size),
                    loaded.tokenizer)
    modules = dict(model.named_modules())
    infos = qanalyze.inventory(model)
    weights = {i.name: modules[i.name].weight for i in infos}
    print(f"{model_dir}: {len(infos)} quantizable modules, batch {args.batch_size} x "
          f"{batch['input_ids'].shape[1]} tokens, torch threads {torch.get_num_threads()}", flush=True)
    precisions = ["float32"]
    if resolve_precision("auto", torch.device("cpu"), torch.float32) == "bfloat16":
        precisions.append("bfloat16")
    else:
        print("no native bfloat16 on this CPU: float32 products only", flush=True)
    buckets = LengthBuckets.of(batch)
    if buckets is not None:
        print(f"length buckets: {len(buckets.groups)} sub-batches of {[len(g) for g in buckets.groups]} sentences "
              f"cut to {list(buckets.lengths)} tokens: {buckets.tokens} rows against "
              f"{buckets.size * buckets.columns} padded", flush=True)

    if "traces" not in skip:
        ours, traces = {}, {}
        for precision in precisions:
            start = time.perf_counter()
            op = HVP.build(model, batch, weights, precision=precision, sparse_embeddings=True, unpad=True)
            traces[precision] = hutchinson_traces(op, {n: [k] for k, n in enumerate(weights)},
                                                  generator=torch.Generator().manual_seed(0),
                                                  max_probes=args.trace_probes, rel_tol=args.trace_tol)
            ours[precision] = time.perf_counter() - start
            del op
        probes = next(iter(traces["float32"].values())).iterations
        print(f"A. qanalyze one-pass traces: {len(weights)} modules, {probes} probes: "
              + ", ".join(f"{p} products {t:.1f} s" for p, t in ours.items()), flush=True)
        start = time.perf_counter()
        reference = {}
        for name, weight in weights.items():
            samples = pyhessian_adapter(model, batch, [weight]).trace(max_iter=probes, tol=0.0, seed=1)
            reference[name] = (statistics.fmean(samples), statistics.stdev(samples) / math.sqrt(len(samples)))
        theirs = time.perf_counter() - start
        print(f"   PyHessian, one module at a time, {probes} probes each: {theirs:.1f} s")
        for precision, seconds in ours.items():
            print(f"   {precision}: PyHessian / qanalyze wall time {theirs / seconds:.1f}x (target >= 20x)")
            agree = 0
            for name, (mean, stderr) in reference.items():
                estimate = traces[precision][name]
                ok = abs(mean - estimate.value) <= 3 * math.hypot(stderr, estimate.stderr)
                agree += ok
                if not ok:
                    print(f"     outside: {name}: ours {estimate.value:.4g} ± {estimate.stderr:.2g}, "
                          f"PyHessian {mean:.4g} ± {stderr:.2g}")
            print(f"     values within 3 combined standard errors: {agree} of {len(reference)} modules")

    if "eig" not in skip:
        # Each tool as it is used. qanalyze analyze builds one gradient graph over every module and
        # runs each layer's Lanczos on products restricted to that layer (`Restricted`); with bfloat16
        # products it builds a bfloat16 graph too, runs Lanczos there and finishes in float32
        # (`refined_lanczos`). PyHessian builds one hessian object, so one graph, per layer. Same
        # accuracy, not the same stopping rule: PyHessian's test (relative change per iteration < tol)
        # stops power iteration before the estimate is within tol of the eigenvalue, so it is run at
        # 1e-3, 1e-4, 1e-5 until it is within 1e-3 of a Lanczos value converged to 1e-8, and timed at
        # the first tolerance that gets there.
        blocks: dict[int, list[int]] = {}
        names = list(weights)
        for info in infos:
            if info.block is not None:
                blocks.setdefault(info.block, []).append(names.index(info.name))
        labels = ["float32", "float32 padded"] + (["mixed"] if "bfloat16" in precisions else [])
        graphs, ops = {}, {}
        for key, precision, unpad in (("float32", "float32", True), ("float32 padded", "float32", False),
                                      ("bfloat16", "bfloat16", True)):
            if precision in precisions:
                start = time.perf_counter()
                ops[key] = HVP.build(model, batch, weights, precision=precision, sparse_embeddings=True, unpad=unpad)
                graphs[key] = time.perf_counter() - start
        print(f"B. one gradient graph over all {len(names)} modules: "
              + ", ".join(f"{p} {t:.2f} s" for p, t in graphs.items()), flush=True)
        totals = {label: graphs[label] for label in labels if label in graphs}
        if "mixed" in labels:
            totals["mixed"] = graphs["float32"] + graphs["bfloat16"]
        totals["pyhessian"] = 0.0
        for block, indices in sorted(blocks.items()):
            exact_op = Restricted(ops["float32"], indices)
            exact = lanczos(Restricted(ops["float32 padded"], indices), generator=torch.Generator().manual_seed(99),
                            tol=1e-8)[0].value
            line = []
            for label in labels:
                generator = torch.Generator().manual_seed(block)
                start = time.perf_counter()
                # Started from the layer's gradient, as `qanalyze analyze` does (`lanczos`'s hint).
                if label == "mixed":
                    fast_op = Restricted(ops["bfloat16"], indices)
                    estimate = refined_lanczos(fast_op, exact_op, generator=generator, tol=1e-3,
                                               hint=fast_op.gradient())[0]
                else:
                    op = Restricted(ops[label], indices)
                    estimate = lanczos(op, generator=generator, tol=1e-3, hint=op.gradient())[0]
                seconds = time.perf_counter() - start
                totals[label] += seconds
                line.append(f"{label} error {abs(estimate.value - exact) / abs(exact):.1e}, "
                            f"{estimate.iterations} products, {seconds:.2f} s")
            params = [weights[names[i]] for i in indices]
            for tol in (1e-3, 1e-4, 1e-5):
                start = time.perf_counter()
                reference = pyhessian_adapter(model, batch, params).eigenvalues(max_iter=100, tol=tol, seed=block)[0]
                theirs = time.perf_counter() - start
                theirs_error = abs(reference - exact) / abs(exact)
                if theirs_error <= 1e-3:
                    break
            totals["pyhessian"] += theirs
            print(f"   layer {block}: λ = {exact:.6g}; Lanczos at tol 1e-3: {'; '.join(line)}; PyHessian power at "
                  f"tol {tol:g}: error {theirs_error:.1e}, {theirs:.2f} s (its graph included)", flush=True)
        for label in labels:
            print(f"   qanalyze {label} {totals[label]:.1f} s (graphs included), "
                  f"PyHessian {totals['pyhessian']:.1f} s: "
                  f"{totals['pyhessian'] / totals[label]:.1f}x less wall time at 1e-3 accuracy over {len(blocks)} "
                  f"layers (target >= 3x)")


if __name__ == "__main__":
    main()
