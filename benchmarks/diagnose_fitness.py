"""How much room each search fitness leaves: CPT-V's InfoNCE (and KL for comparison) of an OMSE
start, against its floor (the float model against itself) and its value for uniform logits.

    python benchmarks/diagnose_fitness.py [--assets DIR] [--seed 0] [--bits 4 3]

On the CIFAR-10 reference ViT with the search benchmark's calibration images (seed's 1,000 train
images, batches of 100 as cpt-v uses them). If the start's loss already sits at the floor, the
search has nothing to minimise whatever its budget. Writes the "Diagnosis: search fitness" section
of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from foundation import machine, write_section  # noqa: E402

from vitq.api import quantize  # noqa: E402
from vitq.data import assets_dir, balanced_subset, make_loader, scan_folder  # noqa: E402
from vitq.methods.fitness import infonce_loss  # noqa: E402
from vitq.models import load_model  # noqa: E402

BATCH = 100  # cpt-v's search batch


def _ce(quant: torch.Tensor, ref: torch.Tensor, temperature: float) -> float:
    """The cross-entropy inside InfoNCE (the fitness is 2T times it)."""
    return float(infonce_loss(quant, ref, temperature)) / (2 * temperature)


def _retrieval(quant: torch.Tensor, ref: torch.Tensor) -> float:
    """Percent of images whose own float output is the most similar one in the batch."""
    sim = F.normalize(quant, dim=1) @ F.normalize(ref, dim=1).t()
    return 100.0 * float((sim.argmax(1) == torch.arange(len(quant))).double().mean())


def _kl(quant: torch.Tensor, ref: torch.Tensor) -> float:
    return float(F.kl_div(F.log_softmax(quant, 1), F.log_softmax(ref, 1), log_target=True, reduction="batchmean"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3], help="weight bits (activations 8)")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[3.0, 0.1])
    args = parser.parse_args(argv)
    root = assets_dir(args.assets)
    loaded = load_model(root / "models/vit_cifar10_d6.pth")
    subset = balanced_subset(scan_folder(root / "cifar10/train"), 1000, seed=args.seed, what="calibration images")
    images = torch.cat([x for x, _ in make_loader(subset, loaded.data_config, BATCH)])
    batches = list(images.split(BATCH))
    with torch.no_grad():
        fp = [loaded.model.eval()(b) for b in batches]
    rows = []
    for w in args.bits:
        q = quantize(loaded.model, "omse", batches, w_bits=w, a_bits=8, protocol="p1", device="cpu", progress=False,
                     seed=args.seed)
        with torch.no_grad():
            qo = [q.model(b.to(next(q.model.parameters()).device)).cpu() for b in batches]
        for t in args.temperatures:
            start = sum(_ce(a, b, t) for a, b in zip(qo, fp)) / len(fp)
            floor = sum(_ce(b, b, t) for b in fp) / len(fp)
            rows.append(dict(bits=f"W{w}A8", temperature=t, start=start, floor=floor, uniform=math.log(BATCH),
                             retrieval=sum(_retrieval(a, b) for a, b in zip(qo, fp)) / len(fp),
                             kl=sum(_kl(a, b) for a, b in zip(qo, fp)) / len(fp)))
            r = rows[-1]
            print(f"W{w}A8 T={t}: CE start {start:.4f} floor {floor:.4f} uniform {r['uniform']:.4f} "
                  f"retrieval {r['retrieval']:.1f}% KL {r['kl']:.4f}", flush=True)
    command = ("python benchmarks/diagnose_fitness.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    lines = ["## Diagnosis: how much the CPT-V fitness can still improve (issue 4)", "",
             f"Command: `{command}`  ", f"Machine: {machine()}  ", f"Date: {time.strftime('%Y-%m-%d')}", "",
             f"CIFAR-10 reference ViT, omse p1 with 8-bit activations, seed {args.seed}'s 1,000 calibration images "
             f"in batches of {BATCH} (what cpt-v searches on). *CE*: the cross-entropy inside InfoNCE "
             "(the fitness is 2T·CE), logits against the float logits, the other images of the batch as negatives; "
             "*floor*: the float model against itself (the best any plan can reach); *uniform*: ln(batch). "
             "*retrieval*: images whose own float logits are their most similar. *KL*: KL(float ‖ quantized) per image.",
             "", "| bits | T | CE of the omse start | floor | uniform | start − floor | share of the room left | "
             "retrieval | KL |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        room = r["uniform"] - r["floor"]
        lines.append(f"| {r['bits']} | {r['temperature']:g} | {r['start']:.4f} | {r['floor']:.4f} | {r['uniform']:.4f} | "
                     f"{r['start'] - r['floor']:.4f} | {100 * (r['start'] - r['floor']) / room:.2f} % | "
                     f"{r['retrieval']:.1f} % | {r['kl']:.4f} |")
    write_section("## Diagnosis: how much the CPT-V fitness", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
