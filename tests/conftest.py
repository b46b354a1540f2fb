"""Shared fixtures: tiny timm models (random weights) and tiny image folders."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from vitq.data import assets_dir

IMG = 32
NUM_CLASSES = 4


def tiny_vit(**kwargs) -> torch.nn.Module:
    """timm's ``test_vit`` at 32×32 (patch 8: a 4×4 grid), 4 classes."""
    torch.manual_seed(0)
    args = dict(img_size=IMG, patch_size=8, num_classes=NUM_CLASSES)
    args.update(kwargs)
    return timm.create_model("test_vit", **args).eval()


def tiny_deit(distilled: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    name = "deit_tiny_distilled_patch16_224" if distilled else "deit_tiny_patch16_224"
    kwargs = dict(img_size=IMG, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=NUM_CLASSES)
    return timm.create_model(name, **kwargs).eval()


def tiny_swin() -> torch.nn.Module:
    """A two-stage Swin with shifted windows (two blocks per stage) and patch merging."""
    torch.manual_seed(0)
    kwargs = dict(img_size=IMG, patch_size=2, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2),
                  num_classes=NUM_CLASSES)
    return timm.create_model("swin_tiny_patch4_window7_224", **kwargs).eval()


@pytest.fixture
def vit() -> torch.nn.Module:
    return tiny_vit()


@pytest.fixture
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(6, 3, IMG, IMG)


def write_images(root: Path, per_class: int = 3, classes=("cat", "dog", "fish", "owl"), size=IMG, mode="RGB"):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            img = Image.fromarray(arr)
            if mode != "RGB":
                img = img.convert(mode)
            img.save(root / c / f"{i:03d}.png")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """An ImageFolder with 4 classes × 3 random 32×32 images."""
    return write_images(tmp_path / "images")


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A tiny ViT saved as a state_dict with its sidecar model card."""
    model = tiny_vit()
    path = tmp_path / "models" / "tiny.pth"
    path.parent.mkdir()
    torch.save(model.state_dict(), path)
    card = {
        "format": "vitq-model-card/1",
        "name": "tiny",
        "timm_model": "test_vit",
        "kwargs": {"img_size": IMG, "patch_size": 8, "num_classes": NUM_CLASSES},
        "data_config": {"input_size": [3, IMG, IMG], "interpolation": "bilinear", "crop_pct": 1.0,
                        "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
    }
    path.with_suffix(".json").write_text(json.dumps(card))
    return path


@pytest.fixture(scope="session")
def assets() -> Path:
    root = assets_dir()
    if not (root / "models").is_dir():
        pytest.skip(f"real assets not found at {root} (set VITQ_ASSETS)")
    return root


@pytest.fixture
def export_run(checkpoint, image_folder, tmp_path, capsys) -> Path:
    """A W4A8 run folder of the tiny checkpoint, calibrated on 4 images (for the export tests)."""
    from vitq.cli import main

    from test_cli import quantize_args

    out = tmp_path / "run"
    assert main(quantize_args(checkpoint, image_folder, out, "--num-calib", "4")) == 0, capsys.readouterr().err
    capsys.readouterr()
    return out
