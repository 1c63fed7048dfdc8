"""Issue 24: every export format, checked on real SmolLM2 runs by loading the export with the engine's own code.

For each run (a `qanalyze quantize` directory) and format it exports the run's exact codes, loads the export
with the format's loader (`Exporter.load`: compressed-tensors' decompression, torchao through transformers'
``from_pretrained``, the GPTQ arithmetic) and prints the engine's perplexity on the first ``--windows``
512-token test windows over qanalyze's own evaluation of the run on the same windows (issue: within 0.5 %),
and the size of the weight files over the plan's ``weight_bytes`` plus the format's known overhead
(`Exporter.overhead_bytes`; issue: within 2 %). With ``--gptqmodel-python`` (a separate environment holding
GPTQModel 7.7.0, which needs torch 2.14.1) the GPTQ export is also loaded by ``GPTQModel.load`` itself: every
module's ``dequantize_weight()`` is compared with qanalyze's weight and the model scored with those weights.
With ``--llama-cpp-python`` (an environment where ``pip install llama-cpp-python`` compiled llama.cpp) the GGUF
export is also scored by llama.cpp's own kernels on the same token windows. It then exports ``--plan`` as each
format's recipe with ``--snap up`` and counts the snapped entries.

    .venv/bin/python benchmarks/export_check.py --runs runs/export/q-u4g64 runs/export/q-3.5bit-gptq \\
        --plan runs/export/plan-3.5bit-gptq.json --gptqmodel-python /tmp/gptqvenv/bin/python
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import tempfile
import time
from pathlib import Path

import safetensors.torch
import torch

from qanalyze.data import encode, load_task
from qanalyze.engine.column_checkpoint import load_column_run
from qanalyze.engine.evaluate import evaluate
from qanalyze.errors import ConfigError
from qanalyze.export.layouts import express
from qanalyze.export.registry import get_exporter
from qanalyze.export.run import export
from qanalyze.export.source import read_source
from qanalyze.records import BitPlan

ROOT = Path(__file__).resolve().parents[1]

# Runs in the GPTQModel environment (no qanalyze there): load the export with GPTQModel's torch kernel, compare
# each module's dequantize_weight() with qanalyze's weight, score the model with those weights as float Linears
# (GPTQModel's kernel dequantizes on every call: about a minute a window on two cores).
GPTQMODEL_CHECK = r"""
import json, math, os, sys
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
import safetensors.torch, torch
from gptqmodel import GPTQModel
folder, reference, windows = sys.argv[1:4]
model = GPTQModel.load(folder, device="cpu", backend="torch", dtype=torch.float32)
expected = safetensors.torch.load_file(reference)
exact, worst, count = 0, 0.0, 0
for name, module in list(model.model.named_modules()):
    if not (hasattr(module, "dequantize_weight") and hasattr(module, "qweight")):
        continue
    weight = module.dequantize_weight(num_itr=module.g_idx.shape[0] // module.in_features).float().T.contiguous()
    want = expected[name + ".weight"]
    count += 1
    exact += int(torch.equal(weight, want))
    worst = max(worst, (weight - want).abs().max().item())
    linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    linear.weight.data = weight
    if module.bias is not None:
        linear.bias.data = module.bias.float()
    parent, _, child = name.rpartition(".")
    setattr(model.model.get_submodule(parent), child, linear)
total, tokens = 0.0, 0
with torch.inference_mode():
    for window in torch.load(windows):
        logits = model.model(window[None]).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], window[1:], reduction="sum")
        total, tokens = total + loss.item(), tokens + window.numel() - 1
print(json.dumps({"modules": count, "exact": exact, "max_abs_diff": worst, "perplexity": math.exp(total / tokens)}))
"""


# Runs in an environment holding llama-cpp-python (llama.cpp compiled here): llama.cpp's own CPU kernels score the
# GGUF export on the same token windows (its quantized matmuls round the activations to 8 bits as well, so a
# small difference from the float computation is expected and is what this measures).
LLAMA_CPP_CHECK = r"""
import json, math, sys
import numpy as np
from llama_cpp import Llama
path, windows_file, text_file = sys.argv[1:4]
windows = json.load(open(windows_file))
sample = json.load(open(text_file))
vocab = Llama(model_path=path, vocab_only=True, verbose=False)
same_tokens = vocab.tokenize(sample["text"].encode(), add_bos=False, special=False) == sample["ids"]
model = Llama(model_path=path, n_ctx=len(windows[0]), logits_all=True, n_threads=2, n_batch=len(windows[0]),
              verbose=False)
total, tokens = 0.0, 0
for window in windows:
    model.reset()
    model.eval(window)
    logits = np.asarray(model.scores[: len(window) - 1], dtype=np.float64)
    top = logits.max(axis=1, keepdims=True)
    logz = (top[:, 0] + np.log(np.exp(logits - top).sum(axis=1)))
    total += float((logz - logits[np.arange(len(window) - 1), window[1:]]).sum())
    tokens += len(window) - 1
print(json.dumps({"perplexity": math.exp(total / tokens), "windows": len(windows), "same_tokens": same_tokens,
                  "sample_tokens": len(sample["ids"])}))
"""


TOKENIZER_SAMPLE_CHARS = 200_000


def llama_cpp_check(python: str, folder: Path, tokenizer, data) -> dict:
    """Perplexity of ``folder/model.gguf`` computed by llama.cpp (llama-cpp-python in ``python``'s environment)."""
    windows = encode(data.dev, tokenizer, max_length=128)
    with tempfile.TemporaryDirectory() as scratch:
        Path(f"{scratch}/windows.json").write_text(json.dumps(windows.input_ids.tolist()))
        # llama.cpp's own tokenizer (the GGUF's vocabulary, merges and pre-tokenizer) against qanalyze's
        text = data.dev.text[:TOKENIZER_SAMPLE_CHARS]
        sample = {"text": text, "ids": tokenizer(text, add_special_tokens=False)["input_ids"]}
        Path(f"{scratch}/sample.json").write_text(json.dumps(sample))
        done = subprocess.run([python, "-c", LLAMA_CPP_CHECK, str(folder / "model.gguf"), f"{scratch}/windows.json",
                               f"{scratch}/sample.json"], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def weight_file_bytes(folder: Path) -> int:
    """Bytes of the export's weight files (every .safetensors and .gguf)."""
    return sum(path.stat().st_size for pattern in ("*.safetensors", "*.gguf") for path in folder.glob(pattern))


def window_count(data) -> int:
    """How many windows the evaluation scores."""
    return data.identity.get("max_eval_windows") or 0


def perplexity(model: torch.nn.Module, tokenizer, data) -> float:
    windows = encode(data.dev, tokenizer, max_length=128)
    return evaluate(model, tokenizer, windows, data.task).metrics["perplexity"]


def gptqmodel_check(python: str, folder: Path, reference: torch.nn.Module, tokenizer, data) -> dict:
    windows = encode(data.dev, tokenizer, max_length=128)
    with tempfile.TemporaryDirectory() as scratch:
        weights = {f"{name}.weight": module.weight.detach().contiguous()
                   for name, module in reference.named_modules() if isinstance(module, torch.nn.Linear)}
        safetensors.torch.save_file(weights, f"{scratch}/reference.safetensors")
        torch.save(list(windows.input_ids), f"{scratch}/windows.pt")
        done = subprocess.run([python, "-c", GPTQMODEL_CHECK, str(folder), f"{scratch}/reference.safetensors",
                               f"{scratch}/windows.pt"], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_run(run: Path, formats: list[str], data, out: Path, gptqmodel_python: str | None,
              llama_cpp_python: str | None = None) -> list[dict]:
    reference, tokenizer, _, _ = load_column_run(run)
    own = perplexity(reference, tokenizer, data)
    plan = BitPlan.load(run / "plan.json")
    source = read_source(run)
    print(f"\n{run.name}: qanalyze perplexity {own:.4f} ({window_count(data)} windows), plan weight_bytes "
          f"{plan.totals['weight_bytes']:,}", flush=True)
    rows = []
    for name in formats:
        exporter = get_exporter(name)
        folder = out / f"{run.name}-{name}"
        start = time.perf_counter()
        try:
            record = export(run, name, folder, overwrite=True)
        except ConfigError as error:
            print(f"  {name}: refused: {error}", flush=True)
            rows.append({"run": run.name, "format": name, "refused": str(error)})
            continue
        seconds = time.perf_counter() - start
        expressed = express(source.layouts.values(), exporter.target, name, can_snap=False)
        # a GGUF file also holds its header, metadata and tokenizer: export.json's metadata_bytes
        overhead = exporter.overhead_bytes(expressed) + record.details.get("metadata_bytes", 0)
        expected = plan.totals["weight_bytes"] + overhead
        size = weight_file_bytes(folder)
        engine = perplexity(exporter.load(folder), tokenizer, data)
        row = {"run": run.name, "format": name, "export_seconds": round(seconds, 1), "perplexity": engine,
               "qanalyze_perplexity": own, "ratio": engine / own, "file_bytes": size, "expected_bytes": expected,
               "overhead_bytes": overhead, "size_ratio": size / expected}
        print(f"  {name}: engine/qanalyze perplexity {engine:.4f}/{own:.4f} = {engine / own:.6f}; weight files "
              f"{size:,} B vs weight_bytes + overhead {expected:,} B = {size / expected:.4f}; export "
              f"{seconds:.1f} s", flush=True)
        rows.append(row)
        if name == "llama-cpp" and llama_cpp_python:
            found = llama_cpp_check(llama_cpp_python, folder, tokenizer, data)
            print(f"  llama-cpp in llama.cpp (llama-cpp-python): perplexity {found['perplexity']:.4f}/{own:.4f} = "
                  f"{found['perplexity'] / own:.6f}; its tokenizer gives qanalyze's {found['sample_tokens']:,} "
                  f"tokens of the text's start: {'yes' if found['same_tokens'] else 'NO'}", flush=True)
            rows.append({"run": run.name, "format": "llama-cpp (llama.cpp)", **found, "qanalyze_perplexity": own,
                         "ratio": found["perplexity"] / own})
        if name == "gptq" and gptqmodel_python:
            v2 = out / f"{run.name}-gptq-v2"
            export(run, name, v2, overwrite=True, options={"checkpoint_format": "gptq_v2"})
            found = gptqmodel_check(gptqmodel_python, v2, reference, tokenizer, data)
            print(f"  gptq (gptq_v2) in GPTQModel 7.7.0: {found['exact']}/{found['modules']} modules' "
                  f"dequantize_weight() equal to qanalyze's (max |diff| {found['max_abs_diff']:.3g}); perplexity "
                  f"{found['perplexity']:.4f}/{own:.4f} = {found['perplexity'] / own:.6f}", flush=True)
            rows.append({"run": run.name, "format": "gptq (GPTQModel)", **found, "qanalyze_perplexity": own,
                         "ratio": found["perplexity"] / own})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", type=Path, default=[ROOT / "runs/export/q-u4g64"])
    parser.add_argument("--formats", nargs="+", default=["compressed-tensors", "gptq", "llama-cpp", "torchao"])
    parser.add_argument("--plan", type=Path, default=None, help="a plan to export as each format's recipe")
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/wikitext-2"))
    parser.add_argument("--windows", type=int, default=8, help="512-token test windows to score")
    parser.add_argument("--out", type=Path, default=ROOT / "runs/export/bench")
    parser.add_argument("--gptqmodel-python", default=None, help="python of an environment holding gptqmodel")
    parser.add_argument("--llama-cpp-python", default=None,
                        help="python of an environment holding llama-cpp-python: llama.cpp scores the GGUF too")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    data = load_task("lm", args.data, seq_len=512, max_eval_examples=args.windows)
    rows = []
    for run in args.runs:
        rows += check_run(run, args.formats, data, args.out, args.gptqmodel_python, args.llama_cpp_python)
    if args.plan is not None:
        print(f"\nrecipes of {args.plan.name} (--snap up):")
        for name in args.formats:
            try:
                record = export(args.plan, name, args.out / f"{args.plan.stem}-{name}", snap="up", overwrite=True)
            except ConfigError as error:
                print(f"  {name}: refused: {error}")
                continue
            print(f"  {name}: {record.modules} modules, {record.exact} exact, {len(record.snapped)} snapped; "
                  f"files {', '.join(f'{k} ({v:,} B)' for k, v in record.files.items())}")
            rows.append({"plan": args.plan.name, "format": name, "modules": record.modules, "exact": record.exact,
                         "snapped": len(record.snapped)})
    worst = max((abs(r["ratio"] - 1) for r in rows if "ratio" in r and math.isfinite(r["ratio"])), default=0.0)
    print(f"\nlargest perplexity deviation from qanalyze's: {100 * worst:.4f} %")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
