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
