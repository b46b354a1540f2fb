"""Mixed precision under a bit budget (issue 5, part b): Greedy MP vs CLAMP-ViT's mixed search vs
uniform precision at the same average width.

    python benchmarks/mixed.py [--assets DIR] [--seeds 0 1 2] [--methods ...] [--budgets ...]
                               [--search-passes 3] [--search-images 64] [--num-eval N] [--append]
                               [--threads 1] [--dry-run]

CIFAR-10 reference ViT, protocol p1, 256 calibration images from cifar10/train (the seed picks
them and seeds the stages), evaluation on all 10,000 test images. Every row quantizes every
point outside the blocks' linear layers (patch embedding, q/k/v, attention probabilities, head)
at 8 bits, so rows differ only in the widths of the blocks' linear layers (weights and inputs),
which is what ``--budget`` constrains; observers are OMSE's (symmetric weights, asymmetric
inputs) everywhere:

- ``uniform``: every block linear at B bits (a ``greedy_mp`` stage with the single width B);
- ``greedy``: Greedy MP (one-shot sensitivities, KL on 32 calibration images), widths 8…3,
  budget wBaB;
- ``greedy-full``: Greedy MP re-measuring every candidate at every step (``mode: greedy``);
- ``clamp-mp``: CLAMP-ViT's layer-wise search with the widths in the genome (candidates 3…8,
  children over budget rejected), on the same real calibration images as the others (the
  allocation is compared, not data-free generation; ``--search-passes`` passes on the first
  ``--search-images`` of them);
- ``clamp-uniform``: the same search at uniform B bits (no width genes): separates the gain of
  searching scales from the gain of mixing widths.

``--model imagenet``: the real DeiT-Tiny on the foundation benchmark's split of imagenet-sample/
(100 calibration images, seed 0; the other 900 for evaluation), one seed.

Results: benchmarks/results/mixed.json (written after every row), the "Mixed precision" section
of benchmarks/RESULTS.md and benchmarks/results/mixed_pareto_<model>.png (top-1 against the
average width; git-ignored, re-drawn by every run).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from foundation import in_memory, machine, write_section  # noqa: E402

from vitq.api import evaluate, quantize  # noqa: E402
from vitq.data import assets_dir, balanced_subset, load_images, make_loader, scan_folder  # noqa: E402
from vitq.eval import bit_stats  # noqa: E402
from vitq.eval.metrics import predict  # noqa: E402
from vitq.models import load_model  # noqa: E402
from vitq.recipes import load_recipe  # noqa: E402
from vitq.report import pareto  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS_JSON = HERE / "results" / "mixed.json"
WIDTHS = [8, 7, 6, 5, 4, 3]
OBSERVERS = {"weights": {"observer": "omse", "symmetric": True}, "activations": {"observer": "omse", "symmetric": False}}
DEFAULT_BUDGETS = {
    "uniform": [4, 5, 6, 7, 8],
    "greedy": [4, 4.5, 5, 5.5, 6, 7],
    "greedy-full": [5, 6],
    "clamp-mp": [5, 6],
    "clamp-uniform": [5, 6],
}


def clamp_search(passes: int, images: int, mixed: Optional[float]) -> Dict[str, Any]:
    settings = load_recipe("clamp-vit-mp").stage("search").settings.to_dict()
    settings.update(passes=passes, refresh_every=0, max_images=images)
    if mixed is None:
        settings.update(bits=[], budget_w=None, budget_a=None)
    else:
        settings.update(budget_w=mixed, budget_a=mixed)
    return {"search": settings}


def recipe(method: str, budget: float, passes: int, images: int) -> Dict[str, Any]:
    """The recipe of one row (a dict; vitq validates it)."""
    def uniform(b: float) -> Dict[str, Any]:
        if b != int(b):
            raise SystemExit(f"uniform precision needs a whole number of bits, got {b}")
        return {"greedy_mp": {"bits": [int(b)], "budget_w": b, "budget_a": b, "checkpoints": 0}}

    stages: List[Any] = ["calibrate"]
    if method == "uniform":
        stages.append(uniform(budget))
    elif method in ("greedy", "greedy-full"):
        stages.append({"greedy_mp": {"bits": WIDTHS, "budget_w": budget, "budget_a": budget, "max_images": 32,
                                     "mode": "oneshot" if method == "greedy" else "greedy", "checkpoints": 0}})
    elif method == "clamp-mp":
        stages.append(clamp_search(passes, images, budget))
    elif method == "clamp-uniform":
        stages += [uniform(budget), clamp_search(passes, images, None)]
    else:
        raise SystemExit(f"unknown method {method!r}")
    return {"name": f"{method}-{budget:g}", **OBSERVERS, "stages": stages}


class Suite:
    def __init__(self, model_path: Path, eval_batches, calib_sets: Dict[int, List[torch.Tensor]], sink) -> None:
        self.loaded = load_model(model_path)
        self.eval_batches, self.calib_sets, self.sink = eval_batches, calib_sets, sink
        (self.fp_logits,), _ = predict(self.loaded.model, eval_batches, "cpu", progress=False)

    def run(self, method: str, budget: float, seed: int, passes: int, images: int) -> Dict[str, Any]:
        model = self.loaded.model
        t0 = time.perf_counter()
        result = quantize(model, recipe(method, budget, passes, images), self.calib_sets[seed], w_bits=8, a_bits=8,
                          protocol="p1", device="cpu", progress=False, seed=seed)
        quantize_seconds = time.perf_counter() - t0
        m = evaluate(model, result.model, self.eval_batches, device="cpu", progress=False, fp_logits=self.fp_logits)
        stats = bit_stats(result.model, self.calib_sets[seed][0][:1])
        blocks = stats["scopes"]["blocks"]
        widths = [lay["w_bits"] for lay in stats["layers"] if lay["params"] and lay["in_blocks"]]
        inputs = [lay["a_bits"] for lay in stats["layers"] if lay["params"] and lay["in_blocks"]]
        row = dict(method=method, budget=budget, seed=seed, top1=m["quant_top1"], fp_top1=m["fp_top1"],
                   agreement=m["agreement"], kl=m["kl"],
                   avg_w=blocks["w_bits"]["weighted"], avg_a=blocks["a_bits"]["weighted"],
                   mean_w=blocks["w_bits"]["unweighted"], mean_a=blocks["a_bits"]["unweighted"],
                   size_bytes=stats["size_bytes"], fp_size_bytes=stats["fp_size_bytes"], gbops=stats["gbops"],
                   w_hist={str(b): widths.count(b) for b in sorted(set(widths), reverse=True)},
                   a_hist={str(b): inputs.count(b) for b in sorted(set(inputs), reverse=True)},
                   quantize_seconds=round(quantize_seconds, 1), seconds=round(time.perf_counter() - t0, 1))
        if "search" in result.record:
            s = result.record["search"]
            row["search"] = {"evaluations": s["evaluations"], "seconds": s["seconds"],
                             "mean_unit_gain": s["mean_unit_gain"],
                             "rejected": s.get("mixed", {}).get("rejected")}
        print(f"seed {seed} {method:13s} B={budget:<4g} top-1 {row['top1']:.2f} agree {row['agreement']:.2f} "
              f"KL {row['kl']:.4f}  W{row['avg_w']:.3f} A{row['avg_a']:.3f}  {row['size_bytes'] / 1e6:.3f} MB "
              f"{row['gbops']:.3f} GBOPs  quantize {row['quantize_seconds']} s", flush=True)
        self.sink(row)
        return row


def _ms(values: List[float], fmt: str = ".2f") -> str:
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def grouped(rows: List[Dict[str, Any]], methods: List[str]) -> List[List[Dict[str, Any]]]:
    groups = []
    for budget in sorted({r["budget"] for r in rows}):
        for method in methods:
            sel = [r for r in rows if r["method"] == method and r["budget"] == budget]
            if sel:
                groups.append(sel)
    return groups


def table(rows: List[Dict[str, Any]], methods: List[str]) -> List[str]:
    out = ["| budget | method | seeds | top-1 | agreement | KL | avg W / A bits (weighted) | mean W / A bits "
           "(unweighted) | size MB | GBOPs | W widths (first seed) | A widths (first seed) | quantize s |",
           "|---:|---|---:|---:|---:|---:|---|---|---:|---:|---|---|---:|"]
    for sel in grouped(rows, methods):
        r0 = sel[0]
        hist = lambda h: " ".join(f"{n}×{b}" for b, n in h.items())  # noqa: E731
        out.append(
            f"| {r0['budget']:g} | {r0['method']} | {len(sel)} | {_ms([r['top1'] for r in sel])} | "
            f"{_ms([r['agreement'] for r in sel])} | {_ms([r['kl'] for r in sel], '.4f')} | "
            f"{statistics.mean(r['avg_w'] for r in sel):.3f} / {statistics.mean(r['avg_a'] for r in sel):.3f} | "
            f"{statistics.mean(r['mean_w'] for r in sel):.2f} / {statistics.mean(r['mean_a'] for r in sel):.2f} | "
            f"{statistics.mean(r['size_bytes'] for r in sel) / 1e6:.3f} | {statistics.mean(r['gbops'] for r in sel):.3f} | "
            f"{hist(r0['w_hist'])} | {hist(r0['a_hist'])} | {statistics.mean(r['quantize_seconds'] for r in sel):.1f} |")
    return out


def draw(rows: List[Dict[str, Any]], methods: List[str], path: Path, title: str, ylabel: str) -> Optional[Path]:
    series = {}
    for method in methods:
        points = []
        for sel in grouped([r for r in rows if r["method"] == method], [method]):
            points.append({"bits": statistics.mean((r["avg_w"] + r["avg_a"]) / 2 for r in sel),
                           "top1": statistics.mean(r["top1"] for r in sel)})
        if points:
            series[method] = points
    return pareto(series, path, x="bits", y="top1", xlabel="average bits of the blocks' linear layers ((W + A) / 2)",
                  ylabel=ylabel, title=title)


SUITES = {
    "cifar": dict(title="CIFAR-10 reference ViT (`vit_cifar10_d6`)", model="models/vit_cifar10_d6.pth",
                  data="256 calibration images from `cifar10/train` per seed, all {num_eval} `cifar10/test` images, "
                       "seeds {seeds}", layers=24, plot="CIFAR-10 test"),
    "imagenet": dict(title="ImageNet DeiT-Tiny (`deit_tiny_imagenet`)", model="models/deit_tiny_imagenet.pth",
                     data="`imagenet-sample/`: the 100 calibration images of the foundation benchmark's split "
                          "(seed 0), the other {num_eval} for evaluation, one seed", layers=48,
                     plot="ImageNet sample (900 images)"),
}


def write_markdown(results: Dict[str, Any]) -> None:
    methods = results["methods"]
    lines = ["## Mixed precision under a bit budget: Greedy MP and CLAMP-ViT's search (issue 5b)", "",
             "Commands (in order): " + "; ".join(f"`{x}`" for x in results["commands"]) + "  ",
             f"Machine: {results['machine']}  ", f"Date: {results['date']}", "",
             "Protocol p1. Every point outside the blocks' linear layers (patch embedding, q/k/v, attention "
             "probabilities, head) is at 8 bits in every row, so rows differ only in the widths of the blocks' linear "
             "layers (weights and inputs), which the budget constrains. Budget B means average weight bits ≤ B *and* "
             "average input bits ≤ B, averages weighted by parameter count (weights) and by input elements per image "
             "(inputs); the unweighted means over layers are shown too. Size: weights packed at their width plus "
             "float32 scales, other parameters float32. BOPs: MACs × weight bits × input bits per image, linear "
             "layers and the two attention products. OMSE observers everywhere. *uniform*: every block linear at B "
             "bits. *greedy*: Greedy MP, one-shot sensitivities (logit KL on 32 calibration images, widths 8…3). "
             "*greedy-full*: Greedy MP re-measuring every candidate at every step. *clamp-mp*: CLAMP-ViT's "
             "layer-wise search (passes × 6 cycles per layer on the first calibration images, as stated per model; "
             "local contrastive fitness + 0.1·KL, relative mutation ±2 %) with the weight and input widths in the "
             "genome (3…8, a width moves one step with probability 0.2, children over budget rejected), every layer "
             "starting at B, on the same real calibration images as the other rows (the allocation is compared, "
             "not the data-free generation). *clamp-uniform*: the same search without width genes at uniform B. "
             "Mean ± std over seeds. *quantize s*: wall time of quantization, on a machine shared with other jobs "
             "at times. Plots of top-1 against the average width: `benchmarks/results/mixed_pareto_<model>.png` "
             "(not committed; re-drawn by the command).", ""]
    for key, suite in SUITES.items():
        if key not in results or not results[key].get("rows"):
            continue
        c = results[key]
        fp = c["rows"][0]["fp_top1"]
        lines += [f"### {suite['title']}", "",
                  f"Float top-1 {fp:.2f}; {suite['data'].format(num_eval=c['num_eval'], seeds=c['seeds'])}; "
                  f"clamp rows search {c.get('search_passes', results.get('search_passes'))} passes on the first "
                  f"{c.get('search_images', results.get('search_images'))} calibration images.", "",
                  *table(c["rows"], methods), ""]
    write_section("## Mixed precision under a bit budget", lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", default=None, help="assets folder (default: $VITQ_ASSETS or ../shared/assets)")
    parser.add_argument("--model", choices=list(SUITES), default="cifar",
                        help="cifar (seeds as given) or imagenet (DeiT-Tiny, the foundation split, seed 0)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_BUDGETS), choices=list(DEFAULT_BUDGETS))
    parser.add_argument("--budgets", type=float, nargs="+", default=None,
                        help="the same budgets for every method (default: each method's list in DEFAULT_BUDGETS)")
    parser.add_argument("--search-passes", type=int, default=3, help="clamp-mp / clamp-uniform passes (paper: 10)")
    parser.add_argument("--search-images", type=int, default=64,
                        help="clamp-mp / clamp-uniform search on the first N calibration images (CLAMP: 32)")
    parser.add_argument("--num-eval", type=int, default=None, help="evaluate on a subset (quick checks only)")
    parser.add_argument("--append", action="store_true", help="keep the rows already in mixed.json")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dry-run", action="store_true", help="print results, write no files")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = assets_dir(args.assets)
    given = argv if argv is not None else sys.argv[1:]
    command = f"OMP_NUM_THREADS={args.threads} python benchmarks/mixed.py " + " ".join(given)
    previous = json.loads(RESULTS_JSON.read_text()) if (args.append and RESULTS_JSON.exists()) else {}
    results: Dict[str, Any] = previous or {"commands": [], "methods": []}
    results.update(machine=machine(), date=time.strftime("%Y-%m-%d"))
    results["commands"] = results.get("commands", []) + [command.strip()]
    results["methods"] = list(dict.fromkeys(list(results.get("methods", [])) + args.methods))

    loaded = load_model(root / SUITES[args.model]["model"])
    if args.model == "cifar":
        evalset = load_images(root / "cifar10/test", args.num_eval, seed=0, what="evaluation images")
        eval_batches = in_memory(make_loader(evalset, loaded.data_config, 100))
        calib_sets = {s: [x for x, _ in make_loader(load_images(root / "cifar10/train", 256, seed=s,
                                                                 what="calibration images"), loaded.data_config, 64)]
                      for s in args.seeds}
        seeds = args.seeds
    else:
        sample = scan_folder(root / "imagenet-sample")
        calib = balanced_subset(sample, 100, seed=0, what="calibration images")
        evalset = balanced_subset(sample, args.num_eval, seed=0, exclude=calib.paths, what="evaluation images")
        eval_batches = in_memory(make_loader(evalset, loaded.data_config, 50))
        calib_sets = {0: [x for x, _ in make_loader(calib, loaded.data_config, 50)]}
        seeds = [0]
    suite_results = results.setdefault(args.model, {"rows": []})
    suite_results.update(num_eval=len(evalset), search_passes=args.search_passes, search_images=args.search_images,
                         seeds=sorted(set(suite_results.get("seeds", [])) | set(seeds)))

    def sink(row: Dict[str, Any]) -> None:
        key = (row["method"], row["budget"], row["seed"])
        suite_results["rows"] = [r for r in suite_results["rows"]
                                 if (r["method"], r["budget"], r["seed"]) != key] + [row]
        if not args.dry_run:
            RESULTS_JSON.parent.mkdir(exist_ok=True)
            RESULTS_JSON.write_text(json.dumps(results, indent=1) + "\n")

    suite = Suite(root / SUITES[args.model]["model"], eval_batches, calib_sets, sink)
    for seed in seeds:
        for method in args.methods:
            for budget in args.budgets or DEFAULT_BUDGETS[method]:
                if method in ("uniform", "clamp-uniform") and not math.isclose(budget, round(budget)):
                    continue
                suite.run(method, budget, seed, args.search_passes, args.search_images)
    if args.dry_run:
        return 0
    write_markdown(results)
    drawn = [draw(results[key]["rows"], results["methods"], HERE / "results" / f"mixed_pareto_{key}.png",
                  f"mixed vs uniform precision: {SUITES[key]['title']}", f"top-1 (%), {SUITES[key]['plot']}")
             for key in SUITES if results.get(key, {}).get("rows")]
    print(f"wrote {HERE / 'RESULTS.md'}, {RESULTS_JSON}" + "".join(f", {d}" for d in drawn if d))
    return 0


if __name__ == "__main__":
    sys.exit(main())
