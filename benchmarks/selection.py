"""What the selection benchmarks share (select_bias_correct.py, select_recipe.py): DeiT-Tiny's 100
calibration images of the accuracy benchmark's split in two halves of 50 (or the CIFAR-10 ViT's 256
seed-0 calibration images of ``cifar10/train`` in halves of 128), the float model's logits on each,
and the results record. None of the evaluation images is touched."""
from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import deit_tiny_split  # noqa: E402
from foundation import machine  # noqa: E402

from vitq.data import assets_dir, load_images, make_loader  # noqa: E402
from vitq.eval.metrics import predict  # noqa: E402
from vitq.models import load_model  # noqa: E402


def calibration_halves(assets: Optional[str], model: str = "imagenet") -> Tuple[
        torch.nn.Module, List[Tuple[torch.Tensor, torch.Tensor]], Dict[int, torch.Tensor]]:
    """The float model, its calibration images as two ``(images, labels)`` halves, and the float
    logits of each half (keyed 0 and 1). ``model``: ``imagenet`` (DeiT-Tiny, the accuracy benchmark's
    100 calibration images, halves of 50) or ``cifar`` (the CIFAR-10 ViT, the accuracy benchmark's
    256 seed-0 calibration images, halves of 128)."""
    root = assets_dir(assets)
    if model == "cifar":
        loaded = load_model(root / "models/vit_cifar10_d6.pth")
        calib = load_images(root / "cifar10/train", 256, seed=0, what="calibration images")
        halves = [(x, y) for x, y in make_loader(calib, loaded.data_config, 128)]
    else:
        loaded, calib, _, _ = deit_tiny_split(root, 0)
        halves = [(x, y) for x, y in make_loader(calib, loaded.data_config, 50)]
    fp = {}
    for i, half in enumerate(halves):
        (fp[i],), _ = predict(loaded.model, [half], "cpu", progress=False)
    return loaded.model, halves, fp


def new_results(script: str, argv: Optional[List[str]], path: Path, append: bool = False) -> Dict[str, Any]:
    """The results record of a run of ``script``: its command, machine and date, the rows kept from
    ``path`` with ``append`` (the commands then joined), and the conclusion written there before."""
    given = argv if argv is not None else sys.argv[1:]
    command = (f"python benchmarks/{script} " + shlex.join(given)).strip()
    previous = json.loads(path.read_text()) if path.exists() else {}
    # rows carry the machine they ran on (``row["machine"]``); the file's ``machine`` is that of the rows
    # written before rows did, kept when appending
    results = {"command": command, "machine": previous.get("machine", machine()) if append else machine(),
               "date": time.strftime("%Y-%m-%d"),
               "rows": list(previous.get("rows", [])) if append else [],
               "conclusion": previous.get("conclusion", "")}
    if append and previous.get("command"):
        results["command"] = f"{previous['command']}; {command}"
    return results
