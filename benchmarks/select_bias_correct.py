"""Does empirical bias correction (the ``bias_correct`` stage) help the recommended recipe, and at
which bits? Decided on calibration images only (issue 12).

    python benchmarks/select_bias_correct.py [--assets DIR] [--bits w4a4 w6a6 w8a8 w4a8]

DeiT-Tiny's 100 calibration images (the accuracy benchmark's split) in two halves of 50: the
recommended recipe without its bias correction is calibrated on one half, then ``bias_correct`` (all of the shift, or half of
it) is run on the same half from that plan, and every variant is scored (KL to the float model,
top-1 agreement) on the half it never saw, and on the half it was fitted on; then the halves
swap (fold 1). None of the 900 evaluation images is used. Results:
benchmarks/results/bias_correct_selection.json and a section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import _recommended, parse_bits  # noqa: E402
from selection import calibration_halves, new_results  # noqa: E402
from foundation import write_section  # noqa: E402

from vitq.api import evaluate, quantize  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS_JSON = HERE / "results" / "bias_correct_selection.json"
VARIANTS = {"recommended − bias_correct": None, "+bias_correct": {}, "+bias_correct (half)": {"strength": 0.5}}


def render(results) -> None:
    rows = results["rows"]
    lines = ["## Bias correction: chosen on calibration images (issue 12)", "",
             f"Command: `{results['command']}`  ", f"Machine: {results['machine']}  ", f"Date: {results['date']}", "",
             "DeiT-Tiny, the 100 calibration images in two halves of 50: the recommended recipe without its bias "
             "correction calibrated on one, "
             "`bias_correct` run from its plan on the same half, each variant scored on the *other* half (held-out) "
             "and on its own (fitted); then the halves swap. KL(float ‖ quantized), lower is better; agreement in %.",
             "", "| bits | variant | held-out KL fold 0 | fold 1 | mean | held-out agreement (mean) | fitted KL (mean) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for bits in dict.fromkeys(r["bits"] for r in rows):
        for variant in VARIANTS:
            rs = [r for r in rows if r["bits"] == bits and r["variant"] == variant]
            if len(rs) != 2:
                continue
            kl = [r["held_kl"] for r in sorted(rs, key=lambda r: r["fold"])]
            lines.append(f"| {bits} | {variant} | {kl[0]:.4f} | {kl[1]:.4f} | {sum(kl) / 2:.4f} | "
                         f"{sum(r['held_agreement'] for r in rs) / 2:.1f} | {sum(r['fit_kl'] for r in rs) / 2:.4f} |")
    lines += ["", results.get("conclusion", ""), ""]
    write_section("## Bias correction: chosen on calibration images", lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", default=None)
    parser.add_argument("--bits", nargs="+", default=["w4a4", "w6a6", "w8a8", "w4a8"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--render", action="store_true", help="rewrite the RESULTS.md section from the JSON")
    args = parser.parse_args(argv)
    if args.render:
        render(json.loads(RESULTS_JSON.read_text()))
        return 0
    torch.set_num_threads(args.threads)
    model, halves, fp = calibration_halves(args.assets)
    results = new_results('select_bias_correct.py', argv, RESULTS_JSON, False)
    for w, a in parse_bits(args.bits):
        for fold in (0, 1):
            fit, held = halves[fold], halves[1 - fold]
            base = quantize(model, _recommended("recommended − bias_correct"), [fit[0]], w_bits=w, a_bits=a,
                            progress=False)
            for variant, settings in VARIANTS.items():
                t0 = time.perf_counter()
                qmodel = base.model if settings is None else quantize(
                    model, {"name": "bc", "stages": [{"bias_correct": settings}]}, [fit[0]], start_plan=base.plan,
                    progress=False).model
                seconds = time.perf_counter() - t0
                h = evaluate(model, qmodel, [held], device="cpu", progress=False, fp_logits=fp[1 - fold])
                f = evaluate(model, qmodel, [fit], device="cpu", progress=False, fp_logits=fp[fold])
                row = {"bits": f"W{w}A{a}", "fold": fold, "variant": variant, "held_kl": round(h["kl"], 4),
                       "held_agreement": h["agreement"], "fit_kl": round(f["kl"], 4),
                       "seconds": round(seconds, 1) if settings is not None else None}
                print(row, flush=True)
                results["rows"].append(row)
                RESULTS_JSON.write_text(json.dumps(results, indent=1) + "\n")
    render(results)
    print(f"wrote {RESULTS_JSON} and {HERE / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
