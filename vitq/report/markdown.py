"""report.md for a run."""
from __future__ import annotations

from typing import Any, Dict


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def run_report(metrics: Dict[str, Any], notes: Dict[str, Any]) -> str:
    """A Markdown report of one quantization run: setting, accuracy table, size, notes."""
    m = metrics
    lines = [
        f"# vitq run: {m['model']} — {m['recipe']} W{m['w_bits']}A{m['a_bits']} ({m['protocol']})",
        "",
        f"- protocol **{m['protocol']}**: {notes.get('protocol_description', '')}"
        + (f"; image input at {m['input_bits']} bits" if m.get("input_bits") else ""),
        f"- calibration: {m['num_calib']} images from {notes.get('calib', '—')}",
        f"- evaluation: {m['num_eval']} images from {notes.get('eval', '—')}",
        f"- seed {m['seed']}, device {notes.get('device', '—')}, {m['seconds']:.1f} s in all",
        "",
    ]
    if m.get("task") == "segmentation" and m.get("quant_miou") is not None:
        lines += [
            "| model | mIoU | pixel accuracy |",
            "|---|---:|---:|",
            f"| float | {_fmt(m['fp_miou'])} | {_fmt(m['fp_pixel_acc'])} |",
            f"| W{m['w_bits']}A{m['a_bits']} {m['recipe']} | {_fmt(m['quant_miou'])} | {_fmt(m['quant_pixel_acc'])} |",
            "",
            "mIoU: intersection and union of each class summed over all images, void pixels ignored, averaged "
            f"over the classes. Pixels where the quantized model predicts the float model's class: "
            f"{_fmt(m['pixel_agreement'])} %. Mean per-pixel KL(float ‖ quantized): {_fmt(m['kl'], 4)}.",
            "",
            "| class | float IoU | quantized IoU | Δ |",
            "|---|---:|---:|---:|",
        ]
        for name, iou in m.get("per_class_iou", {}).items():
            delta = None if iou["fp"] is None or iou["quant"] is None else iou["quant"] - iou["fp"]
            lines.append(f"| {name} | {_fmt(iou['fp'])} | {_fmt(iou['quant'])} | {_fmt(delta)} |")
        lines += ["", "Predictions of the first images, float beside quantized: `predictions.png`.", ""]
    elif m.get("task") == "segmentation":
        lines += ["No evaluation set was given: mIoU was not measured.", ""]
    elif m.get("quant_top1") is not None:
        lines += [
            "| model | top-1 | top-5 |",
            "|---|---:|---:|",
            f"| float | {_fmt(m['fp_top1'])} | {_fmt(m['fp_top5'])} |",
            f"| W{m['w_bits']}A{m['a_bits']} {m['recipe']} | {_fmt(m['quant_top1'])} | {_fmt(m['quant_top5'])} |",
            "",
            f"Top-1 agreement with the float model: {_fmt(m['agreement'])} %. "
            f"Mean KL(float ‖ quantized) of the softmax outputs: {_fmt(m['kl'], 4)}.",
            "",
        ]
    else:
        lines += ["No evaluation folder was given: accuracy was not measured.", ""]
    lines += [
        f"Weights: {m['weight_bytes']:,} bytes quantized vs {m['fp_weight_bytes']:,} bytes in float32 "
        f"({m['weight_bytes'] / m['fp_weight_bytes']:.3f}×). Quantized weights are counted packed at "
        "their bit-width with float32 scales and zero points; every other parameter as float32.",
        "",
        "Quant points enabled, by role: "
        + ", ".join(f"{role} {n}" for role, n in sorted(notes.get("quant_points", {}).items())),
        "",
        "Layers left in float (weights not quantized): "
        + (", ".join(f"{name} ({n})" for name, n in sorted(notes["float_layers"].items())) or "none")
        if notes.get("float_layers") is not None else "",
        "",
    ]
    bits = m.get("bits")
    if bits:
        lines += ["| layers | count | weight bits (weighted / mean) | input bits (weighted / mean) |",
                  "|---|---:|---:|---:|"]
        for scope, label in (("blocks", "linear layers of the blocks"), ("all", "all linear/conv layers")):
            sc = bits["scopes"][scope]
            lines.append(f"| {label} | {sc['layers']} | {_fmt(sc['w_bits']['weighted'], 3)} / "
                         f"{_fmt(sc['w_bits']['unweighted'], 3)} | {_fmt(sc['a_bits']['weighted'], 3)} / "
                         f"{_fmt(sc['a_bits']['unweighted'], 3)} |")
        lines += ["", f"Bit-operations per image: {bits['gbops']:.3f} GBOPs ({bits['fp_gbops']:.3f} in float32, "
                  f"{bits['gmacs']:.3f} GMACs). Definitions: {bits['definition']}. Per layer: `bits.json`, "
                  "`bits_per_layer.png`.", ""]
    for extra in notes.get("remarks", []):
        lines.append(f"- {extra}")
    return "\n".join(lines).rstrip() + "\n"
