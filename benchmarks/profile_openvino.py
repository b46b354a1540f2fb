"""Where the time goes in OpenVINO (issue 15): DeiT-Small's (or DeiT-Tiny's) int8 models from NNCF and
from vitq, per layer type and kernel, at batch 32.

    python benchmarks/profile_openvino.py [--model small|tiny] [--variants nncf vitq-int vitq-int-p4 vitq-int-sym] [--runs 3]

The model of benchmarks/peers.py's speed rows: timm ``deit_small_patch16_224`` (``--model tiny``:
``deit_tiny_patch16_224``, the architecture of the peers table's DeiT-Tiny) with random weights,
8 seeded random calibration images. Each variant is compiled by OpenVINO (CPU, latency hint, 2
threads, its default precision for what stays float) with performance counters on; the counters
of ``--runs`` batches of 32 (after one warm-up) are summed per layer type and kernel
(``exec_type``, e.g. ``brgemm_avx512_amx_I8``) and averaged per batch. Variants:

* ``nncf``: NNCF ``quantize`` (model_type=TRANSFORMER, as peers.py);
* ``vitq-int``: vitq ``recommended-int``, p1 (the attention products quantized too);
* ``vitq-int-p4``: the same recipe, p4 (linear layers only, as NNCF);
* ``vitq-int-sym``: ``recommended-int`` p4 with symmetric weights (zero points 0, as NNCF's);
* ``fp32``/``bf16``: the float model in float32 (forced) and in OpenVINO's default precision.

Writes benchmarks/results/profile_openvino-MODEL[-CPU].json and the section "Where the time goes in
OpenVINO on CPU: DeiT-Small" (or DeiT-Tiny) of benchmarks/RESULTS.md, one per model and kind of CPU
(CPU: ``-vnni`` for VNNI and AMX, ``-vnni-noamx`` for VNNI alone, nothing without VNNI; OpenVINO's
kernels differ between them). ``--render`` rewrites every stored profile's section.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from foundation import cpu_kind, machine, write_section  # noqa: E402

import vitq.recipes  # noqa: E402
from vitq.api import quantize  # noqa: E402
from vitq.export import cpu_info, export_onnx  # noqa: E402
from vitq.export.openvino import inference_precision, onnx_to_openvino  # noqa: E402
from vitq.models import load_model  # noqa: E402

HERE = Path(__file__).resolve().parent
MODELS = {"small": ("deit_small_patch16_224", "DeiT-Small"), "tiny": ("deit_tiny_patch16_224", "DeiT-Tiny")}
VARIANTS = ["fp32", "bf16", "nncf", "vitq-int", "vitq-int-p4", "vitq-int-sym"]


def _recipe(symmetric: bool) -> Dict[str, Any]:
    spec = yaml.safe_load((Path(vitq.recipes.__file__).parent / "recommended-int.yaml").read_text())
    spec["weights"]["symmetric"] = symmetric
    if symmetric:
        spec["name"] = "recommended-int, symmetric weights"
    return spec


def build(variant: str, loaded, calib: torch.Tensor, fp_onnx: Path, workdir: Path):
    """The OpenVINO model of ``variant`` (an ov.Model) and the precision hint to compile it with."""
    import openvino as ov

    if variant in ("fp32", "bf16"):
        return ov.Core().read_model(str(fp_onnx)), ("f32" if variant == "fp32" else None)
    if variant == "nncf":
        import nncf

        items = [calib[i:i + 1].numpy() for i in range(len(calib))]
        return nncf.quantize(ov.Core().read_model(str(fp_onnx)), nncf.Dataset(items),
                             model_type=nncf.ModelType.TRANSFORMER, preset=nncf.QuantizationPreset.MIXED,
                             subset_size=len(items)), None
    protocol = "p1" if variant == "vitq-int" else "p4"
    result = quantize(loaded.model, _recipe(variant == "vitq-int-sym"), [calib], w_bits=8, a_bits=8,
                      protocol=protocol, device="cpu", progress=False)
    path = workdir / f"{variant}.onnx"
    export_onnx(result.model, path, data_config=loaded.data_config, meta=result.plan.meta, verify=False)
    xml = onnx_to_openvino(path, path.with_suffix(".xml"))
    return ov.Core().read_model(str(xml)), None


def profile(model, precision, threads: int, runs: int) -> Dict[str, Any]:
    import openvino as ov

    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads, "PERF_COUNT": True}
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    compiled = ov.Core().compile_model(model, "CPU", config)
    request = compiled.create_infer_request()
    x = np.random.default_rng(32).standard_normal((32, 3, 224, 224)).astype(np.float32)
    request.infer({0: x})
    by_kind: Dict[str, float] = defaultdict(float)
    walls: List[float] = []
    for _ in range(runs):
        t0 = time.perf_counter()
        request.infer({0: x})
        walls.append(time.perf_counter() - t0)
        for info in request.get_profiling_info():
            if info.status == info.Status.EXECUTED:
                by_kind[f"{info.node_type} [{info.exec_type}]"] += info.real_time.total_seconds() * 1000 / runs
    total = sum(by_kind.values())
    top = sorted(by_kind.items(), key=lambda kv: -kv[1])
    return {"precision": inference_precision(compiled), "b32_ms": round(1000 * statistics.median(walls), 1),
            "counted_ms": round(total, 1),
            "by_kind": [{"kind": k, "ms": round(v, 1), "share": round(100 * v / total, 1)} for k, v in top]}


def results_json(model: str) -> Path:
    return HERE / "results" / f"profile_openvino-{model}{cpu_kind()[0]}.json"


def render(results: Dict[str, Any]) -> None:
    _, label = MODELS[results.get("model", "small")]
    heading = f"## Where the time goes in OpenVINO on {results['cpu_kind']}: {label}"
    lines = [f"{heading} int8 at batch 32 (issue 15)", "",
             f"Command: `{results['command']}`  ", f"Machine: {results['machine']}; CPU features: {results['isa']}  ",
             f"Date: {results['date']}", "",
             f"{label} with random weights (the speed rows of the peers table), compiled by OpenVINO with "
             "performance counters (2 threads, latency hint); per layer type and kernel, milliseconds per batch of "
             "32 summed over the layers of that kind (averaged over the runs; the counters exclude the gaps "
             "between layers, so *counted* is below the wall time).", ""]
    for name, r in results["variants"].items():
        lines += [f"**{name}** ({r['what']}; float parts in {r['precision']}): {r['b32_ms']} ms per batch of 32 "
                  f"(counted {r['counted_ms']} ms)", "", "| layer [kernel] | ms | share |", "|---|---:|---:|"]
        lines += [f"| {k['kind']} | {k['ms']:.1f} | {k['share']:.1f} % |" for k in r["by_kind"][:10]]
        lines.append("")
    if results.get("conclusion"):
        lines += [results["conclusion"], ""]
    write_section(heading, lines)


WHAT = {"fp32": "the float model, float32 forced", "bf16": "the float model, OpenVINO's default precision",
        "nncf": "NNCF quantize, TRANSFORMER", "vitq-int": "vitq recommended-int, p1",
        "vitq-int-p4": "vitq recommended-int, p4", "vitq-int-sym": "vitq recommended-int, p4, symmetric weights"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="small")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--render", action="store_true", help="rewrite the RESULTS.md section from the JSON")
    args = parser.parse_args(argv)
    if args.render:
        for stored in sorted((HERE / "results").glob("profile_openvino-*.json")):
            render(json.loads(stored.read_text()))
        return 0
    timm_name, _ = MODELS[args.model]
    out = results_json(args.model)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    loaded = load_model(timm_name, pretrained=False)
    size = tuple(loaded.data_config["input_size"])
    calib = torch.randn(8, *size, generator=torch.Generator().manual_seed(0))
    given = argv if argv is not None else sys.argv[1:]
    results: Dict[str, Any] = {"command": "python benchmarks/profile_openvino.py " + " ".join(given),
                               "machine": machine(), "isa": cpu_info().isa, "cpu_kind": cpu_kind()[1],
                               "date": time.strftime("%Y-%m-%d"),
                               "model": args.model, "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        fp_onnx = Path(tmp) / "fp32.onnx"
        export_onnx(loaded.model, fp_onnx, data_config=loaded.data_config, verify=False)
        for variant in args.variants:
            model, precision = build(variant, loaded, calib, fp_onnx, Path(tmp))
            r = profile(model, precision, args.threads, args.runs)
            results["variants"][variant] = {"what": WHAT[variant], **r}
            print(variant, r["b32_ms"], "ms;", "; ".join(f"{k['kind']} {k['ms']}" for k in r["by_kind"][:6]),
                  flush=True)
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    render(results)
    print(f"wrote {out} and {HERE / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
