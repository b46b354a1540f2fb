"""Semantic-segmentation sets: images with per-pixel label maps (CamVid's layout, or any set like it).

Layout: ``ROOT/images/<split>/<stem>.<ext>`` with ``ROOT/labels/<split>/<stem>.png`` (one channel,
the class index per pixel; ``ignore_index`` for void), and optionally ``ROOT/classes.json`` with
``classes`` and ``ignore_index``. ``ROOT`` may also be one split (``images/`` and ``labels/`` right
under it).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..errors import VitqError
from .folder import IMAGE_SUFFIXES, build_transform, open_rgb


@dataclass(frozen=True)
class SegmentationSet:
    """Image files with their label maps.

    Attributes:
        root: the set's folder (the one holding ``images/`` and ``labels/``).
        split: the split read (``test``, ...), or None for a folder without splits.
        images, labels: the files, paired by stem, sorted.
        classes: class names (from ``classes.json``) or None.
        ignore_index: the label value not scored (void), or None.
    """

    root: Path
    split: Optional[str]
    images: Tuple[Path, ...]
    labels: Tuple[Path, ...]
    classes: Optional[List[str]]
    ignore_index: Optional[int]

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices: Sequence[int]) -> "SegmentationSet":
        return SegmentationSet(self.root, self.split, tuple(self.images[i] for i in indices),
                               tuple(self.labels[i] for i in indices), self.classes, self.ignore_index)

    def sample(self, n: Optional[int], seed: int) -> "SegmentationSet":
        """A seeded subset of ``n`` pairs (all when None or ``n`` ≥ the set)."""
        if n is None or n >= len(self):
            return self
        return self.subset(sorted(random.Random(seed).sample(range(len(self)), n)))

    @property
    def folder(self) -> Path:
        return self.root / "images" / self.split if self.split else self.root / "images"


def _files(folder: Path) -> Dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}


def scan_segmentation(root: str | Path, split: str = "test") -> SegmentationSet:
    """The ``split`` of a segmentation set at ``root`` (see the module's layout).

    Raises:
        VitqError: a missing folder, no images, or an image without a label map (named).
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise VitqError(f"segmentation set {root} does not exist or is not a folder")
    if (root / "images" / split).is_dir():
        images_dir, labels_dir, used = root / "images" / split, root / "labels" / split, split
    elif (root / "images").is_dir() and not any(p.is_dir() for p in (root / "images").iterdir()):
        images_dir, labels_dir, used = root / "images", root / "labels", None
    else:
        raise VitqError(f"{root} is not a segmentation set with a {split!r} split: expected "
                        f"{root}/images/{split}/ and {root}/labels/{split}/ (one label PNG per image, same stem)")
    if not labels_dir.is_dir():
        raise VitqError(f"{labels_dir} does not exist: a segmentation set needs a label map per image")
    images, labels = _files(images_dir), _files(labels_dir)
    if not images:
        raise VitqError(f"{images_dir} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    missing = sorted(set(images) - set(labels))
    if missing:
        raise VitqError(f"{len(missing)} image(s) in {images_dir} have no label map in {labels_dir} "
                        f"(e.g. {missing[0]!r}); every image needs <stem>.png beside it in labels/")
    classes, ignore = None, None
    meta = root / "classes.json"
    if meta.is_file():
        try:
            info = json.loads(meta.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise VitqError(f"cannot read {meta}: {err}") from None
        classes, ignore = info.get("classes"), info.get("ignore_index")
    stems = sorted(images)
    return SegmentationSet(root, used, tuple(images[s] for s in stems), tuple(labels[s] for s in stems), classes,
                           ignore)


def read_label(path: Path) -> torch.Tensor:
    """A label map as ``[H, W]`` int64."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P", "I", "I;16"):
                raise VitqError(f"label map {path} has mode {img.mode}: expected one channel of class indices")
            return torch.from_numpy(np.array(img, dtype=np.int64))
    except VitqError:
        raise
    except Exception as err:
        raise VitqError(f"cannot read label map {path}: {type(err).__name__}: {err}") from None


class SegmentationDataset(Dataset):
    """``(image, label)``: the image through the model's eval transform (resized to its input size),
    the label map at its own size (predictions are resized to it for scoring)."""

    def __init__(self, data: SegmentationSet, data_config: Dict[str, Any]) -> None:
        self.data = data
        self.transform = build_transform({**data_config, "crop_pct": 1.0})  # the whole scene, no crop

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        img = open_rgb(self.data.images[i])
        label = read_label(self.data.labels[i])
        if tuple(label.shape) != (img.size[1], img.size[0]):
            raise VitqError(f"label map {self.data.labels[i]} is {label.shape[1]}×{label.shape[0]} but its image is "
                            f"{img.size[0]}×{img.size[1]}")
        return self.transform(img), label


def _collate(batch):
    images = torch.stack([b[0] for b in batch])
    labels = [b[1] for b in batch]
    if all(lab.shape == labels[0].shape for lab in labels):
        return images, torch.stack(labels)
    return images, labels  # label maps of several sizes: a list


def segmentation_loader(data: SegmentationSet, data_config: Dict[str, Any], batch_size: int = 8,
                        num_workers: int = 0) -> DataLoader:
    """An ordered loader of ``(images [B, 3, h, w], labels [B, H, W] or a list)`` batches."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise VitqError(f"batch size must be a positive integer, got {batch_size!r}")
    return DataLoader(SegmentationDataset(data, data_config), batch_size=batch_size, shuffle=False,
                      num_workers=num_workers, collate_fn=_collate)
