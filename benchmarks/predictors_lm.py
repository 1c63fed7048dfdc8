"""Which sensitivity predictor is right on a decoder LM, measured (issue 22 item 6).

SmolLM2-135M on WikiText-2: each chosen linear module alone is quantized to --bits (RTN, symmetric, one scale
per output row: the `channel` layout of `weight_error`) and the mean KL(p_ref || p_quant) of the next-token
distributions against the unquantized model is measured on --windows test windows. The predictors come from
one analysis on --calib-windows windows of valid.txt (per-window passes): trace x weight error (the planner's
`trace` objective), the empirical-Fisher weighted error, the output-gradient score, and the weight error
alone. Spearman's rho between each predictor and the measured change is printed, and everything is written to
--out (rewritten after every module, so a killed run keeps what it measured).

    .venv/bin/python benchmarks/predictors_lm.py --windows 8 --layers 0,5,10,15,20,25,29 --out runs/predictors.json
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

import qanalyze
from qanalyze.data import load_task
from qanalyze.engine.lm_eval import compare_lm, reference_logits
from qanalyze.lm_data import encode_text
from qanalyze.plan.costs import OBJECTIVES
from qanalyze.quant.primitives import fake_quantize
from qanalyze.sensitivity.analyze import AnalyzeConfig, analyze

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2"
PREDICTORS = {
    "trace": lambda entry, bits: OBJECTIVES["trace"](entry, bits, "channel"),
    "fisher": lambda entry, bits: OBJECTIVES["fisher"](entry, bits, "channel"),
    "output-gradient": lambda entry, bits: OBJECTIVES["output-gradient"](entry, bits, "channel"),
    "weight error": lambda entry, bits: entry["weight_error"][str(bits)]["channel"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=16, help="test windows the KL is measured on")
    parser.add_argument("--calib-windows", type=int, default=4, help="valid.txt windows the predictors come from")
    parser.add_argument("--trace-probes", type=int, default=4, help="Hutchinson probes per calibration window")
    parser.add_argument("--layers", default=None, help="comma list of layer indices whose linear modules are "
                                                       "measured (default: all 30)")
    parser.add_argument("--analysis", default=None, help="reuse this sensitivity file instead of analyzing")
    parser.add_argument("--score-labels", default="data", choices=("data", "sampled"),
                        help="labels of the fisher/output-gradient passes: the text's, or drawn from the model")
    parser.add_argument("--no-trace", action="store_true", help="skip the Hutchinson traces (the costly part)")
    parser.add_argument("--measured", default=None,
                        help="take the measured KL changes from this earlier --out file: only the predictors run")
    parser.add_argument("--out", default="runs/predictors_lm.json")
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    data = load_task("lm", args.data, max_train_examples=args.calib_windows, max_eval_examples=args.windows,
                     seq_len=args.seq_len, seed=0)
    started = time.perf_counter()
    if args.analysis:
        report = qanalyze.records.SensitivityReport.load(args.analysis)
    else:
        loaded = qanalyze.load_model(args.model, eager_attention=True)
        config = AnalyzeConfig(batches=args.calib_windows, batch_size=1, bits=(args.bits,), score_bits=(args.bits,),
                               groups=("channel",), modules=r"proj$", trace_max_probes=args.trace_probes,
                               trace_min_probes=min(2, args.trace_probes), hvp_precision="float32",
                               score_labels=args.score_labels,
                               metrics=("weights", "fisher", "output-gradient") + (() if args.no_trace else ("trace",)))
        report = analyze(loaded, data, config, out.with_suffix(".sensitivity.json"),
                         progress=lambda stage, done, total, detail: print(
                             f"  {stage} {done}/{total} {detail} ({time.perf_counter() - started:.0f} s)", flush=True))
        del loaded
    analysis_seconds = time.perf_counter() - started
    print(f"analysis: {analysis_seconds:.0f} s", flush=True)

    predictors = {p: f for p, f in PREDICTORS.items() if p != "trace" or "trace" in report.settings["metrics"]}
    if args.measured:
        earlier = json.loads(Path(args.measured).read_text())["modules"]
        results = {name: {"kl": row["kl"], **{p: float(f(report.modules[name], args.bits))
                                              for p, f in predictors.items()}} for name, row in earlier.items()}
        out.write_text(json.dumps({"settings": vars(args), "analysis_seconds": analysis_seconds,
                                   "spearman": _spearman(results, predictors), "modules": results,
                                   "timings": report.timings}, indent=1))
        _print(results, predictors, args, args.windows)
        return
    loaded = qanalyze.load_model(args.model)  # sdpa attention: the measured forwards need no double backward
    model = loaded.model.eval()
    windows = encode_text(data.dev, loaded.tokenizer)
    started = time.perf_counter()
    reference = reference_logits(model, windows, batch_size=1)
    reference_seconds = time.perf_counter() - started
    print(f"reference logits of {len(windows)} windows: {reference_seconds:.0f} s", flush=True)
    layers = None if args.layers is None else {int(x) for x in args.layers.split(",")}
    names = [n for n in report.modules
             if layers is None or int(re.search(r"layers\.(\d+)\.", n).group(1)) in layers]
    modules = dict(model.named_modules())
    results: dict[str, dict[str, float]] = {}
    for i, name in enumerate(names):
        weight = modules[name].weight
        original = weight.detach().clone()
        start = time.perf_counter()
        try:
            with torch.no_grad():
                weight.copy_(fake_quantize(original, args.bits, rows_per_group=1))
            kl = compare_lm(model, windows, reference, batch_size=1).kl
        finally:
            with torch.no_grad():
                weight.copy_(original)
        entry = report.modules[name]
        results[name] = {"kl": kl, **{p: float(f(entry, args.bits)) for p, f in predictors.items()}}
        print(f"[{i + 1}/{len(names)}] {name}: KL {kl:.5f} ({time.perf_counter() - start:.0f} s)", flush=True)
        rho = _spearman(results, predictors)
        out.write_text(json.dumps({"settings": vars(args), "analysis_seconds": analysis_seconds,
                                   "reference_seconds": reference_seconds, "spearman": rho,
                                   "modules": results, "timings": report.timings}, indent=1))
    _print(results, predictors, args, len(windows))


def _print(results: dict[str, dict[str, float]], predictors: dict, args: argparse.Namespace, windows: int) -> None:
    print(f"\nSpearman's rho against the measured KL change, {len(results)} modules, {args.bits}-bit RTN per row, "
          f"{windows} test windows of {args.seq_len} tokens, predictors from {args.calib_windows} valid windows "
          f"({args.score_labels} labels):")
    for predictor, rho in sorted(_spearman(results, predictors).items(), key=lambda kv: -kv[1]):
        print(f"  {predictor:16s} {rho:+.3f}")


def _spearman(results: dict[str, dict[str, float]], predictors: dict) -> dict[str, float]:
    if len(results) < 3:
        return {}
    measured = [r["kl"] for r in results.values()]
    return {p: float(spearmanr([r[p] for r in results.values()], measured).statistic) for p in predictors}


if __name__ == "__main__":
    main()
