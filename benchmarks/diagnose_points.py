"""Which quant points cost accuracy: quantize with a recipe, then enable one group of quant points
at a time (by role, and by the linear layer whose input it is) and measure agreement and KL.

    python benchmarks/diagnose_points.py [--assets DIR] [--bits 8 8] [--recipe omse] [--holdout]

Runs on the ImageNet DeiT-Tiny with the 100/900 split of imagenet-sample/ and appends its table to
benchmarks/RESULTS.md ("Diagnosis" section). Groups are plan-style name patterns (``re:``).
``--holdout`` never touches the evaluation images: the recipe is calibrated on the first half of
the 100 calibration images (the halves of benchmarks/select_recipe.py) and the groups are scored on
the second half (section "Diagnosis on held-out calibration images"), so that what it shows may
guide a choice of the recipe.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from foundation import in_memory, machine, write_section  # noqa: E402

from vitq.api import quantize  # noqa: E402
from vitq.data import assets_dir, balanced_subset, make_loader, scan_folder  # noqa: E402
from vitq.eval.metrics import compare, predict  # noqa: E402
from vitq.models import iter_quantizers, load_model  # noqa: E402

GROUPS = [
    ("all quant points", None, r".*"),
    ("weights only", "weight", r".*"),
    ("linear/conv inputs only", "act", r".*"),
    ("q, k, v only", "attn_qkv", r".*"),
    ("q only", "attn_qkv", r"blocks\.\d+\.attn\.q_quantizer"),
    ("k only", "attn_qkv", r"blocks\.\d+\.attn\.k_quantizer"),
    ("q of blocks 0-3 only", "attn_qkv", r"blocks\.[0-3]\.attn\.q_quantizer"),
    ("q of blocks 4-7 only", "attn_qkv", r"blocks\.[4-7]\.attn\.q_quantizer"),
    ("q of blocks 8-11 only", "attn_qkv", r"blocks\.(8|9|10|11)\.attn\.q_quantizer"),
    ("q of the last block only", "attn_qkv", r"blocks\.11\.attn\.q_quantizer"),
    ("q, class-token rows only", "attn_qkv:cls", r"blocks\.\d+\.attn\.q_quantizer"),
    ("q, patch-token rows only", "attn_qkv:patches", r"blocks\.\d+\.attn\.q_quantizer"),
    ("v only", "attn_qkv", r"blocks\.\d+\.attn\.v_quantizer"),
    ("post-softmax only", "attn_probs", r".*"),
    ("qkv inputs (LayerNorm-1 outputs) only", "act", r"blocks\.\d+\.attn\.qkv\.input_quantizer"),
    ("fc1 inputs (LayerNorm-2 outputs) only", "act", r"blocks\.\d+\.mlp\.fc1\.input_quantizer"),
    ("fc2 inputs (GELU outputs) only", "act", r"blocks\.\d+\.mlp\.fc2\.input_quantizer"),
    ("proj inputs (attn·v) only", "act", r"blocks\.\d+\.attn\.proj\.input_quantizer"),
    ("image input (patch embedding) only", "act", r"patch_embed\.proj\.input_quantizer"),
    ("head input only", "act", r"head\.input_quantizer"),
]


def _rows(x, quantized, sel):
    """``x`` with only the token rows ``sel`` (dim 2 of [B, H, N, d]) taken from ``quantized``."""
    mixed = x.clone()
    mixed[:, :, sel] = quantized[:, :, sel]
    return mixed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", default=None)
    parser.add_argument("--bits", type=int, nargs=2, default=[8, 8], metavar=("W", "A"))
    parser.add_argument("--recipe", default="omse")
    parser.add_argument("--holdout", action="store_true",
                        help="calibrate on half of the calibration images, score on the other half (no evaluation image)")
    args = parser.parse_args(argv)
    root = assets_dir(args.assets)
    loaded = load_model(root / "models/deit_tiny_imagenet.pth")
    sample = scan_folder(root / "imagenet-sample")
    calib = balanced_subset(sample, 100, seed=0)
    halves = list(make_loader(calib, loaded.data_config, 50))  # decoded once; the halves of select_recipe.py
    calib_batches = [x for x, _ in halves]
    if args.holdout:  # fit on the first half, score on the second
        calib_batches, eval_batches, scored = [halves[0][0]], [halves[1]], f"the other {len(halves[1][0])}"
    else:
        evalset = balanced_subset(sample, None, seed=0, exclude=calib.paths)
        eval_batches = in_memory(make_loader(evalset, loaded.data_config, 50))
        scored = f"{len(evalset)} evaluation"
    (fp,), labels = predict(loaded.model, eval_batches, "cpu", progress=False)
    w, a = args.bits
    t0 = time.perf_counter()
    qmodel = quantize(loaded.model, args.recipe, calib_batches, w_bits=w, a_bits=a, device="cpu", progress=False).model
    print(f"quantized in {time.perf_counter() - t0:.0f} s", flush=True)
    points = list(iter_quantizers(qmodel))
    rows = []
    for label, role, pattern in GROUPS:
        role, _, tokens = (role or "").partition(":")  # ROLE:cls / ROLE:patches: only those rows of [B, H, N, d]
        hooks = []
        for name, q in points:
            q.enabled = q.spec.enabled and (not role or q.role == role) and re.fullmatch(pattern, name) is not None
            if q.enabled and tokens:
                rows_of = slice(0, 1) if tokens == "cls" else slice(1, None)
                hooks.append(q.register_forward_hook(lambda m, args, out, sel=rows_of: _rows(args[0], out, sel)))
        (ql,), _ = predict(qmodel, eval_batches, "cpu", progress=False)
        for hook in hooks:
            hook.remove()
        m = compare(fp, ql, labels)
        rows.append((label, m))
        print(f"{label:40s} top-1 {m['quant_top1']:.2f} agree {m['agreement']:.2f} KL {m['kl']:.4f}", flush=True)
    heading = "## Diagnosis on held-out calibration images" if args.holdout else "## Diagnosis"
    lines = [f"{heading}: where W{w}A{a} {args.recipe} loses on DeiT-Tiny", "",
             f"Command: `python benchmarks/diagnose_points.py --bits {w} {a} --recipe {args.recipe}"
             f"{' --holdout' if args.holdout else ''}`  ",
             f"Machine: {machine()}  ", f"Date: {time.strftime('%Y-%m-%d')}", "",
             f"Protocol p1, {sum(len(b) for b in calib_batches)} calibration images, scored on {scored} images of "
             f"imagenet-sample/; float top-1 {rows[0][1]['fp_top1']:.2f}. Each row enables only the named quant points "
             "of the same calibrated model. Weights that a stage rewrote (GPTQ, block reconstruction) keep their "
             "rounded values with their quantizers off, so with such a recipe every row includes the weights' "
             "error (the *weights only* row): a group's own part is its KL minus that row's.",
             "", "| quant points enabled | top-1 | agreement | KL |", "|---|---:|---:|---:|"]
    lines += [f"| {label} | {m['quant_top1']:.2f} | {m['agreement']:.2f} | {m['kl']:.4f} |" for label, m in rows]
    write_section(heading + ":", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
