"""Block reconstruction at a GPU budget (issue 12): the recommended recipe with its reconstruction
run for more iterations per block than the CPU budget of 200, quantized on a CUDA device.

A lent GPU machine holds only what travels with the repository (64 MiB), so the work is split:

1. here, ``--pack DIR``: copies the DeiT-Tiny checkpoint and the 100 calibration images of the
   100/900 split of imagenet-sample/ (in the order the accuracy benchmark feeds them) into DIR;
2. on the GPU machine, ``--quantize DIR --out OUT --device cuda``: for each bit-width and
   iteration count, (a) the choice on calibration images only, as ``accuracy.py --select`` makes
   it: quantized on the first 50 calibration images, scored (agreement with the float model, KL)
   on the other 50; (b) the recipe on all 100, its plan saved under OUT/plans/ for step 3. Runs
   go in the order given and stop starting at ``--deadline`` seconds;
3. here, ``--evaluate OUT``: applies each saved plan to the float model and scores it on the 900
   evaluation images (CPU), appending the rows to results/accuracy.json (method
   ``recommended, reconstruct N it, GPU``, the quantize seconds those of the GPU machine; rendered in
   RESULTS.md with the other rows) and the held-out rows to its ``gpu_budget`` entry (not rendered:
   ``select_recipe.py`` makes the same choice on the CPU, with a section of its own).

Commands of the committed row (2026-12-04, an H200 lent for 15 minutes; ``.gpu`` carried to it):
    python benchmarks/gpu_budget.py --pack .gpu
    python benchmarks/gpu_budget.py --quantize .gpu --out /tmp/g --device cuda --bits w4a8 --iterations 1000 \\
        --parts full --deadline 1 --threads 16
    python benchmarks/gpu_budget.py --evaluate /tmp/g2     (the plans brought back, unpacked here)
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from accuracy import RESULTS_JSON, _recommended_with, deit_tiny_split, parse_bits, write_markdown  # noqa: E402
from foundation import machine  # noqa: E402

from vitq.api import evaluate, quantize  # noqa: E402
from vitq.data import assets_dir, make_loader  # noqa: E402
from vitq.data.folder import ImageList  # noqa: E402
from vitq.methods import Plan, apply_plan  # noqa: E402
from vitq.models import load_model  # noqa: E402

CHECKPOINT = "deit_tiny_imagenet.pth"


def method_name(iterations: int) -> str:
    return f"recommended, reconstruct {iterations} it"


def pack(root: Path, out: Path) -> None:
    """The checkpoint and the 100 calibration images, with their order and labels."""
    _, calib, _, _ = deit_tiny_split(root, 0)
    (out / "calib").mkdir(parents=True, exist_ok=True)
    for f in (CHECKPOINT, CHECKPOINT.replace(".pth", ".json")):  # the weights and their sidecar
        shutil.copy2(root / "models" / f, out / f)
    for p in calib.paths:
        shutil.copy2(p, out / "calib" / p.name)
    (out / "calib.json").write_text(json.dumps({"files": [p.name for p in calib.paths], "labels": list(calib.labels),
                                                "classes": {str(k): v for k, v in calib.classes.items()},
                                                "layout": calib.layout}, indent=0))
    print(f"packed {len(calib)} calibration images and {CHECKPOINT} into {out}")


def packed_calibration(folder: Path, data_config) -> List[torch.Tensor]:
    spec = json.loads((folder / "calib.json").read_text())
    images = ImageList(folder / "calib", tuple(folder / "calib" / f for f in spec["files"]), tuple(spec["labels"]),
                       {int(k): v for k, v in spec["classes"].items()}, spec["layout"])
    return [x for x, _ in make_loader(images, data_config, 50)]


def run_quantize(args) -> None:
    folder, out = Path(args.quantize), Path(args.out)
    (out / "plans").mkdir(parents=True, exist_ok=True)
    loaded = load_model(folder / CHECKPOINT)
    batches = packed_calibration(folder, loaded.data_config)
    if [len(b) for b in batches] != [50, 50]:
        raise SystemExit(f"expected two batches of 50 calibration images, got {[len(b) for b in batches]}")
    device = torch.device(args.device)
    facts = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else machine(),
             "torch": torch.__version__, "machine": machine(), "rows": [],
             "command": "python benchmarks/gpu_budget.py " + " ".join(sys.argv[1:])}
    t_start = time.perf_counter()
    held_out = [(batches[1], torch.zeros(50, dtype=torch.long))]  # labels unused: agreement and KL only

    def write():
        (out / "quantized.json").write_text(json.dumps(facts, indent=1) + "\n")

    bits = parse_bits(args.bits)
    # per bit-width: the held-out choice at every iteration count, then the full run at the last
    # one; the full runs at the other counts (GPU controls of the CPU rows) after all of those
    runs = [(w, a, part, it) for w, a in bits for part in args.parts
            for it in (args.iterations if part == "select" else args.iterations[-1:])]
    runs += [(w, a, "full", it) for w, a in bits for it in args.iterations[:-1] if "full" in args.parts]
    for w, a, part, iterations in runs:
        elapsed = time.perf_counter() - t_start
        if elapsed > args.deadline:
            print(f"deadline: skipping {part} W{w}A{a} {iterations} it ({elapsed:.0f} s)", flush=True)
            continue
        recipe = _recommended_with(method_name(iterations), iterations=iterations)
        calib = [batches[0]] if part == "select" else batches
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        result = quantize(loaded.model, recipe, calib, w_bits=w, a_bits=a, protocol="p1", device=device,
                          progress=False, seed=0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        row: Dict[str, Any] = dict(part=part, method=method_name(iterations), iterations=iterations, w_bits=w,
                                   a_bits=a, seed=0, quantize_seconds=round(seconds, 1),
                                   stage_seconds=result.record.get("stage_seconds", {}))
        if device.type == "cuda":
            row["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
        if part == "select":
            m = evaluate(loaded.model, result.model, held_out, device=device, progress=False)
            row.update(agreement=m["agreement"], kl=m["kl"], num_calib=50, num_eval=50)
        else:
            name = f"w{w}a{a}_{iterations}"
            result.plan.save(out / "plans" / name)
            row.update(plan=name, num_calib=100)
        facts["rows"].append(row)
        write()
        print(f"{part} W{w}A{a} {iterations} it: {seconds:.1f} s {row['stage_seconds']} "
              + (f"agree {row['agreement']:.2f} KL {row['kl']:.4f}" if part == "select" else ""), flush=True)
    facts["seconds"] = round(time.perf_counter() - t_start, 1)
    write()


def run_evaluate(args) -> None:
    folder = Path(args.evaluate)
    done = json.loads((folder / "quantized.json").read_text())
    root = assets_dir(args.assets)
    loaded, _, evalset, eval_batches = deit_tiny_split(root, None)
    results = json.loads(RESULTS_JSON.read_text())
    suite = results.setdefault("imagenet", {"rows": []})
    for row in done["rows"]:
        if row["part"] != "full":
            continue
        plan = Plan.load(folder / "plans" / row["plan"])
        qmodel = apply_plan(loaded.model, plan)
        m = evaluate(loaded.model, qmodel, eval_batches, device="cpu", progress=False)
        new = dict(method=row["method"] + ", GPU", w_bits=row["w_bits"], a_bits=row["a_bits"], seed=0, top1=m["quant_top1"],
                   top5=m["quant_top5"], fp_top1=m["fp_top1"], agreement=m["agreement"], kl=m["kl"],
                   num_calib=row["num_calib"], quantize_seconds=row["quantize_seconds"],
                   stage_seconds=row["stage_seconds"], peak_mib=None, peak_gpu_mib=row.get("peak_gpu_mib"),
                   machine=f"{done['device']} (quantize; evaluated on {machine()})")
        key = ("method", "w_bits", "a_bits", "seed", "source")
        suite["rows"] = [r for r in suite["rows"] if [r.get(k) for k in key] != [new.get(k) for k in key]] + [new]
        print(f"{row['method']} W{row['w_bits']}A{row['a_bits']}: top-1 {new['top1']:.2f} agree {new['agreement']:.2f} "
              f"KL {new['kl']:.4f}", flush=True)
    results["methods"] = list(dict.fromkeys(results.get("methods", []) + [r["method"] + ", GPU" for r in done["rows"]
                                                                          if r["part"] == "full"]))
    results.setdefault("commands", []).extend([done["command"] + f" (on the {done['device']})",
                                               "python benchmarks/gpu_budget.py " + " ".join(sys.argv[1:])])
    results["gpu_budget"] = {"device": done["device"], "torch": done["torch"],
                             "rows": [r for r in done["rows"] if r["part"] == "select"],
                             "command": done["command"]}
    RESULTS_JSON.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    write_markdown(results)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", default=None, help="assets folder (default: $VITQ_ASSETS or ../shared/assets)")
    parser.add_argument("--pack", metavar="DIR", help="copy the checkpoint and the calibration images into DIR")
    parser.add_argument("--quantize", metavar="DIR", help="quantize from a packed DIR")
    parser.add_argument("--evaluate", metavar="OUT", help="score the plans that --quantize wrote into OUT")
    parser.add_argument("--out", default="gpu_budget_out")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--bits", nargs="+", default=["w4a8", "w6a6", "w4a4"])
    parser.add_argument("--iterations", type=int, nargs="+", default=[200, 2000])
    parser.add_argument("--parts", nargs="+", default=["select", "full"], choices=["select", "full"])
    parser.add_argument("--deadline", type=float, default=float("inf"), help="start no run after this many seconds")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.pack:
        pack(assets_dir(args.assets), Path(args.pack))
    elif args.quantize:
        run_quantize(args)
    elif args.evaluate:
        run_evaluate(args)
    else:
        parser.error("give --pack, --quantize or --evaluate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
