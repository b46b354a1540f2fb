"""Evolutionary search benchmark (issue 4): CPT-V on top of OMSE, and data-free CLAMP-ViT.

    python benchmarks/search.py [--assets DIR] [--only cifar|imagenet] [--seeds 0 1 2]
        [--passes 2] [--search-images 500] [--df-passes 3] [--in-passes 3] [--in-df-passes 1]

CIFAR-10 reference ViT, protocol p1, evaluation on the 10,000 test images (never used to choose
anything), each seed its own 1,000-image calibration subset of the train images:
(a) ``omse`` W4A8 and W3A8 on the 1,000 images → ``cpt-v`` on top (``--start-plan``), searching
on the first ``--search-images`` of them, with the recipe's settings except ``passes``;
W3A8 also with the KL fitness for comparison;
(b) W4A8 data-free: 32 ``psaq`` images + ``omse`` vs 32 ``clamp`` images + ``omse`` (no search)
vs ``clamp-vit`` (the same images, then the layer-wise search with data refresh), against real
``omse``.
ImageNet DeiT-Tiny, the 100/900 split of imagenet-sample/: the same at W4A8 with the search
budget cut to fit about 30 minutes on 2 CPU cores.
Results: benchmarks/results/search.json and the "Evolutionary search" section of RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_free import make_images, peak_rss_mib  # noqa: E402
from foundation import in_memory, machine, write_section  # noqa: E402

from vitq.api import evaluate, quantize  # noqa: E402
from vitq.data import assets_dir, balanced_subset, load_images, make_loader, scan_folder  # noqa: E402
from vitq.data.synthetic import create_generator, make_refresher  # noqa: E402
from vitq.eval.metrics import predict  # noqa: E402
from vitq.models import load_model  # noqa: E402
from vitq.recipes import load_recipe  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS_JSON = HERE / "results" / "search.json"
GEN_ITERATIONS = 100  # as the data-free benchmark (issue 3)


def _images(subset, data_config) -> torch.Tensor:
    return torch.cat([x for x, _ in make_loader(subset, data_config, 100)])


def save_part(name: str, part: Dict[str, Any]) -> None:
    """Write one part into the results file at once (other parts kept), so a cut run keeps its rows."""
    results = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else {}
    results.update(machine=machine(), date=time.strftime("%Y-%m-%d"))
    results[name] = part
    RESULTS_JSON.parent.mkdir(exist_ok=True)
    RESULTS_JSON.write_text(json.dumps(results, indent=1) + "\n")


class Bench:
    def __init__(self, name: str, loaded, eval_batches, facts: Dict[str, Any], save: bool = True) -> None:
        self.name, self.loaded, self.eval_batches = name, loaded, eval_batches
        self.facts, self.save = facts, save
        (self.fp_logits,), _ = predict(loaded.model, eval_batches, "cpu", progress=False)
        self.rows: List[Dict[str, Any]] = []

    def run(self, method: str, recipe, images: torch.Tensor, w: int, a: int, seed: int, batch: int = 100,
            **kwargs) -> Any:
        t0 = time.perf_counter()
        q = quantize(self.loaded.model, recipe, list(images.split(batch)), w_bits=w, a_bits=a, protocol="p1",
                     device="cpu", progress=False, seed=seed, **kwargs)
        seconds = time.perf_counter() - t0
        m = evaluate(self.loaded.model, q.model, self.eval_batches, device="cpu", progress=False,
                     fp_logits=self.fp_logits)
        search = q.record.get("search", {})
        row = dict(method=method, seed=seed, w_bits=w, a_bits=a, top1=m["quant_top1"], fp_top1=m["fp_top1"],
                   agreement=m["agreement"], kl=m["kl"], num_calib=len(images), seconds=round(seconds, 1),
                   search={k: search.get(k) for k in ("evaluations", "seconds", "first_fitness", "last_fitness",
                                                       "unit_searches", "refreshes", "fitness", "mean_unit_gain",
                                                       "improved_units")} if search else None)
        self.rows.append(row)
        if self.save:
            save_part(self.name, {**self.facts, "rows": self.rows, "complete": False})
        extra = (f" search {search['seconds']:.0f} s, {search['improved_units']}/{search['unit_searches']} unit searches "
                 f"improved, mean relative fitness gain per unit {100 * search['mean_unit_gain']:.3f}%") if search else ""
        print(f"[{self.name}] seed {seed} W{w}A{a} {method:22s} top-1 {row['top1']:.2f} agree {row['agreement']:.2f}"
              f"{extra}", flush=True)
        return q


def cptv_recipe(passes: int, **more):
    return load_recipe("cpt-v").with_overrides({"search": {"passes": passes, **more}})


def clamp_recipe(passes: int, refresh_every: int, batch_size: int):
    return load_recipe("clamp-vit").with_overrides(
        {"search": {"passes": passes, "refresh_every": refresh_every, "batch_size": batch_size}})


def data_free_rows(bench: Bench, seed: int, w: int, a: int, passes: int, refresh_every: int, refresh_steps: int,
                   batch: int) -> None:
    loaded = bench.loaded
    psaq = make_images("psaq", loaded, 32, seed, GEN_ITERATIONS, None)
    bench.run("psaq + omse", "omse", psaq["images"], w, a, seed, batch)
    bench.rows[-1]["gen_seconds"] = round(psaq["seconds"], 1)
    gen = create_generator("clamp", {"iterations": GEN_ITERATIONS})
    clamp = gen.generate(loaded.model, 32, loaded.data_config, seed=seed, device="cpu", progress=False)
    bench.run("clamp + omse", "omse", clamp.images, w, a, seed, batch)
    bench.rows[-1]["gen_seconds"] = round(clamp.seconds, 1)
    recipe = clamp_recipe(passes, refresh_every, batch)
    refresh = make_refresher(gen, loaded.model, clamp.targets, loaded.data_config, steps=refresh_steps,
                             adversary_weight=recipe.data_free.refresh_adversary, seed=seed, device="cpu")
    bench.run("clamp-vit", recipe, clamp.images, w, a, seed, batch, refresh=refresh)
    bench.rows[-1]["gen_seconds"] = round(clamp.seconds, 1)
    bench.rows[-1]["refresh_steps"] = refresh_steps


def cifar(root: Path, args) -> Dict[str, Any]:
    loaded = load_model(root / "models/vit_cifar10_d6.pth")
    pool = scan_folder(root / "cifar10/train")
    evalset = load_images(root / "cifar10/test", args.num_eval, seed=0)
    facts = {"num_eval": len(evalset), "passes": args.passes, "search_images": args.search_images,
             "df_passes": args.df_passes, "df_refresh_every": args.df_refresh_every, "seeds": args.seeds,
             "refresh_steps": args.refresh_steps, "kl_seeds": args.kl_seeds}
    bench = Bench("cifar", loaded, in_memory(make_loader(evalset, loaded.data_config, 100)), facts, not args.dry_run)
    for seed in args.seeds:
        images = _images(balanced_subset(pool, 1000, seed=seed, what="calibration images"), loaded.data_config)
        for w, a in ((4, 8), (3, 8)):
            start = bench.run("omse", "omse", images, w, a, seed)
            fitnesses = ["infonce", "kl"] if w == 3 and seed in args.kl_seeds else ["infonce"]
            for fitness in fitnesses:
                recipe = cptv_recipe(args.passes, **({} if fitness == "infonce" else {"fitness": fitness,
                                                                                      "temperature": 1.0}))
                bench.run("omse → cpt-v" + ("" if fitness == "infonce" else f" ({fitness})"), recipe,
                          images[:args.search_images], w, a, seed, start_plan=start.plan)
        data_free_rows(bench, seed, 4, 8, args.df_passes, args.df_refresh_every, args.refresh_steps, 32)
    return {**facts, "rows": bench.rows, "complete": True}


def imagenet(root: Path, args) -> Dict[str, Any]:
    loaded = load_model(root / "models/deit_tiny_imagenet.pth")
    sample = scan_folder(root / "imagenet-sample")
    calib_split = balanced_subset(sample, 100, seed=0, what="calibration images")
    evalset = balanced_subset(sample, args.num_eval, seed=0, exclude=calib_split.paths, what="evaluation images")
    facts = {"num_eval": len(evalset), "passes": args.in_passes, "df_passes": args.in_df_passes,
             "df_refresh_every": args.in_df_refresh_every, "refresh_steps": args.refresh_steps}
    bench = Bench("imagenet", loaded, in_memory(make_loader(evalset, loaded.data_config, 50)), facts, not args.dry_run)
    images = _images(calib_split, loaded.data_config)
    t0 = time.perf_counter()
    start = bench.run("omse", "omse", images, 4, 8, 0)
    bench.run("omse → cpt-v", cptv_recipe(args.in_passes), images, 4, 8, 0, start_plan=start.plan)
    data_free_rows(bench, 0, 4, 8, args.in_df_passes, args.in_df_refresh_every, args.refresh_steps, 32)
    return {**facts, "rows": bench.rows, "complete": True, "seconds": round(time.perf_counter() - t0, 1),
            "peak_rss_mib": round(peak_rss_mib())}


def _ms(values: List[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _summary(rows: List[Dict[str, Any]]) -> List[str]:
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["w_bits"], r["a_bits"], r["method"]), []).append(r)
    lines = ["| bits | method | calibration images | top-1 | agreement | search s | fitness evaluations | "
             "mean fitness gain per unit search | seeds |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for (w, a, method), rs in groups.items():
        search = [r["search"] for r in rs if r.get("search")]
        secs = _ms([s["seconds"] for s in search]) if search else "—"
        evals = str(search[0]["evaluations"]) if search else "—"
        gain = f"{100 * statistics.mean(s['mean_unit_gain'] for s in search):.3f} %" if search else "—"
        lines.append(f"| W{w}A{a} | {method} | {rs[0]['num_calib']} | {_ms([r['top1'] for r in rs])} | "
                     f"{_ms([r['agreement'] for r in rs])} | {secs} | {evals} | {gain} | {len(rs)} |")
    return lines


def _deltas(rows: List[Dict[str, Any]]) -> List[str]:
    """Per-seed gain of cpt-v over its own omse start."""
    out = []
    for w in sorted({r["w_bits"] for r in rows}, reverse=True):
        for method in sorted({r["method"] for r in rows if r["method"].startswith("omse →")}):
            gains = []
            for r in rows:
                if r["w_bits"] == w and r["method"] == method:
                    base = next(b for b in rows if b["w_bits"] == w and b["seed"] == r["seed"] and b["method"] == "omse")
                    gains.append(r["top1"] - base["top1"])
            if gains:
                out.append(f"- W{w}A8 {method}: top-1 gain over its omse start, per seed "
                           f"{', '.join(f'{g:+.2f}' for g in gains)} (mean {statistics.mean(gains):+.2f})")
    return out


def write_markdown(results: Dict[str, Any], command: str) -> None:
    commands = sorted({results.get(k) for k in ("command", "command_cifar", "command_imagenet") if results.get(k)}
                      or {command})
    lines = ["## Evolutionary search: CPT-V and CLAMP-ViT (issue 4)", "", "Commands: " + ", ".join(f"`{c}`" for c in commands) + f". Machine: {results['machine']}. "
             f"Date: {results['date']}. Protocol p1; the evaluation images are never used to choose anything "
             "(the search keeps its last model).", ""]
    if "cifar" in results:
        c = results["cifar"]
        fp = c["rows"][0]["fp_top1"]
        done = sorted({r["seed"] for r in c["rows"]})
        cut = "" if c.get("complete", True) else f" — **run cut short: seeds {done} only** ({c.get('note', '')})"
        lines += [f"**CIFAR-10 reference ViT**{cut} (FP top-1 {fp:.2f} on {c['num_eval']} test images; seeds {done}; "
                  f"each seed its own 1,000 train images; cpt-v searches {c['passes']} passes (of the paper's 10) on "
                  f"{c['search_images']} of them; clamp-vit {c['df_passes']} passes, refresh every "
                  f"{c['df_refresh_every']} cycles with {c['refresh_steps']} steps):", ""]
        lines += _summary(c["rows"]) + [""] + _deltas(c["rows"]) + [""]
    if "imagenet" in results:
        i = results["imagenet"]
        fp = i["rows"][0]["fp_top1"]
        lines += [f"**ImageNet DeiT-Tiny** (FP top-1 {fp:.2f} on the {i['num_eval']} evaluation images; seed 0; "
                  f"cpt-v {i['passes']} passes on the 100 calibration images; clamp-vit {i['df_passes']} pass, "
                  f"refresh every {i['df_refresh_every']} cycles with {i['refresh_steps']} steps; "
                  + (f"{i['seconds'] / 60:.0f} min in all, peak RSS {i['peak_rss_mib']} MiB" if "seconds" in i
                     else "run cut short") + "):", ""]
        lines += _summary(i["rows"]) + [""] + _deltas(i["rows"]) + [""]
    write_section("## Evolutionary search", lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", default=None)
    parser.add_argument("--only", choices=["cifar", "imagenet"], default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num-eval", type=int, default=None, help="evaluate on a subset (quick check)")
    parser.add_argument("--passes", type=int, default=2, help="CIFAR cpt-v passes (paper: 10)")
    parser.add_argument("--search-images", type=int, default=500, help="CIFAR cpt-v search images (paper: 1000)")
    parser.add_argument("--df-passes", type=int, default=3, help="CIFAR clamp-vit passes (paper: 10)")
    parser.add_argument("--df-refresh-every", type=int, default=72, help="CIFAR clamp-vit refresh (paper: 3)")
    parser.add_argument("--refresh-steps", type=int, default=10, help="generator steps per refresh (recipe: 50)")
    parser.add_argument("--in-passes", type=int, default=3, help="ImageNet cpt-v passes")
    parser.add_argument("--in-df-passes", type=int, default=1, help="ImageNet clamp-vit passes")
    parser.add_argument("--in-df-refresh-every", type=int, default=72, help="ImageNet clamp-vit refresh")
    parser.add_argument("--kl-seeds", type=int, nargs="*", default=None,
                        help="CIFAR W3A8: seeds that also run cpt-v with the KL fitness (default: every seed)")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the RESULTS.md section from benchmarks/results/search.json (also a cut run)")
    parser.add_argument("--dry-run", action="store_true", help="tiny budget, nothing written (checks the script)")
    args = parser.parse_args(argv)
    if args.kl_seeds is None:
        args.kl_seeds = args.seeds
    if args.dry_run:
        args.seeds, args.num_eval, args.passes, args.search_images = [0], 200, 1, 100
        args.df_passes, args.in_passes, args.in_df_passes = 1, 1, 1
        global GEN_ITERATIONS
        GEN_ITERATIONS = 2
    if args.report_only:
        results = json.loads(RESULTS_JSON.read_text())
        write_markdown(results, results.get("command", "python benchmarks/search.py"))
        return 0
    root = assets_dir(args.assets)
    torch.manual_seed(0)
    results: Dict[str, Any] = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else {}
    results.update(machine=machine(), date=time.strftime("%Y-%m-%d"))
    if args.only in (None, "cifar"):
        results["cifar"] = cifar(root, args)
    if args.only in (None, "imagenet"):
        results["imagenet"] = imagenet(root, args)
    if args.dry_run:
        print("dry run: nothing written")
        return 0
    RESULTS_JSON.parent.mkdir(exist_ok=True)
    if RESULTS_JSON.exists():  # another part may have finished meanwhile: keep it
        merged = json.loads(RESULTS_JSON.read_text())
        merged.update({k: v for k, v in results.items() if k in ("machine", "date", args.only or "cifar", "imagenet")
                       and (args.only is None or k in ("machine", "date", args.only))})
        results = merged
    RESULTS_JSON.write_text(json.dumps(results, indent=1) + "\n")
    command = "python benchmarks/search.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results["command" if args.only is None else f"command_{args.only}"] = command.strip()
    RESULTS_JSON.write_text(json.dumps(results, indent=1) + "\n")
    write_markdown(results, command.strip())
    print(f"wrote {RESULTS_JSON} and the RESULTS.md section")
    return 0


if __name__ == "__main__":
    sys.exit(main())
