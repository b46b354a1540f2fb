"""report.md for a run."""
from __future__ import annotations

from typing import Any, Dict, List


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


#: COCOeval's twelve summary numbers, as its own summary names them
_COCO_STATS = (("ap", "AP @ IoU 0.50:0.95"), ("ap50", "AP @ IoU 0.50"), ("ap75", "AP @ IoU 0.75"),
               ("ap_small", "AP small"), ("ap_medium", "AP medium"), ("ap_large", "AP large"),
               ("ar1", "AR, 1 detection"), ("ar10", "AR, 10 detections"), ("ar100", "AR, 100 detections"),
               ("ar_small", "AR small"), ("ar_medium", "AR medium"), ("ar_large", "AR large"))


def _coco(value: Any) -> str:
    """A COCOeval number; its -1 (here -100: no ground-truth object of that kind) as —."""
    return "—" if value is None or value < 0 else f"{value:.2f}"


def _detection_section(m: Dict[str, Any]) -> List[str]:
    """Box AP (and mask AP) of both models, then COCOeval's whole summary side by side."""
    types = [("bbox", "box")] + ([("segm", "mask")] if m.get("quant_segm_ap") is not None else [])
    head = " | ".join(f"{what} AP | {what} AP50 | {what} AP75" for _, what in types)
    lines = [f"| model | {head} |", "|---|" + "---:|" * (3 * len(types))]
    for tag, name in (("fp", "float"), ("quant", f"W{m['w_bits']}A{m['a_bits']} {m['recipe']}")):
        cells = " | ".join(f"{_coco(m[f'{tag}_{iou}_ap'])} | {_coco(m[f'{tag}_{iou}_ap50'])} | "
                           f"{_coco((m.get(f'{tag}_{iou}') or {}).get('ap75'))}" for iou, _ in types)
        lines.append(f"| {name} | {cells} |")
    lines += ["", "pycocotools' COCOeval on the evaluation images (percent): AP averaged over IoU thresholds 0.50 "
              "to 0.95, and at 0.50 and 0.75; AR: average recall at most 1, 10 or 100 detections an image; "
              "— where the images hold no object of that size.", ""]
    cols = " | ".join(f"float {what} | quantized {what} | Δ" for _, what in types)
    lines += [f"| COCOeval | {cols} |", "|---|" + "---:|" * (3 * len(types))]
    for key, label in _COCO_STATS:
        cells = []
        for iou, _ in types:
            fp, q = (m.get(f"fp_{iou}") or {}).get(key), (m.get(f"quant_{iou}") or {}).get(key)
            delta = q - fp if fp is not None and q is not None and fp >= 0 and q >= 0 else None
            cells.append(f"{_coco(fp)} | {_coco(q)} | {_fmt(delta)}")
        lines.append(f"| {label} | {' | '.join(cells)} |")
    lines += ["", "A few images with their ground-truth boxes, the float and the quantized detections: "
              "`detections.png`.", ""]
    return lines


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
    elif m.get("task") == "detection" and m.get("quant_bbox_ap") is not None:
        lines += _detection_section(m)
    elif m.get("task") == "detection":
        lines += ["No evaluation set was given: box AP was not measured.", ""]
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
