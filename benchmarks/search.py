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

On a GPU (``--device cuda``) the rows go to their own parts (``cifar_cuda``, ``imagenet_cuda``), so
the CPU rows stay. A GPU machine without the evaluation images can search only:
``--imagenet-calib DIR`` takes every image of DIR as the 100 calibration images, saves each plan
under ``--plans`` and leaves the accuracy empty; ``--evaluate-plans DIR`` then fills it in on the
machine that has the 900 evaluation images::

    python benchmarks/search.py --only imagenet --device cuda --imagenet-calib calib100 --plans plans \
        --results out/search.json --in-passes 10 --in-df-passes 10 --in-df-refresh-every 3 --refresh-steps 50
    python benchmarks/search.py --only imagenet --tag cuda --evaluate-plans plans --merge out/search.json
"""
from __future__ import annotations

import argparse
import json
import re
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
from vitq.methods.plan import Plan, apply_plan  # noqa: E402
from vitq.models import load_model  # noqa: E402
from vitq.recipes import load_recipe  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS_JSON = HERE / "results" / "search.json"
GEN_ITERATIONS = 100  # as the data-free benchmark (issue 3)
DEVICE = "cpu"
PROGRESS = False  # --progress: the library's progress bars on stderr


def _images(subset, data_config) -> torch.Tensor:
    return torch.cat([x for x, _ in make_loader(subset, data_config, 100)])


def save_part(name: str, part: Dict[str, Any]) -> None:
    """Write one part into the results file at once (other parts kept), so a cut run keeps its rows."""
    results = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else {}
    results.update(machine=machine(), date=time.strftime("%Y-%m-%d"))
    results[name] = part
    RESULTS_JSON.parent.mkdir(exist_ok=True)
    RESULTS_JSON.write_text(json.dumps(results, indent=1) + "\n")


def slug(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z]+", "-", text).strip("-")


class Bench:
    """Runs one configuration after another; ``eval_batches`` None: search only (plans saved to
    ``plans``, accuracy left for ``--evaluate-plans``)."""

    def __init__(self, name: str, loaded, eval_batches, facts: Dict[str, Any], save: bool = True,
                 plans: Path = None) -> None:
        self.name, self.loaded, self.eval_batches = name, loaded, eval_batches
        self.facts, self.save, self.plans = facts, save, plans
        self.fp_logits = None
        if eval_batches is not None:
            (self.fp_logits,), _ = predict(loaded.model, eval_batches, DEVICE, progress=False)
        self.rows: List[Dict[str, Any]] = []

    def run(self, method: str, recipe, images: torch.Tensor, w: int, a: int, seed: int, batch: int = 100,
            **kwargs) -> Any:
        t0 = time.perf_counter()
        q = quantize(self.loaded.model, recipe, list(images.split(batch)), w_bits=w, a_bits=a, protocol="p1",
                     device=DEVICE, progress=PROGRESS, seed=seed, **kwargs)
        seconds = time.perf_counter() - t0
        m = {"quant_top1": None, "fp_top1": None, "agreement": None, "kl": None}
        if self.eval_batches is not None:
            m = evaluate(self.loaded.model, q.model, self.eval_batches, device=DEVICE, progress=False,
                         fp_logits=self.fp_logits)
        search = q.record.get("search", {})
        row = dict(method=method, seed=seed, w_bits=w, a_bits=a, top1=m["quant_top1"], fp_top1=m["fp_top1"],
                   agreement=m["agreement"], kl=m["kl"], num_calib=len(images), seconds=round(seconds, 1),
                   search={k: search.get(k) for k in ("evaluations", "seconds", "first_fitness", "last_fitness",
                                                       "unit_searches", "refreshes", "fitness", "mean_unit_gain",
                                                       "improved_units")} if search else None)
        if self.plans is not None:
            row["plan"] = slug(f"{self.name}-{method}-s{seed}-w{w}a{a}")
            q.plan.save(self.plans / row["plan"])
        self.rows.append(row)
        if self.save:
            save_part(self.name, {**self.facts, "rows": self.rows, "complete": False})
        extra = (f" search {search['seconds']:.0f} s, {search['improved_units']}/{search['unit_searches']} unit searches "
                 f"improved, mean relative fitness gain per unit {100 * search['mean_unit_gain']:.3f}%") if search else ""
        acc = (f"top-1 {row['top1']:.2f} agree {row['agreement']:.2f}" if row["top1"] is not None
               else f"plan {row.get('plan')} (not evaluated here)")
        print(f"[{self.name}] seed {seed} W{w}A{a} {method:22s} {acc} ({seconds:.0f} s){extra}", flush=True)
        return q


def cptv_recipe(passes: int, **more):
    return load_recipe("cpt-v").with_overrides({"search": {"passes": passes, **more}})


def clamp_recipe(passes: int, refresh_every: int, batch_size: int):
    return load_recipe("clamp-vit").with_overrides(
        {"search": {"passes": passes, "refresh_every": refresh_every, "batch_size": batch_size}})


def data_free_rows(bench: Bench, seed: int, w: int, a: int, passes: int, refresh_every: int, refresh_steps: int,
                   batch: int) -> None:
    loaded = bench.loaded
    psaq = make_images("psaq", loaded, 32, seed, GEN_ITERATIONS, None, device=DEVICE)
    bench.run("psaq + omse", "omse", psaq["images"], w, a, seed, batch)
    bench.rows[-1]["gen_seconds"] = round(psaq["seconds"], 1)
    gen = create_generator("clamp", {"iterations": GEN_ITERATIONS})
    clamp = gen.generate(loaded.model, 32, loaded.data_config, seed=seed, device=DEVICE, progress=False)
    bench.run("clamp + omse", "omse", clamp.images, w, a, seed, batch)
    bench.rows[-1]["gen_seconds"] = round(clamp.seconds, 1)
    recipe = clamp_recipe(passes, refresh_every, batch)
    refresh = make_refresher(gen, loaded.model, clamp.targets, loaded.data_config, steps=refresh_steps,
                             adversary_weight=recipe.data_free.refresh_adversary, seed=seed, device=DEVICE)
    bench.run("clamp-vit", recipe, clamp.images, w, a, seed, batch, refresh=refresh)
    bench.rows[-1]["gen_seconds"] = round(clamp.seconds, 1)
    bench.rows[-1]["refresh_steps"] = refresh_steps


def _variant(name: str) -> Dict[str, Any]:
    """A cpt-v variant's search settings: ``kl`` (KL fitness, T = 1) or ``T=<t>`` (InfoNCE at temperature t)."""
    if not name:
        return {}
    if name == "kl":
        return {"fitness": "kl", "temperature": 1.0}
    if name.startswith("T="):
        return {"temperature": float(name[2:])}
    raise SystemExit(f"unknown cpt-v variant {name!r}: use kl or T=<temperature>")


def part_name(base: str, args) -> str:
    return base + (f"_{args.tag}" if args.tag else "")


def device_facts() -> Dict[str, Any]:
    facts: Dict[str, Any] = {"device": DEVICE, "machine": machine()}
    if DEVICE.startswith("cuda"):
        facts["gpu"] = torch.cuda.get_device_name(torch.device(DEVICE))
    return facts


def cifar(root: Path, args) -> Dict[str, Any]:
    loaded = load_model(root / "models/vit_cifar10_d6.pth")
    pool = scan_folder(root / "cifar10/train")
    evalset = load_images(root / "cifar10/test", args.num_eval, seed=0)
    facts = {"num_eval": len(evalset), "passes": args.passes, "search_images": args.search_images,
             "df_passes": args.df_passes, "df_refresh_every": args.df_refresh_every, "seeds": args.seeds,
             "refresh_steps": args.refresh_steps, "kl_seeds": args.kl_seeds, "parts": args.parts, **device_facts()}
    bench = Bench(part_name("cifar", args), loaded, in_memory(make_loader(evalset, loaded.data_config, 100)), facts,
                  not args.dry_run)
    for seed in args.seeds:
        if "cptv" in args.parts:
            images = _images(balanced_subset(pool, 1000, seed=seed, what="calibration images"), loaded.data_config)
            for w in args.cptv_bits:
                a = 8
                start = bench.run("omse", "omse", images, w, a, seed)
                variants = [""] + (args.w3_variants if w == 3 and seed in args.kl_seeds else [])
                for variant in variants:
                    recipe = cptv_recipe(args.passes, **_variant(variant))
                    bench.run("omse → cpt-v" + (f" ({variant})" if variant else ""), recipe,
                              images[:args.search_images], w, a, seed, start_plan=start.plan)
        if "df" in args.parts:
            data_free_rows(bench, seed, 4, 8, args.df_passes, args.df_refresh_every, args.refresh_steps, 32)
    return {**facts, "rows": bench.rows, "complete": True}


def imagenet_split(root: Path, num_eval=None):
    """The foundation benchmark's split of imagenet-sample/: 100 calibration images, the rest for evaluation."""
    sample = scan_folder(root / "imagenet-sample")
    calib_split = balanced_subset(sample, 100, seed=0, what="calibration images")
    return calib_split, balanced_subset(sample, num_eval, seed=0, exclude=calib_split.paths, what="evaluation images")


def imagenet(root: Path, args) -> Dict[str, Any]:
    loaded = load_model(root / "models/deit_tiny_imagenet.pth")
    if args.imagenet_calib:  # search-only machine: these are the 100 calibration images, no evaluation here
        calib_split, eval_batches, num_eval = scan_folder(args.imagenet_calib), None, 900
        if len(calib_split) != 100:
            raise SystemExit(f"--imagenet-calib: expected the 100 calibration images, found {len(calib_split)}")
    else:
        calib_split, evalset = imagenet_split(root, args.num_eval)
        eval_batches, num_eval = in_memory(make_loader(evalset, loaded.data_config, 50)), len(evalset)
    facts = {"num_eval": num_eval, "passes": args.in_passes, "df_passes": args.in_df_passes,
             "df_refresh_every": args.in_df_refresh_every, "refresh_steps": args.refresh_steps, "parts": args.parts,
             **device_facts()}
    bench = Bench(part_name("imagenet", args), loaded, eval_batches, facts, not args.dry_run, args.plans)
    images = _images(calib_split, loaded.data_config)
    t0 = time.perf_counter()
    if "cptv" in args.parts:
        start = bench.run("omse", "omse", images, 4, 8, 0)
        bench.run("omse → cpt-v", cptv_recipe(args.in_passes), images, 4, 8, 0, start_plan=start.plan)
    if "df" in args.parts:
        data_free_rows(bench, 0, 4, 8, args.in_df_passes, args.in_df_refresh_every, args.refresh_steps, 32)
    out = {**facts, "rows": bench.rows, "complete": True, "seconds": round(time.perf_counter() - t0, 1),
           "peak_rss_mib": round(peak_rss_mib())}
    if DEVICE.startswith("cuda"):
        out["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(torch.device(DEVICE)) / 2**20)
    return out


def evaluate_plans(root: Path, args, results: Dict[str, Any]) -> None:
    """Fill in the accuracy of the ImageNet rows that were searched elsewhere (their plans in
    ``--evaluate-plans``), on the 900 evaluation images of this machine."""
    name = part_name("imagenet", args)
    if name not in results:
        raise SystemExit(f"no part {name!r} in the results to evaluate (have: {sorted(results)})")
    loaded = load_model(root / "models/deit_tiny_imagenet.pth")
    _, evalset = imagenet_split(root, None)
    eval_batches = in_memory(make_loader(evalset, loaded.data_config, 50))
    (fp_logits,), _ = predict(loaded.model, eval_batches, DEVICE, progress=False)
    part = results[name]
    for row in part["rows"]:
        if row.get("top1") is not None:
            continue
        qmodel = apply_plan(loaded.model, Plan.load(Path(args.evaluate_plans) / row["plan"]))
        m = evaluate(loaded.model, qmodel, eval_batches, device=DEVICE, progress=False, fp_logits=fp_logits)
        row.update(top1=m["quant_top1"], fp_top1=m["fp_top1"], agreement=m["agreement"], kl=m["kl"],
                   evaluated_on=machine())
        print(f"[{name}] {row['method']:22s} top-1 {row['top1']:.2f} agree {row['agreement']:.2f}", flush=True)
    part["num_eval"] = len(evalset)


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


def _part_lines(name: str, part: Dict[str, Any]) -> List[str]:
    rows = [r for r in part["rows"] if r.get("top1") is not None]
    if not rows:
        return [f"**{name}**: searched, not evaluated yet (`--evaluate-plans`).", ""]
    fp = rows[0]["fp_top1"]
    where = ""
    if part.get("gpu"):
        where = (f"; searched on a lent {part['gpu']} (`--device {part['device']}`)"
                 + (f", {part['seconds'] / 60:.1f} min in all, peak GPU memory {part.get('peak_gpu_mib', '?')} MiB"
                    if "seconds" in part else "")
                 + ("; evaluated on this machine's CPU from the saved plans" if any("evaluated_on" in r for r in rows)
                    else "") + "; *search s* is GPU time")
    if not name.startswith("cifar") and not part.get("complete", True):
        where += f"; **cut short**: {part.get('note', 'the run did not finish')}"
    if name.startswith("cifar"):
        done = sorted({r["seed"] for r in rows})
        cut = "" if part.get("complete", True) else f" — **run cut short: seeds {done} only** ({part.get('note', '')})"
        head = (f"**CIFAR-10 reference ViT**{cut} (FP top-1 {fp:.2f} on {part['num_eval']} test images; seeds {done}; "
                f"each seed its own 1,000 train images; cpt-v searches {part['passes']} passes (the paper: 10) on "
                f"{part['search_images']} of them")
        if "df" in part.get("parts", ["df"]):
            head += (f"; clamp-vit {part['df_passes']} pass{'' if part['df_passes'] == 1 else 'es'}, refresh every {part['df_refresh_every']} cycles with "
                     f"{part['refresh_steps']} steps")
    else:
        head = f"**ImageNet DeiT-Tiny** (FP top-1 {fp:.2f} on the {part['num_eval']} evaluation images; seed 0"
        if "cptv" in part.get("parts", ["cptv"]):
            head += f"; cpt-v {part['passes']} passes on the 100 calibration images"
        if "df" in part.get("parts", ["df"]):
            head += (f"; clamp-vit {part['df_passes']} pass{'' if part['df_passes'] == 1 else 'es'}, refresh every {part['df_refresh_every']} cycles with "
                     f"{part['refresh_steps']} steps")
        if not part.get("gpu"):
            head += ("; " + (f"{part['seconds'] / 60:.0f} min in all, peak RSS {part['peak_rss_mib']} MiB"
                             if "seconds" in part else "run cut short"))
    return [head + where + "):", ""] + _summary(rows) + [""] + _deltas(rows) + [""]


def parts_of(results: Dict[str, Any]) -> List[str]:
    """The result parts: ``cifar``, ``imagenet``, then tagged ones (``imagenet_cuda``, ...)."""
    names = [k for k, v in results.items() if isinstance(v, dict) and k.split("_")[0] in ("cifar", "imagenet")]
    return sorted(names, key=lambda k: ("_" in k, k.split("_")[0] != "cifar", k))


def write_markdown(results: Dict[str, Any]) -> None:
    commands = [v for k, v in sorted(results.items()) if k.startswith("command") and v]
    lines = ["## Evolutionary search: CPT-V and CLAMP-ViT (issue 4)", "",
             "Commands: " + ", ".join(f"`{c}`" for c in commands) + f". Machine: {results['machine']} (the `_cuda` "
             f"parts: a lent GPU, named below). Date: {results['date']}. Protocol p1; the evaluation images are never "
             "used to choose anything (the search keeps its last model).", ""]
    for name in parts_of(results):
        lines += _part_lines(name, results[name])
    write_section("## Evolutionary search", lines)


def main(argv=None) -> int:
    global DEVICE, RESULTS_JSON, GEN_ITERATIONS, PROGRESS
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
                        help="CIFAR W3A8: seeds that also run the --w3-variants (default: every seed)")
    parser.add_argument("--cptv-bits", type=int, nargs="+", default=[4, 3], help="CIFAR cpt-v weight bits (A8)")
    parser.add_argument("--w3-variants", nargs="*", default=["kl"],
                        help="CIFAR W3A8 cpt-v variants besides the recipe's: kl, T=<InfoNCE temperature>")
    parser.add_argument("--parts", nargs="+", choices=["cptv", "df"], default=["cptv", "df"],
                        help="cptv: omse and omse → cpt-v rows; df: the data-free rows (psaq, clamp, clamp-vit)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda; a GPU's rows go to their own parts")
    parser.add_argument("--tag", default=None, help="suffix of the parts' names (default: cuda on a GPU, else none)")
    parser.add_argument("--imagenet-calib", default=None,
                        help="search-only: the 100 ImageNet calibration images (no evaluation; needs --plans)")
    parser.add_argument("--plans", default=None, help="save every run's plan under this folder")
    parser.add_argument("--results", default=None, help="results JSON (default benchmarks/results/search.json)")
    parser.add_argument("--merge", default=None, help="take the tagged parts of this results JSON first")
    parser.add_argument("--evaluate-plans", default=None,
                        help="evaluate the plans in this folder of a search-only ImageNet part, here")
    parser.add_argument("--progress", action="store_true", help="progress bars of every run (stderr)")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the RESULTS.md section from benchmarks/results/search.json (also a cut run)")
    parser.add_argument("--dry-run", action="store_true", help="tiny budget, nothing written (checks the script)")
    args = parser.parse_args(argv)
    DEVICE, PROGRESS = args.device, args.progress
    if args.tag is None:
        args.tag = "cuda" if DEVICE.startswith("cuda") else ""
    if args.results:
        RESULTS_JSON = Path(args.results)
    args.plans = Path(args.plans) if args.plans else None
    if args.imagenet_calib and args.plans is None:
        parser.error("--imagenet-calib searches without evaluating: pass --plans DIR to keep the plans")
    if args.kl_seeds is None:
        args.kl_seeds = args.seeds
    if args.dry_run:
        args.seeds, args.num_eval, args.passes, args.search_images = [0], 200, 1, 100
        args.df_passes, args.in_passes, args.in_df_passes = 1, 1, 1
        GEN_ITERATIONS = 2
    command = ("python benchmarks/search.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    if args.report_only:
        write_markdown(json.loads(RESULTS_JSON.read_text()))
        return 0
    root = assets_dir(args.assets)
    torch.manual_seed(0)
    results: Dict[str, Any] = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else {}
    done: Dict[str, Any] = {}
    if args.merge:
        other = json.loads(Path(args.merge).read_text())
        done.update({k: v for k, v in other.items() if (k in parts_of(other) and "_" in k) or k.startswith("command_")})
        results.update(done)
    if args.evaluate_plans:
        evaluate_plans(root, args, results)
        done[part_name("imagenet", args)] = results[part_name("imagenet", args)]
        done[f"command_{part_name('imagenet', args)}_eval"] = command
    else:
        if not args.tag:  # tagged parts carry their own machine
            results.update(machine=machine(), date=time.strftime("%Y-%m-%d"))
        for base, run in (("cifar", cifar), ("imagenet", imagenet)):
            if args.only in (None, base):
                done[part_name(base, args)] = run(root, args)
                done[f"command_{part_name(base, args)}"] = command
    if args.dry_run:
        print("dry run: nothing written")
        return 0
    # another run may have written other parts meanwhile: keep them, replace only this run's
    current = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else {}
    current.update({k: results[k] for k in ("machine", "date") if k in results})
    current.update(done)
    current.setdefault("machine", machine())
    current.setdefault("date", time.strftime("%Y-%m-%d"))
    RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_JSON.write_text(json.dumps(current, indent=1) + "\n")
    if RESULTS_JSON.resolve() == (HERE / "results" / "search.json").resolve():
        write_markdown(current)
        print(f"wrote {RESULTS_JSON} and the RESULTS.md section")
    else:
        print(f"wrote {RESULTS_JSON}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
