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
