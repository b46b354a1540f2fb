"""Deploy benchmark (issue 6): the quantized model as an integer ONNX model in ONNX Runtime.

    python benchmarks/deploy.py [--assets DIR] [--only cifar imagenet small] [--threads N]
                                [--repeats 10] [--warmup 2] [--batch-sizes 1 32] [--formats auto u8s8]
                                [--num-eval N] [--no-profile]

Three models: the CIFAR-10 reference ViT (omse plans calibrated on 256 `cifar10/train` images,
evaluated on `cifar10/test`), the real ImageNet DeiT-Tiny (omse plans calibrated on 100 images of
`imagenet-sample/`, evaluated on the other 900: the split of benchmarks/foundation.py) and a
DeiT-Small with random weights (timm `deit_small_patch16_224`, nothing downloaded; a minmax
plan calibrated on 8 seeded random images: speed and size only). For each plan (W8A8 and W4A8,
protocol p1) and each integer format: the top-1 of the exported model in ONNX Runtime next to
the simulated PyTorch model's on the same images; for each model and format: latency (batch 1)
and throughput (batch 32), medians of `--repeats` runs after `--warmup`, for PyTorch FP32,
ONNX Runtime FP32 and ONNX Runtime int8, and the sizes. ONNX Runtime's profiler shows where the
DeiT-Small's time goes (per op type, integer or float).

`--formats auto` is the exact format this CPU gets by default (U8U8 for W8A8 plans on AVX2
without VNNI, U8S8 otherwise); `u8s8` is measured beside it because it is the fastest kernel,
even where it may saturate (see vitq/export/formats.py). Speed is timed for `--speed-plans`
(default W8A8 with the auto format and W7A8 with U8S8, which is exact on any CPU).

Writes benchmarks/results/deploy.json and the "Deploy" section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from foundation import in_memory, machine, write_section  # noqa: E402

from vitq.api import quantize  # noqa: E402
from vitq.data import assets_dir, balanced_subset, load_images, make_loader, scan_folder  # noqa: E402
from vitq.eval.metrics import compare, model_size, predict  # noqa: E402
from vitq.export import OnnxModel, bench_speed, choose_format, cpu_info, export_onnx  # noqa: E402
from vitq.export.speed import profile_table  # noqa: E402
from vitq.models import load_model  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS_JSON = HERE / "results" / "deploy.json"
GOAL_SPEEDUP, GOAL_TOP1, GOAL_SIZE_W8, GOAL_SIZE_W4 = 1.8, 0.3, 0.26, 0.14
BITS = ((8, 8), (7, 8), (4, 8))


def log(msg: str) -> None:
    print(msg, flush=True)


def accuracy_rows(name: str, loaded, calib_batches, eval_batches, formats: List[str], threads, workdir: Path,
                  recipe: str = "omse") -> List[Dict[str, Any]]:
    """Per plan and format: simulated vs ONNX Runtime top-1 on the same images, and the sizes."""
    (fp_logits,), labels = predict(loaded.model, eval_batches, "cpu", progress=False)
    rows = []
    for w, a in BITS:
        result = quantize(loaded.model, recipe, calib_batches, w_bits=w, a_bits=a, protocol="p1", device="cpu",
                          progress=False)
        (sim_logits,), _ = predict(result.model, eval_batches, "cpu", progress=False)
        sim = compare(fp_logits, sim_logits, labels)
        for fmt in dict.fromkeys(choose_format(f, w).name if f == "auto" else f for f in formats):
            path = workdir / f"{name}-w{w}a{a}-{fmt}.onnx"
            report = export_onnx(result.model, path, int_format=fmt, data_config=loaded.data_config,
                                 meta=result.plan.meta, verify=False)
            t0 = time.perf_counter()
            onnx_logits, _ = OnnxModel(path, threads=threads).predict(eval_batches, progress=False)
            vs_sim = compare(sim_logits, onnx_logits, labels)
            row = dict(
                bits=f"W{w}A{a}", recipe=recipe, requested=fmt, int_format=report.int_format.name,
                reason=report.int_format.reason, num_eval=int(labels.numel()),
                fp_top1=sim["fp_top1"], sim_top1=sim["quant_top1"], onnx_top1=vs_sim["quant_top1"],
                top1_diff=round(vs_sim["quant_top1"] - vs_sim["fp_top1"], 4), agreement=vs_sim["agreement"],
                kl_vs_sim=vs_sim["kl"], max_abs_diff=float((onnx_logits - sim_logits).abs().max()),
                integer_gemms=len(report.integer_layers), gemms=len(report.layers),
                onnx_bytes=report.sizes["onnx_bytes"], fp32_bytes=report.sizes["fp32_weight_bytes"],
                packed_bytes=report.sizes["packed_weight_bytes"], onnx_ratio=report.sizes["onnx_ratio"],
                packed_ratio=report.sizes["packed_ratio"], eval_seconds=round(time.perf_counter() - t0, 1),
            )
            rows.append(row)
            log(f"[{name}] W{w}A{a} {row['int_format']}: ONNX top-1 {row['onnx_top1']:.2f} vs simulated "
                f"{row['sim_top1']:.2f} (Δ {row['top1_diff']:+.2f}, agreement {row['agreement']:.2f} %), "
                f"{row['integer_gemms']}/{row['gemms']} integer GEMMs, file {row['onnx_ratio']:.3f}× float, "
                f"packed {row['packed_ratio']:.3f}×")
    return rows


def parse_speed_plan(text: str):
    """``W8A8:auto`` → (8, 8, "auto")."""
    try:
        bits, fmt = text.upper().split(":")
        w, a = bits[1:].split("A")
        return int(w), int(a), fmt.lower()
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected e.g. W8A8:auto or W7A8:u8s8, got {text!r}") from None


def speed_rows(name: str, loaded, calib_batches, args, profile: bool, recipe: str) -> Dict[str, Any]:
    """bench_speed per (plan bits, integer format); the PyTorch backends with the first one only."""
    configs = list(dict.fromkeys((w, a, choose_format(f, w).name if f == "auto" else f)
                                 for w, a, f in args.speed_plans))
    out: Dict[str, Any] = {"recipe": recipe, "configs": {}}
    plans: Dict[tuple, Any] = {}
    for i, (w, a, fmt) in enumerate(configs):
        if (w, a) not in plans:
            plans[w, a] = quantize(loaded.model, recipe, calib_batches, w_bits=w, a_bits=a, protocol="p1",
                                   device="cpu", progress=False)
        result = plans[w, a]
        backends = ("pytorch_fp32", "pytorch_simulated", "ort_fp32", "ort_int8") if i == 0 else ("ort_fp32", "ort_int8")
        log(f"[{name}] speed, W{w}A{a} {fmt} ...")
        res = bench_speed(loaded.model, result.model, data_config=loaded.data_config, batch_sizes=args.batch_sizes,
                          repeats=args.repeats, warmup=args.warmup, threads=args.threads, int_format=fmt,
                          backends=backends, profile=profile and i == len(configs) - 1, meta=result.plan.meta,
                          progress=True)
        res["bits"] = f"W{w}A{a}"
        out["configs"][f"W{w}A{a} {fmt}"] = res
    return out


def suite(name: str, loaded, calib_batches, eval_batches, args, profile: bool, recipe: str = "omse") -> Dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        rows = [] if eval_batches is None else accuracy_rows(name, loaded, calib_batches, eval_batches,
                                                             args.formats, args.threads, Path(tmp), recipe)
    return {"model": loaded.name, "arch": loaded.arch, "accuracy": rows,
            "speed": speed_rows(name, loaded, calib_batches, args, profile, recipe)}


def random_weight_sizes(loaded) -> Dict[str, Any]:
    """Packed sizes of a random-weight model at W8 and W4 (no images: sizes do not depend on them)."""
    out = {}
    size = tuple(loaded.data_config["input_size"])
    for w in (8, 4):
        result = quantize(loaded.model, "minmax", [torch.randn(2, *size, generator=torch.Generator().manual_seed(0))],
                          w_bits=w, a_bits=8, device="cpu", progress=False)
        s = model_size(result.model)
        out[f"W{w}"] = {"packed_bytes": s.weight_bytes, "fp32_bytes": s.fp_bytes,
                        "packed_ratio": round(s.weight_bytes / s.fp_bytes, 4)}
    return out


# -- markdown -------------------------------------------------------------------------------------------
LABELS = {"cifar": "CIFAR-10 ViT (`vit_cifar10_d6`)", "imagenet": "DeiT-Tiny (`deit_tiny_imagenet`)",
          "small": "DeiT-Small, random weights"}


def _speed_lines(results: Dict[str, Any]) -> List[str]:
    batches = None
    lines = []
    for key, label in LABELS.items():
        if key not in results:
            continue
        for config, res in results[key]["speed"]["configs"].items():
            batches = batches or [str(b) for b in res["batch_sizes"]]
            t = res["timings"]
            cells = []
            for b in batches:
                for backend in ("pytorch_fp32", "ort_fp32", "ort_int8"):
                    cells.append(f"{t[backend][b]['median_ms']:.1f}" if backend in t else "—")
                cells.append(f"{res['speedups'][b].get('int8_vs_ort_fp32', 0):.2f}×")
            fmt = res["int_format"]["name"].upper()
            lines.append(f"| {label} | {res['bits']} | {fmt} | " + " | ".join(cells) + " |")
    if not lines:
        return []
    head = ["model", "plan", "int8 format"]
    for b in batches:
        head += [f"b{b} PyTorch FP32 ms", f"b{b} ORT FP32 ms", f"b{b} ORT int8 ms", f"b{b} int8 vs ORT FP32"]
    return ["| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * (len(head) - 3)] + lines


def write_markdown(results: Dict[str, Any], command: str) -> None:
    lines = [
        "## Deploy: integer ONNX models in ONNX Runtime (issue 6)",
        "",
        "Commands (each model's rows come from the last command that ran it): "
        + "; ".join(f"`{c}`" for c in results.get("commands", [command])) + "  ",
        f"Machine: {results['machine']}; CPU features: {results['isa']}; ONNX Runtime {results['onnxruntime']}, "
        f"threads: {results['threads']}  ",
        f"Date: {results['date']}",
        "",
        "Export: `vitq export RUN --format onnx --out FILE.onnx` (QDQ: int8 weights per output channel, "
        "uint8 activations per tensor; protocol p1: every linear layer, the patch embedding and both attention "
        "products run in ONNX Runtime integer kernels, LayerNorm/softmax/GELU/residuals in float32). *Δ*: ONNX top-1 "
        "minus the simulated (fake-quant) PyTorch model's top-1 on the same images; *agreement*: top-1 "
        "agreement of the two. Latencies are medians over "
        f"{results['repeats']} runs after {results['warmup']} warm-up runs, on seeded random inputs.",
        "",
    ]
    acc = [(key, r) for key in LABELS if key in results for r in results[key]["accuracy"]]
    if acc:
        lines += ["### Accuracy of the exported model", "",
                  "| model | plan | format | images | FP32 top-1 | simulated top-1 | ONNX top-1 | Δ | agreement | "
                  "integer GEMMs | file × float | packed × float |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for key, r in acc:
            lines.append(
                f"| {LABELS[key]} | {r['recipe']} {r['bits']} p1 | {r['int_format'].upper()} | {r['num_eval']} | "
                f"{r['fp_top1']:.2f} | {r['sim_top1']:.2f} | {r['onnx_top1']:.2f} | {r['top1_diff']:+.2f} | "
                f"{r['agreement']:.2f} | {r['integer_gemms']}/{r['gemms']} | {r['onnx_ratio']:.3f} | "
                f"{r['packed_ratio']:.3f} |")
        lines.append("")
    speed = _speed_lines(results)
    if speed:
        lines += ["### Speed", "",
                  "U8S8 on a CPU without VNNI is timed with a W7A8 plan: with 8-bit weights its int16 pair sums "
                  "saturate (see the accuracy table), with 7-bit weights it is exact.", ""] + speed + [""]
        lines += [f"Note: {note}" for key in LABELS if key in results
                  for note in results[key].get("speed_notes", [])] + [""]
    if "small" in results:
        small = results["small"]
        lines += ["### DeiT-Small sizes", "", "| | MB | × float |", "|---|---:|---:|"]
        sizes = next(iter(small["speed"]["configs"].values()))["sizes"]
        fp = sizes["fp32_weight_bytes"]
        lines += [f"| float32 weights | {fp / 1e6:.2f} | 1.000 |",
                  f"| int8 .onnx file | {sizes['onnx_bytes'] / 1e6:.2f} | {sizes['onnx_bytes'] / fp:.3f} |"]
        for w, s in small.get("packed", {}).items():
            lines.append(f"| weights packed at {w[1:]} bits | {s['packed_bytes'] / 1e6:.2f} | "
                         f"{s['packed_ratio']:.3f} |")
        lines.append("")
    lines += goal_lines(results)
    if "small" in results:
        for config, res in results["small"]["speed"]["configs"].items():
            if "profile" not in res:
                continue
            for backend in ("ort_int8", "ort_fp32"):
                prof = res["profile"][backend]
                lines += [f"### Where the time goes: DeiT-Small, ONNX Runtime {backend[4:]} "
                          f"({config if backend == 'ort_int8' else 'float32'}), batch {prof['batch']}", "",
                          f"{prof['total_ms']:.1f} ms in kernels per run (profiler, mean of {prof['runs']} runs).", "",
                          profile_table(prof), ""]
            floats = res["export"]["float_gemms"]
            lines += [f"Matrix products left in float32: {', '.join(floats) if floats else 'none'}. "
                      "Float ops besides: LayerNormalization, Softmax, (Bias)Gelu, residual and bias Add, "
                      "Transpose/Reshape; QuantizeLinear converts activations to uint8.", ""]
            lines += _why(res["profile"], results.get("isa", ""))
    write_section("## Deploy", lines)


def _why(profile: Dict[str, Any], isa: str) -> List[str]:
    """Where the speed-up is bounded, from the two profiles: the integer GEMMs' gain over the float
    GEMMs, and the time of everything else, which int8 does not shorten (Amdahl)."""
    q, f = profile["ort_int8"], profile["ort_fp32"]
    int_ops = {"MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "QGemm", "QLinearConv", "ConvInteger"}
    q_gemm = sum(r["ms"] for r in q["ops"] if r["op"] in int_ops)
    f_gemm = sum(r["ms"] for r in f["ops"] if r["op"] in {"MatMul", "Gemm", "Conv", "FusedMatMul", "FusedGemm"})
    q_rest, f_rest = q["total_ms"] - q_gemm, f["total_ms"] - f_gemm
    if not (q_gemm and f_gemm):
        return []
    bound = f["total_ms"] / q_rest if q_rest > 0 else float("inf")
    return [f"Why: in the profiles the matrix products take {f_gemm:.0f} ms in float32 and {q_gemm:.0f} ms as "
            f"integer kernels ({f_gemm / q_gemm:.2f}× faster; on this CPU ({isa}) ONNX Runtime's 8-bit kernels "
            "multiply-add pairs of bytes into 16-bit sums without VNNI's 4-way dot product). Everything else "
            f"takes {f_rest:.0f} ms in the float model and {q_rest:.0f} ms in the int8 model (the QuantizeLinear "
            f"nodes add to it), so the kernels' speed-up is {f['total_ms'] / q['total_ms']:.2f}×, and "
            f"even infinitely fast integer GEMMs would give at most {bound:.1f}×. Reaching 1.8× needs integer "
            f"GEMMs about {f_gemm / max(f['total_ms'] / 1.8 - q_rest, 1e-9):.1f}× faster than float32 at the same "
            "remainder, which needs a CPU with VNNI (AVX512-VNNI or AVX-VNNI) or fewer float ops.", ""]


def goal_lines(results: Dict[str, Any]) -> List[str]:
    lines = ["### Goals", ""]
    if "small" in results:
        fmts = results["small"]["speed"]["configs"]
        for config, res in fmts.items():
            b = str(max(res["batch_sizes"]))
            s = res["speedups"][b].get("int8_vs_ort_fp32")
            if s is not None:
                lines.append(f"- DeiT-Small int8 ({config}) vs ORT FP32 at batch {b}: {s:.2f}× "
                             f"(goal ≥ {GOAL_SPEEDUP}×: {'met' if s >= GOAL_SPEEDUP else 'not met'})")
            v = res["export"]["verification"]
            lines.append(f"- DeiT-Small int8 ({config}) vs simulated PyTorch on {v['num_images']} {v['inputs']}: "
                         f"max |Δ logit| {v['max_abs_diff']:.3g} (largest |logit| {v['max_abs_logit']:.3g}); top-1 "
                         f"agreement {v['agreement']:.1f} % (random weights: near-tied logits, not an accuracy)")
        packed = results["small"].get("packed", {})
        sizes = next(iter(fmts.values()))["sizes"]
        ratio = sizes["onnx_bytes"] / sizes["fp32_weight_bytes"]
        lines.append(f"- DeiT-Small int8 file {ratio:.3f}× float (goal ≤ {GOAL_SIZE_W8}: "
                     f"{'met' if ratio <= GOAL_SIZE_W8 else 'not met'})")
        if "W4" in packed:
            r4 = packed["W4"]["packed_ratio"]
            lines.append(f"- DeiT-Small weights packed at 4 bits {r4:.3f}× float (goal ≤ {GOAL_SIZE_W4}: "
                         f"{'met' if r4 <= GOAL_SIZE_W4 else 'not met'})")
    for key in ("cifar", "imagenet"):
        for r in results.get(key, {}).get("accuracy", []):
            ok = abs(r["top1_diff"]) <= GOAL_TOP1
            lines.append(f"- {LABELS[key]} {r['bits']} {r['int_format'].upper()}: |Δ top-1| {abs(r['top1_diff']):.2f} "
                         f"(goal ≤ {GOAL_TOP1}: {'met' if ok else 'not met'})")
    return lines + [""]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", default=None, help="assets folder (default: $VITQ_ASSETS or ../shared/assets)")
    parser.add_argument("--only", nargs="+", choices=list(LABELS), default=list(LABELS))
    parser.add_argument("--threads", type=int, default=None, help="PyTorch and ONNX Runtime threads (default: all)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per backend and batch size")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before timing")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--formats", nargs="+", default=["auto", "u8s8"],
                        help="accuracy: integer formats to export each plan with (auto, u8s8, u8u8, s8s8)")
    parser.add_argument("--speed-plans", nargs="+", type=parse_speed_plan, default=[(8, 8, "auto"), (7, 8, "u8s8")],
                        help="speed: plan bits and integer format pairs (default W8A8:auto W7A8:u8s8)")
    parser.add_argument("--num-eval", type=int, default=None, help="CIFAR: evaluate on a subset (quick check)")
    parser.add_argument("--no-profile", action="store_true", help="skip ONNX Runtime's profile of the DeiT-Small")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    root = assets_dir(args.assets)
    import onnxruntime

    results: Dict[str, Any] = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else {}
    results.update(machine=machine(), isa=cpu_info().isa, onnxruntime=onnxruntime.__version__,
                   threads=args.threads or "library default", repeats=args.repeats, warmup=args.warmup,
                   date=time.strftime("%Y-%m-%d"))
    if "cifar" in args.only:
        loaded = load_model(root / "models/vit_cifar10_d6.pth")
        calib = load_images(root / "cifar10/train", 256, seed=0, what="calibration images")
        evalset = load_images(root / "cifar10/test", args.num_eval, seed=0, what="evaluation images")
        log(f"[cifar] {len(calib)} calibration / {len(evalset)} evaluation images")
        results["cifar"] = suite("cifar", loaded, in_memory(make_loader(calib, loaded.data_config, 100)),
                                 in_memory(make_loader(evalset, loaded.data_config, 100)), args, profile=False)
    if "imagenet" in args.only:
        loaded = load_model(root / "models/deit_tiny_imagenet.pth")
        sample = scan_folder(root / "imagenet-sample")
        calib = balanced_subset(sample, 100, seed=0, what="calibration images")
        evalset = balanced_subset(sample, None, seed=0, exclude=calib.paths, what="evaluation images")
        log(f"[imagenet] {len(calib)} calibration / {len(evalset)} evaluation images")
        results["imagenet"] = suite("imagenet", loaded, in_memory(make_loader(calib, loaded.data_config, 50)),
                                    in_memory(make_loader(evalset, loaded.data_config, 50)), args, profile=False)
    if "small" in args.only:
        torch.manual_seed(0)
        loaded = load_model("deit_small_patch16_224", pretrained=False)
        size = tuple(loaded.data_config["input_size"])
        noise = [torch.randn(8, *size, generator=torch.Generator().manual_seed(0))]
        log("[small] random-weight DeiT-Small, minmax plan on 8 seeded random images (speed and size only)")
        results["small"] = suite("small", loaded, noise, None, args, profile=not args.no_profile, recipe="minmax")
        results["small"]["packed"] = random_weight_sizes(loaded)
    command = ("python benchmarks/deploy.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    previous = results.get("commands") or ([results["command"]] if results.get("command") else [])
    if set(args.only) == set(LABELS):  # a full run replaces every row
        previous = []
    results["commands"] = previous + [command]
    RESULTS_JSON.parent.mkdir(exist_ok=True)
    RESULTS_JSON.write_text(json.dumps(results, indent=1, default=str) + "\n")
    write_markdown(results, command)
    log("\n".join(goal_lines(results)))
    log(f"wrote {HERE / 'RESULTS.md'} and {RESULTS_JSON}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
