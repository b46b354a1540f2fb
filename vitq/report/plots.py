"""Plots of a run (matplotlib, an optional dependency: ``pip install 'vitq[plots]'``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def search_curve(curve: Sequence[Dict[str, Any]], path: Path, title: str = "") -> Optional[Path]:
    """``search_curve.png``: the best fitness of the unit being searched against fitness
    evaluations, one colour per unit, with data refreshes and held-out losses marked.

    Returns the path, or None when matplotlib is not installed.
    """
    plt = _pyplot()
    if plt is None or not curve:
        return None
    fig, ax = plt.subplots(figsize=(9, 4.5))
    steps: Dict[int, List[Dict[str, Any]]] = {}
    for point in curve:
        steps.setdefault(point["step"], []).append(point)
    cmap = plt.get_cmap("tab20")
    units = sorted({p["unit"] for p in curve})
    colour = {u: cmap(i % 20) for i, u in enumerate(units)}
    for points in steps.values():
        ax.plot([p["evaluations"] for p in points], [p["fitness"] for p in points], color=colour[points[0]["unit"]],
                lw=1.2)
    refresh = [p for p in curve if p.get("event") == "refresh"]
    if refresh:
        ax.scatter([p["evaluations"] for p in refresh], [p["fitness"] for p in refresh], marker="v", color="k",
                   s=18, label="images refreshed", zorder=3)
    held = [p for p in curve if "holdout" in p]
    if held:
        ax2 = ax.twinx()
        ax2.plot([p["evaluations"] for p in held], [p["holdout"] for p in held], "k--", lw=1, label="held-out loss")
        ax2.set_ylabel("held-out loss (dashed)")
    ax.set_xlabel("fitness evaluations")
    ax.set_ylabel("best fitness of the unit (lower is better)")
    ax.set_title(title or f"search: {len(units)} units, {len(steps)} unit searches")
    if refresh:
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def bits_per_layer(layers: Sequence[Dict[str, Any]], path: Path, title: str = "") -> Optional[Path]:
    """``bits_per_layer.png``: the weight and input width of each linear/convolution layer, in
    forward order (``layers`` as in :func:`vitq.eval.bit_stats`; the attention products are left
    out). A float operand is drawn at 32 bits' place as "fp"."""
    plt = _pyplot()
    layers = [lay for lay in layers if lay.get("params")]
    if plt is None or not layers:
        return None
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(layers) + 2), 4.2))
    xs = list(range(len(layers)))
    width = 0.4
    cap = max([lay[k] for lay in layers for k in ("w_bits", "a_bits") if lay[k] < 32] + [8]) + 1

    def shown(b: int) -> float:
        return cap if b >= 32 else b

    ax.bar([x - width / 2 for x in xs], [shown(lay["w_bits"]) for lay in layers], width, label="weights")
    ax.bar([x + width / 2 for x in xs], [shown(lay["a_bits"]) for lay in layers], width, label="inputs")
    ax.set_xticks(xs)
    ax.set_xticklabels([lay["name"] for lay in layers], rotation=90, fontsize=6)
    ax.set_yticks(list(range(0, cap)) + [cap])
    ax.set_yticklabels([str(i) for i in range(0, cap)] + ["fp"])
    ax.set_ylabel("bits")
    ax.set_title(title or "bits per layer")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def pareto(series: Dict[str, Sequence[Dict[str, Any]]], path: Path, *, x: str = "avg_w", y: str = "agreement",
           xlabel: str = "average weight bits", ylabel: str = "agreement with the float model (%)",
           title: str = "") -> Optional[Path]:
    """``pareto.png``: one line per series of points (e.g. the greedy trajectory), ``y`` against
    ``x``; a series of one point is drawn as a marker (e.g. uniform precision)."""
    plt = _pyplot()
    series = {k: [p for p in v if p.get(x) is not None and p.get(y) is not None] for k, v in series.items()}
    series = {k: v for k, v in series.items() if v}
    if plt is None or not series:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label, points in series.items():
        points = sorted(points, key=lambda p: p[x])
        style = "o" if len(points) == 1 else "o-"
        ax.plot([p[x] for p in points], [p[y] for p in points], style, ms=4, lw=1.2, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title or f"{ylabel} vs {xlabel}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


#: colours of label maps: CamVid's own for its 11 classes (sky, building, pole, road, sidewalk, tree,
#: sign, fence, car, pedestrian, bicyclist), then a seeded spread for more classes
_PALETTE = [(128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
            (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192)]


def label_colours(num: int) -> List[tuple]:
    """``num`` RGB colours for class indices."""
    import random

    rng = random.Random(0)
    extra = [(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(max(0, num - len(_PALETTE)))]
    return (_PALETTE + extra)[:num]


def segmentation_examples(examples: Sequence[Any], path: Path, data_config: Dict[str, Any], *,
                          ignore_index: Optional[int] = None, titles: Sequence[str] = ()) -> Optional[Path]:
    """``predictions.png``: one row per example: the image, its labels, then each model's
    prediction (the float model's beside the quantized one's); void pixels black.

    ``examples``: ``(image [3, h, w] normalised, label [H, W], [prediction [H, W], ...])``. Drawn
    with PIL (no matplotlib needed). Returns the path, or None when there is nothing to draw.
    """
    if not examples:
        return None
    import numpy as np
    import torch
    from PIL import Image

    mean = torch.tensor(data_config["mean"]).view(-1, 1, 1)
    std = torch.tensor(data_config["std"]).view(-1, 1, 1)
    top = max(int(max(int(lab.max()), *(int(p.max()) for p in preds))) for _, lab, preds in examples) + 1
    colours = np.array(label_colours(top) + [(0, 0, 0)], dtype=np.uint8)

    def paint(label: torch.Tensor) -> Image.Image:
        idx = label.numpy().astype(np.int64)
        idx = np.where((idx == ignore_index) | (idx < 0) | (idx >= top), top, idx)
        return Image.fromarray(colours[idx])

    rows = []
    for image, label, preds in examples:
        h, w = label.shape[-2:]
        rgb = ((image * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        tiles = [Image.fromarray(rgb).resize((w, h), Image.BILINEAR), paint(label)] + [paint(p) for p in preds]
        rows.append(tiles)
    return _contact_sheet(rows, titles, path)


def detection_examples(examples: Sequence[Any], path: Path, *, categories: Optional[Dict[int, str]] = None,
                       label_to_category: Optional[Dict[int, int]] = None, titles: Sequence[str] = (),
                       min_score: float = 0.3, max_boxes: int = 10, side: int = 320) -> Optional[Path]:
    """``detections.png``: one row per example: the image with its ground-truth boxes, then with each
    model's detections (the float model's beside the quantized one's), each box coloured by its
    category and named with its score; at most ``max_boxes`` per tile, scoring ``min_score`` or more.

    ``examples``: ``(image [3, H, W] in [0, 1], ground truth (COCO annotation dicts), [outputs, ...])``
    with torchvision's outputs (``boxes`` x1 y1 x2 y2 in the image's pixels, ``scores``, ``labels``).
    Drawn with PIL (no matplotlib needed), each image scaled to ``side`` pixels on its longer side.
    Returns the path, or None when there is nothing to draw.
    """
    if not examples:
        return None
    from PIL import Image, ImageDraw

    categories = categories or {}
    known = sorted(categories)
    colours = dict(zip(known, label_colours(len(known))))

    def category(label: int) -> int:
        return label_to_category.get(label, label) if label_to_category else label

    def tile(image, boxes) -> Image.Image:
        h, w = image.shape[-2:]
        scale = side / max(h, w)
        rgb = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        out = Image.fromarray(rgb).resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
        draw = ImageDraw.Draw(out)
        for (x1, y1, x2, y2), cat, text in boxes:
            colour = colours.get(cat, (255, 255, 0))
            draw.rectangle([x1 * scale, y1 * scale, x2 * scale, y2 * scale], outline=colour, width=2)
            draw.text((x1 * scale + 2, y1 * scale + 1), text, fill=colour)
        return out

    rows = []
    for image, truth, outputs in examples:
        gt = [((x, y, x + bw, y + bh), a["category_id"], categories.get(a["category_id"], str(a["category_id"])))
              for a in truth for x, y, bw, bh in [a["bbox"]]]
        row = [tile(image, gt)]
        for out in outputs:
            keep = [k for k in out["scores"].argsort(descending=True).tolist() if float(out["scores"][k]) >= min_score]
            boxes = []
            for k in keep[:max_boxes]:
                cat = category(int(out["labels"][k]))
                name = categories.get(cat, str(cat))
                boxes.append((tuple(out["boxes"][k].tolist()), cat, f"{name} {float(out['scores'][k]):.2f}"))
            row.append(tile(image, boxes))
        rows.append(row)
    return _contact_sheet(rows, titles, path)


def _contact_sheet(rows: Sequence[Sequence[Any]], titles: Sequence[str], path: Path) -> Path:
    """PIL tiles laid out in a grid (one row per example), the column titles in a band above;
    saved to ``path``."""
    from PIL import Image, ImageDraw

    tile_w = max(t.size[0] for row in rows for t in row)
    tile_h = max(t.size[1] for row in rows for t in row)
    band = 18 if titles else 0
    sheet = Image.new("RGB", (tile_w * len(rows[0]), band + tile_h * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for c, title in enumerate(titles[:len(rows[0])]):
        draw.text((c * tile_w + 4, 3), str(title), fill=(0, 0, 0))
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            sheet.paste(tile, (c * tile_w, band + r * tile_h))
    path = Path(path)
    sheet.save(path)
    return path
