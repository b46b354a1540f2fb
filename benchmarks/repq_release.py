"""RepQ-ViT's released code (zkkli/RepQ-ViT, ``classification/test_quant.py``, unmodified) on vitq's
DeiT-Tiny and images, on the CPU, scored with vitq's metrics (issue 12: the peer side by side).

    git clone https://github.com/zkkli/RepQ-ViT /tmp/RepQ-ViT   # commit a160561 measured
    python benchmarks/repq_release.py --repq /tmp/RepQ-ViT [--bits 6 4]

The release's ``main()`` runs as released (its quantized model built by its ``build_model``, its
per-channel qkv/fc1 inputs, log-sqrt2 post-softmax quantizer, calibration, LayerNorm
reparameterisation and recalibration, percentile search). This script only replaces four names
``main()`` looks up: ``args`` (DeiT-Tiny, CPU, seed 0, 32 calibration images, the bits),
``build_dataset`` (the first 32 of the accuracy benchmark's 100 calibration images, which RepQ's
32 random training images stand for, and its 900 evaluation images), ``build_model`` (RepQ's own,
with vitq's checkpoint loaded instead of hub weights and the timm 1.x shims in ``ADAPTATIONS``)
and ``validate`` (vitq's top-1, agreement and KL against the float model's logits).

The checkpoint has two LayerNorm channels whose scale is exactly 0 (their output is a constant);
the release's per-channel percentile search gets a zero step there and crashes (on a GPU too).
Only there, the script gives the release's own min/max step over the range widened to include 0
(the constant stays exact). Results: benchmarks/results/repq_release.json and a RESULTS.md section.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from types import MethodType, SimpleNamespace

from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS_JSON = HERE / "results" / "repq_release.json"


def _release_dir() -> str:
    """The snapshot's ``classification`` folder, from ``--repq`` (read before anything imports it)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--repq", default=None)
    known, _ = parser.parse_known_args()
    if not known.repq:  # (--help too: the release is imported before the options are parsed)
        print(__doc__, file=sys.stderr)
        raise SystemExit("name RepQ-ViT's release with --repq DIR (git clone https://github.com/zkkli/RepQ-ViT DIR)")
    root = Path(known.repq).expanduser()
    root = root / "classification" if (root / "classification").is_dir() else root
    if not (root / "test_quant.py").is_file():
        raise SystemExit(f"--repq {known.repq}: no classification/test_quant.py there (a RepQ-ViT checkout?)")
    return str(root)


sys.path.insert(0, _release_dir())           # RepQ's `utils` and `quant` packages first
sys.path.insert(1, str(HERE))

import torch  # noqa: E402

torch.set_num_threads(1)

import timm  # noqa: E402
import torch.nn as nn  # noqa: E402

import importlib  # noqa: E402

import test_quant  # noqa: E402  (RepQ's script, unmodified)

# utils/__init__ re-exports the function under the module's own name: the module itself, by import_module
repq_build = importlib.import_module("utils.build_model")
from accuracy import deit_tiny_split  # noqa: E402
from vitq.data import assets_dir, make_loader  # noqa: E402
from foundation import machine, write_section  # noqa: E402
from vitq.eval.metrics import compare, predict  # noqa: E402

ADAPTATIONS = [
    "timm.create_model(name, pretrained=True) -> pretrained=False + load_state_dict(our float_model.state_dict()) "
    "(no internet; our weights), patched into utils.build_model's `timm` name; build_model itself unchanged",
    "timm 1.x Block calls attn(x, attn_mask=None, is_causal=False): RepQ's attention_forward(self, x) wrapped to "
    "accept and ignore those two (asserted None/False)",
    "timm 1.x Attention's unused Identity submodules q_norm, k_norm, norm removed (RepQ's attention_forward never "
    "calls them; without removal main()'s reparam loop matches 'norm' in their names and fails on .reduction)",
    "timm 1.x Mlp's Identity `norm` (between act and fc2) removed and Mlp.forward set to timm 0.4-0.6's "
    "fc1-act-drop1-fc2-drop2 (same function; same reason as above)",
    "CHECKPOINT DEGENERACY: our DeiT-Tiny has two LayerNorm channels with gamma exactly 0 (blocks.0.norm2 ch 189, "
    "beta -0.015625; blocks.1.norm1 ch 131, beta 0.03125), so the per-channel fc1/qkv input quantizer sees a "
    "constant channel; the release's percentile search then gets delta 0 -> NaN score -> delta None and crashes "
    "(TypeError, on GPU too). Glue wraps UniformQuantizer.init_quantization_scale: ONLY when the release returns "
    "delta None, use its own min/max formula on [min(x,0), max(x,0)] (the constant is then exactly representable "
    "and stays exact through the reparameterisation); every other tensor is untouched (fallback hits counted)",
    "device cpu instead of cuda (args.device); num_workers 0",
    "build_dataset replaced: calibration batch = our first 32 of the 100 seeded calibration images (RepQ draws a "
    "random shuffled batch of 32 ImageNet train images); evaluation = our 900 preprocessed images (vitq loader, "
    "timm data_config of the checkpoint)",
    "validate replaced: logits scored with vitq.eval.metrics.compare (what vitq.api.evaluate returns; evaluate "
    "itself calls model_size, which needs vitq quantizers' .spec, absent on RepQ's quantizers)",
    "torch.set_num_threads(1)",
]


FALLBACKS = []
FALLBACK_MODE = ["zero"]
_orig_init_scale = test_quant.UniformQuantizer.init_quantization_scale


def init_quantization_scale(self, x, channel_wise=False):
    delta, zero_point = _orig_init_scale(self, x, channel_wise)
    if not channel_wise and delta is None:          # the release crashes here (constant tensor)
        if FALLBACK_MODE[0] == "zero":                  # default: the release's min/max formula, range incl. 0
            x_max, x_min = torch.clamp(x.max(), min=0), torch.clamp(x.min(), max=0)
            assert x_max > x_min, "an all-zero tensor: no fallback"
            delta = (x_max - x_min) / (2 ** self.n_bits - 1)
        else:                                           # sensitivity check only: a 1e-8 floor on the step
            x_min = x.min()
            delta = torch.tensor(1e-8)
        zero_point = (-x_min / delta).round()
        FALLBACKS.append((tuple(x.shape), float(x.min()), float(x.max())))
    return delta, zero_point


test_quant.UniformQuantizer.init_quantization_scale = init_quantization_scale


def old_mlp_forward(self, x):
    x = self.fc1(x)
    x = self.act(x)
    x = self.drop1(x)
    x = self.fc2(x)
    x = self.drop2(x)
    return x


def make_build_model(float_model):
    state = {k: v.clone() for k, v in float_model.state_dict().items()}

    def create_model(name, pretrained=False, **kw):
        m = timm.create_model(name, pretrained=False, **kw)
        m.load_state_dict(state)
        return m

    def build_model(name):
        repq_build.timm = SimpleNamespace(create_model=create_model)
        try:
            model = repq_build.build_model(name)       # RepQ's own: MatMul modules + attention_forward
        finally:
            repq_build.timm = timm
        for module in model.modules():
            if isinstance(module, repq_build.Attention):
                for n in ("q_norm", "k_norm", "norm"):
                    if hasattr(module, n):
                        assert isinstance(getattr(module, n), nn.Identity)
                        delattr(module, n)
                assert getattr(module, "gate", None) is None
                repq_forward = module.forward

                def forward(x, attn_mask=None, is_causal=False, _f=repq_forward):
                    assert attn_mask is None and not is_causal
                    return _f(x)
                module.forward = forward
            if type(module).__name__ == "Mlp" and hasattr(module, "norm"):
                assert isinstance(module.norm, nn.Identity)
                delattr(module, "norm")
                module.forward = MethodType(old_mlp_forward, module)
        return model

    return build_model


def render(results) -> None:
    lines = ["## RepQ-ViT's released code on vitq's DeiT-Tiny and images (issue 12)", "",
             f"Command: `{results['command']}` (RepQ-ViT commit a160561)  ",
             f"Machine: {results['machine']}  ", f"Date: {results['date']}", "",
             "The release's `main()` as released, on the accuracy benchmark's first 32 calibration images and its 900 "
             "evaluation images (float 80.00), scored like vitq's rows (agreement with the float model, "
             "KL(float ‖ quantized)); the adaptations (timm 1.x, CPU, the checkpoint's two constant LayerNorm "
             "channels) are listed in the script. *calibrate s*: from `main()`'s start to its evaluation.", "",
             "| bits | top-1 | agreement % | KL | top-5 | calibrate s | evaluate s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results["rows"]:
        lines.append(f"| {r['bits']} | {r['top1']:.2f} | {r['agreement']:.2f} | {r['kl']:.4f} | {r['top5']:.2f} | "
                     f"{r['calib_seconds']:.0f} | {r['eval_seconds']:.0f} |")
    if results.get("conclusion"):
        lines += ["", results["conclusion"]]
    lines.append("")
    write_section("## RepQ-ViT's released code on vitq's DeiT-Tiny and images", lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, nargs="+", default=[6, 4])
    ap.add_argument("--num-eval", type=int, default=None, help="a quick check on fewer images (writes nothing)")
    ap.add_argument("--repq", required=True, help="RepQ-ViT's checkout (or its classification folder)")
    ap.add_argument("--out", default=str(RESULTS_JSON))
    ap.add_argument("--fallback", choices=["zero", "eps"], default="zero",
                    help="degenerate-channel fallback (sensitivity checks only; results use 'zero')")
    ap.add_argument("--calib", choices=["first", "last", "perm"], default="first",
                    help="which 32 of the 100 calibration images (sensitivity checks only; results use 'first')")
    opts = ap.parse_args()
    FALLBACK_MODE[0] = opts.fallback

    t0 = time.perf_counter()
    loaded, calib, evalset, eval_batches = deit_tiny_split(assets_dir(None), opts.num_eval)
    float_model = loaded.model.eval()
    calib_x, calib_y = [torch.cat(t) for t in zip(*make_loader(calib, loaded.data_config, 50))]
    pick = {"first": torch.arange(32), "last": torch.arange(len(calib_x) - 32, len(calib_x)),
            "perm": torch.randperm(len(calib_x), generator=torch.Generator().manual_seed(0))[:32]}[opts.calib]
    calib_x, calib_y = calib_x[pick], calib_y[pick]
    print(f"data: {len(calib)} calib (using {len(calib_x)}), {sum(len(y) for _, y in eval_batches)} eval images, "
          f"dtype {eval_batches[0][0].dtype}, data_config {loaded.data_config}, {time.perf_counter() - t0:.1f}s",
          flush=True)

    build_model = make_build_model(float_model)

    # float check: RepQ's float model (its MatMul/attention_forward) against our float model
    with torch.no_grad():
        repq_float = build_model("deit_tiny_patch16_224").eval()
        xs = torch.cat([calib_x[:8], eval_batches[0][0][:8]])
        a, b = float_model(xs), repq_float(xs)
        float_maxdiff = (a - b).abs().max().item()
    print(f"float check: max |logit diff| on 16 images = {float_maxdiff:.3e}, "
          f"argmax equal {bool((a.argmax(1) == b.argmax(1)).all())}", flush=True)
    del repq_float

    t = time.perf_counter()
    (fp_logits,), labels = predict(float_model, eval_batches, "cpu", progress=False)
    print(f"float logits: {time.perf_counter() - t:.1f}s", flush=True)

    rows = []
    for bits in opts.bits:
        captured = {}

        def validate(args, val_loader, model, criterion, device):
            captured["calib_seconds"] = time.perf_counter() - captured["start"]
            t1 = time.perf_counter()
            (q_logits,), lab = predict(model, val_loader, "cpu", progress=False)
            captured["eval_seconds"] = time.perf_counter() - t1
            assert torch.equal(lab, labels)
            captured["metrics"] = compare(fp_logits, q_logits, lab)
            captured["model"] = model
            m = captured["metrics"]
            return 0.0, m["quant_top1"], m["quant_top5"]

        test_quant.args = argparse.Namespace(
            model="deit_tiny", dataset=None, calib_batchsize=32, val_batchsize=200, num_workers=0,
            device="cpu", print_freq=100, seed=0, w_bits=bits, a_bits=bits)
        test_quant.build_dataset = lambda args: ([(calib_x, calib_y)], eval_batches)
        test_quant.build_model = build_model
        test_quant.validate = validate

        FALLBACKS.clear()
        captured["start"] = time.perf_counter()
        test_quant.main()                                # RepQ's main, as released
        m = captured["metrics"]
        q = captured["model"]
        n_lin = sum(1 for x in q.modules() if type(x).__name__ in ("QuantLinear", "QuantConv2d", "QuantMatMul"))
        row = {
            "bits": f"W{bits}A{bits}",
            "top1": m["quant_top1"],
            "float_top1": m["fp_top1"],
            "agreement": m["agreement"],
            "kl": m["kl"],
            "top5": m["quant_top5"],
            "float_top5": m["fp_top5"],
            "num_eval": int(labels.numel()),
            "calib_seconds": round(captured["calib_seconds"], 1),
            "eval_seconds": round(captured["eval_seconds"], 1),
            "notes": (f"RepQ-ViT release {test_quant.__file__} run unmodified via test_quant.main(); seed 0; "
                      f"degenerate-channel fallback used {len(FALLBACKS)}x: {FALLBACKS}; "
                      f"32 calibration images (first 32 of our 100); {n_lin} quantized modules; CPU 1 thread; "
                      f"float RepQ model vs our float model max |logit diff| {float_maxdiff:.2e}; "
                      "calib_seconds = main() start to validate (build + initial calibration + reparam + "
                      "recalibration); eval_seconds = quantized model on the eval images only. "
                      "Adaptations: " + " | ".join(ADAPTATIONS)),
        }
        print(json.dumps({k: v for k, v in row.items() if k != "notes"}), flush=True)
        rows.append(row)
        row["notes"] = f"fallback={opts.fallback}; calib={opts.calib}; " + row["notes"]
        if not opts.num_eval:
            results = {"command": "python benchmarks/repq_release.py " + " ".join(sys.argv[1:]),
                       "machine": machine(), "date": time.strftime("%Y-%m-%d"), "rows": rows}
            Path(opts.out).write_text(json.dumps(results, indent=1) + "\n")
    if not opts.num_eval and Path(opts.out) == RESULTS_JSON:
        render(json.loads(RESULTS_JSON.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
