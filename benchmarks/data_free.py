"""Data-free calibration benchmark (issue 3): real images vs gaussian vs psaq vs clamp.

    python benchmarks/data_free.py [--assets DIR] [--seeds 0 1 2] [--iterations 200] [--only cifar|imagenet]

CIFAR-10 reference ViT: omse, protocol p1, W4A8 and W8A8, 32 and 128 calibration images, each
seed a separate generation (the 32-image set is the first 32 of the 128), evaluation on all
10,000 test images. ImageNet DeiT-Tiny: W4A8 omse, 32 images from each source vs 32 real images of
the 100-image calibration split of imagenet-sample/, evaluation on the other 900; the grids are
saved to benchmarks/results/grids/. Results: benchmarks/results/data_free.json and the
"Data-free" section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from foundation import RESULTS_MD, in_memory, machine, write_section  # noqa: E402

from vitq.api import evaluate, quantize  # noqa: E402
from vitq.data import assets_dir, balanced_subset, load_images, make_loader, scan_folder  # noqa: E402
from vitq.data.synthetic import create_generator  # noqa: E402
from vitq.data.synthetic.io import image_stats, save_grid  # noqa: E402
from vitq.eval.metrics import predict  # noqa: E402
from vitq.models import load_model  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS_JSON = HERE / "results" / "data_free.json"
GRIDS = HERE / "results" / "grids"
SOURCES = ("real", "gaussian", "psaq", "clamp")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_images(source: str, loaded, n: int, seed: int, iterations: int, real_pool, device: str = "cpu",
                settings: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    if source == "real":
        subset = balanced_subset(real_pool, n, seed=seed, what="calibration images")
        images = torch.cat([x for x, _ in make_loader(subset, loaded.data_config, 64)])
        return {"images": images, "seconds": 0.0}
    settings = {} if source == "gaussian" else {"iterations": iterations, **(settings or {})}
    result = create_generator(source, settings).generate(loaded.model, n, loaded.data_config, seed=seed,
                                                         device=device, progress=False)
    stats = image_stats(loaded.model, result.images, result.targets)
    return {"images": result.images, "seconds": result.seconds, "stats": stats}


def cifar(root: Path, seeds: List[int], iterations: int, num_eval=None, bits=((4, 8), (8, 8)),
          sizes=(32, 128)) -> Dict[str, Any]:
    loaded = load_model(root / "models/vit_cifar10_d6.pth")
    pool = scan_folder(root / "cifar10/train")
    evalset = load_images(root / "cifar10/test", num_eval, seed=0)
    eval_batches = in_memory(make_loader(evalset, loaded.data_config, 100))
    (fp_logits,), _ = predict(loaded.model, eval_batches, "cpu", progress=False)
    rows = []
    for seed in seeds:
        for source in SOURCES:
            made = make_images(source, loaded, max(sizes), seed, iterations, pool)
            if source != "real" and seed == seeds[0]:
                GRIDS.mkdir(parents=True, exist_ok=True)
                save_grid(made["images"][:64], GRIDS / f"cifar_{source}.png", loaded.data_config)
            for n in sizes:
                calib = list(made["images"][:n].split(64))
                for w, a in bits:
                    q = quantize(loaded.model, "omse", calib, w_bits=w, a_bits=a, protocol="p1", device="cpu",
                                 progress=False)
                    m = evaluate(loaded.model, q.model, eval_batches, device="cpu", progress=False, fp_logits=fp_logits)
                    row = dict(source=source, seed=seed, num_calib=n, w_bits=w, a_bits=a, top1=m["quant_top1"],
                               fp_top1=m["fp_top1"], agreement=m["agreement"], kl=m["kl"],
                               gen_seconds_per_image=made["seconds"] / max(sizes), stats=made.get("stats"))
                    rows.append(row)
                    print(f"[cifar] seed {seed} {source:8s} n={n:3d} W{w}A{a}: top-1 {row['top1']:.2f} "
                          f"agree {row['agreement']:.2f} ({row['gen_seconds_per_image']:.2f} s/image)", flush=True)
    return {"rows": rows, "num_eval": len(evalset), "iterations": iterations, "seeds": seeds}


def imagenet(root: Path, iterations: int, num_eval=None) -> Dict[str, Any]:
    loaded = load_model(root / "models/deit_tiny_imagenet.pth")
    sample = scan_folder(root / "imagenet-sample")
    calib_split = balanced_subset(sample, 100, seed=0, what="calibration images")
    evalset = balanced_subset(sample, num_eval, seed=0, exclude=calib_split.paths, what="evaluation images")
    eval_batches = in_memory(make_loader(evalset, loaded.data_config, 50))
    (fp_logits,), _ = predict(loaded.model, eval_batches, "cpu", progress=False)
    rows = []
    for source in SOURCES:
        rss_before = peak_rss_mib()
        made = make_images(source, loaded, 32, 0, iterations, calib_split)
        if source != "real":
            GRIDS.mkdir(parents=True, exist_ok=True)
            save_grid(made["images"], GRIDS / f"imagenet_{source}.png", loaded.data_config)
        q = quantize(loaded.model, "omse", list(made["images"].split(32)), w_bits=4, a_bits=8, protocol="p1",
                     device="cpu", progress=False)
        m = evaluate(loaded.model, q.model, eval_batches, device="cpu", progress=False, fp_logits=fp_logits)
        row = dict(source=source, top1=m["quant_top1"], fp_top1=m["fp_top1"], agreement=m["agreement"], kl=m["kl"],
                   gen_seconds=round(made["seconds"], 1), peak_rss_mib=round(max(rss_before, peak_rss_mib()), 0),
                   stats=made.get("stats"))
        rows.append(row)
        print(f"[imagenet] {source:8s}: top-1 {row['top1']:.2f} (fp {row['fp_top1']:.2f}) agree {row['agreement']:.2f} "
              f"gen {row['gen_seconds']} s", flush=True)
    return {"rows": rows, "num_eval": len(evalset), "iterations": iterations}


def _mean_std(values: List[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def write_markdown(results: Dict[str, Any], command: str) -> None:
    commands = [results[k] for k in ("command_cifar", "command_imagenet") if results.get(k)] or [command]
    lines = ["## Data-free calibration (issue 3)", "",
             "Command" + ("s" if len(commands) > 1 else "") + ": " + ", ".join(f"`{c}`" for c in commands) + "  ",
             f"Machine: {results['machine']}  ", f"Date: {results['date']}", ""]
    if "cifar" in results:
        c = results["cifar"]
        lines += [f"### CIFAR-10 reference ViT, omse p1, evaluation on all {c['num_eval']} test images, seeds "
                  f"{c['seeds']}, {c['iterations']} generator steps per batch of 32", "",
                  "| bits | images | source | top-1 | agreement | generation s/image |", "|---|---:|---|---:|---:|---:|"]
        keys = sorted({(r["w_bits"], r["a_bits"], r["num_calib"]) for r in c["rows"]})
        for w, a, n in keys:
            for source in SOURCES:
                sel = [r for r in c["rows"] if (r["w_bits"], r["a_bits"], r["num_calib"], r["source"]) == (w, a, n, source)]
                if sel:
                    lines.append(f"| W{w}A{a} | {n} | {source} | {_mean_std([r['top1'] for r in sel])} | "
                                 f"{_mean_std([r['agreement'] for r in sel])} | "
                                 f"{statistics.mean(r['gen_seconds_per_image'] for r in sel):.2f} |")
        lines.append(f"\nFloat top-1 on the same images: {c['rows'][0]['fp_top1']:.2f}.\n")
    if "imagenet" in results:
        i = results["imagenet"]
        lines += [f"### ImageNet DeiT-Tiny, W4A8 omse p1, 32 calibration images, evaluation on {i['num_eval']} "
                  f"images of imagenet-sample/, {i['iterations']} generator steps", "",
                  "| source | top-1 | agreement | KL | generation s | peak RSS MiB |", "|---|---:|---:|---:|---:|---:|"]
        for r in i["rows"]:
            lines.append(f"| {r['source']} | {r['top1']:.2f} | {r['agreement']:.2f} | {r['kl']:.4f} | "
                         f"{r['gen_seconds']} | {r['peak_rss_mib']:.0f} |")
        lines.append(f"\nFloat top-1 on the same images: {i['rows'][0]['fp_top1']:.2f}. Grids: "
                     "`benchmarks/results/grids/`.\n")
    write_section("## Data-free", lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", default=None)
    parser.add_argument("--only", choices=["cifar", "imagenet"], default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, default=200, help="generator steps per batch")
    parser.add_argument("--num-eval", type=int, default=None, help="evaluate on a subset (smoke runs only)")
    parser.add_argument("--bits", nargs="+", default=["w4a8", "w8a8"], help="CIFAR bit-widths, e.g. w4a8 w8a8")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 128], help="CIFAR calibration-set sizes")
    parser.add_argument("--dry-run", action="store_true", help="print results, write no files")
    args = parser.parse_args(argv)
    root = assets_dir(args.assets)
    results: Dict[str, Any] = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else {}
    results.update(machine=machine(), date=time.strftime("%Y-%m-%d"))
    if args.only in (None, "cifar"):
        bits = [tuple(int(v) for v in b.lower().lstrip("w").split("a")) for b in args.bits]
        results["cifar"] = cifar(root, args.seeds, args.iterations, args.num_eval, bits, args.sizes)
    if args.only in (None, "imagenet"):
        results["imagenet"] = imagenet(root, args.iterations, args.num_eval)
    if args.dry_run:
        return 0
    RESULTS_JSON.parent.mkdir(exist_ok=True)
    command = ("python benchmarks/data_free.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    for part in ("cifar", "imagenet"):
        if args.only in (None, part):
            results[f"command_{part}"] = command
    RESULTS_JSON.write_text(json.dumps(results, indent=1) + "\n")
    write_markdown(results, command)
    print(f"wrote {RESULTS_MD} and {RESULTS_JSON}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
