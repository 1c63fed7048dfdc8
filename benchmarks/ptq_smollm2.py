"""SmolLM2-135M on WikiText-2: weight-only PTQ of every linear module but the LM head, RTN against GPTQ
(`qanalyze.ptq.quantize_model`), at uniform column groups; optionally against GPTQModel on the same windows.

1. Loads `smollm2-135m` (the GGUF converted once to float32 and cached).
2. Calibration: ``--calib-windows`` windows of ``--seq-len`` tokens of valid.txt (the lm task's train split when the
   folder has no train.txt); evaluation: ``--eval-windows`` windows of test.txt; both chosen by ``--seed``.
3. FP32 perplexity, then for each of ``--bits``: RTN and GPTQ (damp 0.01, ``--act-order`` optional) at
   ``--group-size`` columns, asymmetric unless ``--symmetric``; the float weights are restored between runs.
4. With ``--gptqmodel-python PY`` (a virtual environment with gptqmodel installed), runs
   `benchmarks/ptq_gptqmodel_reference.py` there on the same windows and settings and compares perplexities.

Prints each perplexity, the ratios GPTQ/RTN and RTN/FP32 (and qanalyze GPTQ / GPTQModel), and the seconds of
each step; ``--json`` writes them too.

    .venv/bin/python benchmarks/ptq_smollm2.py --calib-windows 32 --eval-windows 16 --bits 4,3 \
        --gptqmodel-python /tmp/gptqvenv/bin/python --json runs/ptq_smollm2.json

Caveat: SmolLM2's GGUF is Q4_1, so its linear weights already lie on a 4-bit grid (asymmetric, blocks of 32
columns). Re-quantizing them to 4 bits in groups of 128 is still lossy (a coarser grid), but milder than on a
true float model; 3 bits shows the methods further apart.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CAVEAT = ("caveat: SmolLM2's GGUF is Q4_1, so its weights already lie on a 4-bit grid (blocks of 32); 4-bit g128 "
          "re-quantization is lossy but milder than on a true float model; 3-bit g128 separates the methods more.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib-windows", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--bits", default="4,3", help="comma-separated bit widths")
    parser.add_argument("--group-size", type=int, default=128, help="columns per scale (0: one per row)")
    parser.add_argument("--symmetric", action="store_true", help="symmetric codes (default asymmetric, zero points)")
    parser.add_argument("--act-order", action="store_true", help="GPTQ with act-order and static groups")
    parser.add_argument("--damp", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=4, help="calibration windows per forward")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/wikitext-2"))
    parser.add_argument("--gptqmodel-python", default=None, help="python of a venv with gptqmodel installed")
    parser.add_argument("--json", default=None, help="write the figures to this file")
    parser.add_argument("--threads", default=None, help="torch threads (default: auto, as the CLI chooses)")
    args = parser.parse_args()

    from qanalyze.threads import apply_threads, prepare_threads

    plan = prepare_threads(args.threads)  # the wait policy must be set before torch loads
    import torch

    apply_threads(plan)

    from qanalyze.data import encode, load_task
    from qanalyze.engine.lm_eval import evaluate_lm
    from qanalyze.models import load_model
    from qanalyze.ptq.gptq import GPTQConfig
    from qanalyze.ptq.quantize import linear_modules, quantize_model

    figures: dict = {"settings": vars(args), "threads": torch.get_num_threads(), "runs": []}
    start = time.perf_counter()
    loaded = load_model("smollm2-135m")
    model, folder = loaded.model, loaded.identity["converted"]
    figures["load_seconds"] = time.perf_counter() - start
    data = load_task("lm", args.data, max_train_examples=args.calib_windows, max_eval_examples=args.eval_windows,
                     seed=args.seed, seq_len=args.seq_len)
    calib, test = encode(data.train, loaded.tokenizer), encode(data.dev, loaded.tokenizer)
    print(f"SmolLM2-135M loaded in {figures['load_seconds']:.1f} s; calibration {len(calib)} windows of "
          f"{calib.seq_len} tokens of {Path(calib.where).name}, evaluation {len(test)} windows of "
          f"{Path(test.where).name}; torch threads {torch.get_num_threads()}", flush=True)

    fp32, _, seconds = evaluate_lm(model, test)
    figures["fp32"] = {"perplexity": fp32, "eval_seconds": seconds}
    print(f"FP32 perplexity {fp32:.4f} ({seconds:.0f} s)", flush=True)
    originals = {name: module.weight.detach().clone() for name, module in linear_modules(model).items()}
    group = args.group_size or None
    symmetric = args.symmetric
    gptq_config = GPTQConfig(damp=args.damp, act_order=args.act_order)

    for bits in (int(b) for b in args.bits.split(",")):
        row = {"bits": bits, "group_size": group, "symmetric": symmetric}
        for method in ("rtn", "gptq"):
            start = time.perf_counter()
            # partial_last: SmolLM2's 576 input columns are 4.5 groups of 128; like GPTQ's packed format and
            # GPTQModel, the last group of such a row is 64 columns
            record = quantize_model(model, bits, method, calib, group_size=group, symmetric=symmetric,
                                    partial_last=True, config=gptq_config if method == "gptq" else None,
                                    batch_size=args.batch_size)
            quantize_seconds = time.perf_counter() - start
            ppl, _, eval_seconds = evaluate_lm(model, test)
            row[method] = {"perplexity": ppl, "quantize_seconds": quantize_seconds, "eval_seconds": eval_seconds,
                           "bits_per_weight": record.storage_bits / sum(w.numel() for w in originals.values())}
            print(f"{bits}-bit {'g' + str(group) if group else 'row'} {method.upper():4s}: perplexity {ppl:.4f} "
                  f"(quantize {quantize_seconds:.1f} s, evaluate {eval_seconds:.0f} s, "
                  f"{row[method]['bits_per_weight']:.3f} bits/weight)", flush=True)
            with torch.no_grad():
                for name, module in linear_modules(model).items():
                    module.weight.copy_(originals[name])
        row["gptq_over_rtn"] = row["gptq"]["perplexity"] / row["rtn"]["perplexity"]
        row["rtn_over_fp32"] = row["rtn"]["perplexity"] / fp32
        row["gptq_over_fp32"] = row["gptq"]["perplexity"] / fp32
        print(f"{bits}-bit: GPTQ/RTN {row['gptq_over_rtn']:.4f}, RTN/FP32 {row['rtn_over_fp32']:.4f}, "
              f"GPTQ/FP32 {row['gptq_over_fp32']:.4f}", flush=True)
        if args.gptqmodel_python:
            row["gptqmodel"] = run_gptqmodel(args, folder, calib.input_ids, test.input_ids, bits)
            if "gptqmodel_perplexity" in row["gptqmodel"]:
                ratio = row["gptq"]["perplexity"] / row["gptqmodel"]["gptqmodel_perplexity"]
                row["qanalyze_over_gptqmodel"] = ratio
                print(f"{bits}-bit GPTQModel: perplexity {row['gptqmodel']['gptqmodel_perplexity']:.4f} "
                      f"(quantize {row['gptqmodel']['quantize_seconds']:.0f} s); qanalyze GPTQ / GPTQModel "
                      f"{ratio:.4f} ({'within' if abs(ratio - 1) <= 0.02 else 'outside'} 2 %)", flush=True)
            else:
                print(f"{bits}-bit GPTQModel failed: {row['gptqmodel']['error']}", flush=True)
        figures["runs"].append(row)
    print(CAVEAT)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=1), encoding="utf-8")


def run_gptqmodel(args: argparse.Namespace, folder: str, calib: Any, test: Any, bits: int) -> dict:
    """GPTQModel on the same windows (token id tensors) in its own venv (`benchmarks/ptq_gptqmodel_reference.py`)."""
    import torch

    work = Path(tempfile.mkdtemp(prefix="ptq-gptqmodel-"))
    torch.save(calib, work / "calib.pt")
    torch.save(test, work / "eval.pt")
    command = [args.gptqmodel_python, str(ROOT / "benchmarks" / "ptq_gptqmodel_reference.py"), "--model", folder,
               "--calib", str(work / "calib.pt"), "--eval", str(work / "eval.pt"), "--bits", str(bits),
               "--group-size", str(args.group_size or -1), "--damp", str(args.damp), "--out", str(work / "out.json")]
    if args.symmetric:
        command.append("--sym")
    # GPTQModel 7.7 asks for 2 model-loader workers but gives a 2-core machine 1 CPU worker, and then refuses
    # to start ("Virtual pool 'model_loader:cpu' requests 2 workers but parent 'cpu' only has 1")
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": os.environ.get("GPTQMODEL_CPU_WORKERS", "2")}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    (work / "log.txt").write_text(done.stdout + done.stderr, encoding="utf-8")
    if done.returncode:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1], "log": str(work / "log.txt")}
    return {**json.loads((work / "out.json").read_text(encoding="utf-8")), "log": str(work / "log.txt")}


if __name__ == "__main__":
    main()
