"""Would the class token's query gain from a scale of its own? A probe for issue 12, not a quantizer.

    python benchmarks/probe_class_token.py [--assets DIR] [--bits 6 6] [--recipe recommended]

On DeiT-Tiny's calibration halves (those of benchmarks/select_recipe.py; no evaluation image): the
recipe is calibrated on one half and scored on the other (KL to the float model, agreement), then
the halves swap. Each q quantizer (one per-tensor scale for every token of every head) is then
changed by forward hooks so that the class token's query rows take a grid of their own (the q
quantizer's spec, its range set by the recipe's activation observer on those rows of the calibrating
half, as calibration sets the shared one), in every block or in blocks 8-11 only; and, as the bound,
with those rows left in float. The script also prints each block's class-token query range against the range
the shared scale covers. The hooks emulate what a per-row scale would do: deployed, q·kᵀ with a scale
per query row stays an integer product (each row's scale factors out of its dot products). The probe led
to the ``prefix_rows`` stage (vitq/methods/prefix_rows.py), which builds such a grid into the quantizers,
plans and export; the probe refuses a recipe that runs that stage (the recommended recipe does at W6A6
and W4A8): pass ``--recipe`` a YAML without it to rerun the committed figures.
Results: section "Class-token query probe" of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from foundation import machine, write_section  # noqa: E402
from selection import calibration_halves  # noqa: E402

from vitq.api import evaluate, quantize  # noqa: E402
from vitq.methods.lifecycle import prefix_rows_of  # noqa: E402
from vitq.models import iter_quantizers  # noqa: E402
from vitq.quant.observers import create_observer  # noqa: E402
from vitq.recipes import load_recipe  # noqa: E402

Q_POINT = r"blocks\.(\d+)\.attn\.q_quantizer"
VARIANTS = [("the class token's query rows on their own grid, every block", "own", range(0, 12)),
            ("the same, blocks 8-11 only", "own", range(8, 12)),
            ("the class token's query rows in float, every block (the bound)", "float", range(0, 12))]


def own_grid(batches, spec, config):
    """``(scale, zero_point)`` of ``spec`` for the rows in ``batches``, set by the observer of ``config``."""
    observer = create_observer(config.observer, spec, **config.settings)
    for x in batches:
        observer.observe(x)
    return observer.qparams()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", default=None)
    parser.add_argument("--bits", type=int, nargs=2, default=[6, 6], metavar=("W", "A"))
    parser.add_argument("--recipe", default="recommended")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    w, a = args.bits
    model, halves, fp = calibration_halves(args.assets)
    observer = load_recipe(args.recipe).activations
    results = {label: [] for label in ["the recipe as it is", *(v[0] for v in VARIANTS)]}
    ranges = []
    t0 = time.perf_counter()
    for fold in (0, 1):
        fit, held = halves[fold], halves[1 - fold]
        qmodel = quantize(model, args.recipe, [fit[0]], w_bits=w, a_bits=a, progress=False).model
        if prefix_rows_of(qmodel):
            raise SystemExit(f"recipe {args.recipe!r} already gives the class token's rows a grid of their own at "
                             f"W{w}A{a} (its prefix_rows stage): pass --recipe a YAML without that stage")
        score = lambda: evaluate(model, qmodel, [held], device="cpu", progress=False, fp_logits=fp[1 - fold])  # noqa: E731
        results["the recipe as it is"].append(score())
        points = [(int(re.fullmatch(Q_POINT, n).group(1)), q) for n, q in iter_quantizers(qmodel)
                  if re.fullmatch(Q_POINT, n)]
        rows = {}
        hooks = [q.register_forward_hook(lambda m, args_, out, b=b: rows.setdefault(b, []).append(args_[0][:, :, :1]))
                 for b, q in points]
        with torch.no_grad():
            qmodel(fit[0])
        for hook in hooks:
            hook.remove()
        grids = {b: own_grid(rows[b], q.spec, observer) for b, q in points}
        if fold == 0:
            for b, q in points:
                x = torch.cat(rows[b])
                span = float(q.scale) * (q.spec.qrange[1] - q.spec.qrange[0])
                own = float(grids[b][0]) * (q.spec.qrange[1] - q.spec.qrange[0])
                ranges.append(f"| {b} | {float(x.min()):.2f} to {float(x.max()):.2f} | {span:.2f} | {own:.2f} |")
        for label, mode, blocks in VARIANTS:
            def hook(m, args_, out, b):
                out = out.clone()
                x = args_[0][:, :, :1]
                if mode == "float":
                    out[:, :, :1] = x
                else:
                    scale, zp = grids[b]
                    out[:, :, :1] = m.spec.kind_entry.fake_quantize(x, scale, zp, m.spec)
                return out
            hooks = [q.register_forward_hook(lambda m, args_, out, b=b: hook(m, args_, out, b))
                     for b, q in points if b in blocks]
            results[label].append(score())
            for h in hooks:
                h.remove()
    seconds = time.perf_counter() - t0
    lines = ["## Class-token query probe (held-out calibration images)", "",
             "Command: `" + " ".join(["python benchmarks/probe_class_token.py", *(argv if argv is not None else sys.argv[1:])])
             + "`",
             f"Machine: {machine()}; {seconds:.0f} s in all. DeiT-Tiny, `{args.recipe}` at W{w}A{a} calibrated on one half "
             "of the 100 calibration images and scored on the other (then swapped). Forward hooks emulate a scale of "
             "its own for the class token's query rows (not a deployable quantizer yet: see the script's docstring).", "",
             "| q quantizers | held-out KL (halves) | mean | agreement % |", "|---|---:|---:|---:|"]
    for label, scores in results.items():
        kls = [s["kl"] for s in scores]
        agreements = " / ".join(f"{s['agreement']:.0f}" for s in scores)
        lines.append(f"| {label} | {kls[0]:.4f} / {kls[1]:.4f} | {sum(kls) / 2:.4f} | {agreements} |")
    lines += ["", "The class token's query on the first half, by block: its range, the span of the shared scale's grid, "
              "and the span of its own grid:", "", "| block | class-token q range | shared grid span | own grid span |",
              "|---:|---|---:|---:|", *ranges, ""]
    write_section("## Class-token query probe", lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
