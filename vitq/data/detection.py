"""Object-detection sets in COCO format, and image batches in a torchvision detector's input form.

Layout of an evaluation set ``ROOT``: one COCO annotation file (``images``, ``annotations``,
``categories``), found as ``ROOT/annotations.json``, else the one ``ROOT/annotations/instances_*.json``
(of several, the one ``instances_val*.json``), else the one ``.json`` file in ``ROOT``; each
image entry's ``file_name`` under ``ROOT/images/``, ``ROOT/<split>/`` (COCO's own layout:
``annotations/instances_val2017.json`` with ``val2017/``) or ``ROOT/``.

A batch is ``(images, targets)``: a list of ``[3, H, W]`` float tensors in [0, 1] at the files'
own sizes (a torchvision detector normalises and resizes inside), and a list of ``{"image_id": id}``
(-1 for calibration images, which have no annotations).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.functional import pil_to_tensor

from ..errors import VitqError
from .folder import ImageList, find_bad_images, open_rgb

#: the image id of a calibration image (it has no annotations)
NO_IMAGE_ID = -1


@dataclass(frozen=True)
class DetectionSet:
    """The images of a COCO-format annotation file and where they are.

    Attributes:
        root: the set's folder.
        annotations: the annotation file read.
        coco: its contents (``images``, ``annotations``, ``categories``, ...).
        images: each image's file (found or, when missing, where it was first looked for), in the
            order of the file's ``images``.
        image_ids: each image's COCO id.
        sizes: each image's ``(width, height)`` from the file (None where it gives none).
    """

    root: Path
    annotations: Path
    coco: Dict[str, Any]
    images: Tuple[Path, ...]
    image_ids: Tuple[int, ...]
    sizes: Tuple[Optional[Tuple[int, int]], ...]

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices: Sequence[int]) -> "DetectionSet":
        return DetectionSet(self.root, self.annotations, self.coco, tuple(self.images[i] for i in indices),
                            tuple(self.image_ids[i] for i in indices), tuple(self.sizes[i] for i in indices))

    def sample(self, n: Optional[int], seed: int) -> "DetectionSet":
        """A seeded subset of ``n`` images, in the file's order (all when None or ``n`` ≥ the set)."""
        if n is None or n >= len(self):
            return self
        return self.subset(sorted(random.Random(seed).sample(range(len(self)), n)))

    def ground_truth(self) -> Dict[str, Any]:
        """The annotations restricted to this set's images (COCOeval scores every image of its
        ground truth: an image left out of a subset would count its objects as missed)."""
        ids = set(self.image_ids)
        return {**self.coco, "images": [e for e in self.coco["images"] if e["id"] in ids],
                "annotations": [a for a in self.coco["annotations"] if a.get("image_id") in ids]}

    def categories(self) -> Dict[int, str]:
        """COCO category id → name."""
        return {int(c["id"]): str(c.get("name", c["id"])) for c in self.coco.get("categories", [])}


def find_annotations(root: Path) -> Path:
    """The annotation file of ``root`` (see the module's layout).

    Raises:
        VitqError: none, or several to choose from, naming what was looked for.
    """
    if (root / "annotations.json").is_file():
        return root / "annotations.json"
    looked = [str(root / "annotations.json")]
    folder = root / "annotations"
    if folder.is_dir():
        found = sorted(folder.glob("instances_*.json"))
        if len(found) > 1:  # COCO ships train and val side by side: val is the one to score
            found = [p for p in found if p.name.startswith("instances_val")] or found
        if len(found) == 1:
            return found[0]
        if found:
            raise VitqError(f"{folder} holds {len(found)} annotation files ({', '.join(p.name for p in found)}): "
                            f"keep the one to score there, or copy it to {root / 'annotations.json'}")
        looked.append(str(folder / "instances_*.json"))
    found = sorted(p for p in root.glob("*.json") if p.is_file())
    if len(found) == 1:
        return found[0]
    if found:
        raise VitqError(f"{root} holds {len(found)} .json files ({', '.join(p.name for p in found[:5])}): name the "
                        f"annotations {root / 'annotations.json'}")
    looked.append(str(root / "*.json"))
    raise VitqError(f"{root} has no COCO annotation file: looked for {', '.join(looked)}")


def _read_coco(path: Path) -> Dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise VitqError(f"cannot read COCO annotations {path}: {err}") from None
    if not isinstance(data, dict):
        raise VitqError(f"{path} is not COCO annotations: expected an object with images, annotations, categories")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise VitqError(f"{path} is not COCO annotations: it lacks the list(s) {', '.join(missing)}")
    for entry in data["images"]:
        if not isinstance(entry, dict) or "id" not in entry or not isinstance(entry.get("file_name"), str):
            raise VitqError(f"{path}: every entry of 'images' needs an 'id' and a 'file_name', got {entry!r}")
    if not data["images"]:
        raise VitqError(f"{path} lists no images")
    return data


def scan_detection(root: str | Path) -> DetectionSet:
    """The COCO-format evaluation set at ``root`` (see the module's layout). Image files are looked
    up, not opened: :func:`check_detection_images` names the missing and unreadable ones.

    Raises:
        VitqError: a missing folder, no (or an ambiguous) annotation file, or one that is not COCO.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise VitqError(f"detection set {root} does not exist or is not a folder: pass the folder holding the COCO "
                        "annotations and the images")
    path = find_annotations(root)
    coco = _read_coco(path)
    split = path.stem[len("instances_"):] if path.stem.startswith("instances_") else None
    folders = [root / "images"] + ([root / split] if split else []) + [root]
    folders = [f for f in folders if f.is_dir()]
    images, ids, sizes = [], [], []
    for entry in coco["images"]:
        name = entry["file_name"]
        found = next((f / name for f in folders if (f / name).is_file()), None)
        images.append(found or folders[0] / name)
        ids.append(entry["id"])
        w, h = entry.get("width"), entry.get("height")
        sizes.append((int(w), int(h)) if isinstance(w, int) and isinstance(h, int) else None)
    return DetectionSet(root, path, coco, tuple(images), tuple(ids), tuple(sizes))


def check_detection_images(data: DetectionSet, skip: bool = False) -> Tuple[DetectionSet, int]:
    """``data`` without the images that are missing or cannot be read, before any work starts.

    Returns:
        The set to use and how many images were left out.

    Raises:
        VitqError: when some are missing or unreadable and ``skip`` is False (naming the first few
            and the fix), or when none is left.
    """
    bad = dict(find_bad_images(ImageList(data.root, data.images, (-1,) * len(data), {}, "unlabelled")))
    if not bad:
        return data, 0
    missing = [p for p in data.images if p in bad and not p.is_file()]
    unreadable = [p for p in data.images if p in bad and p.is_file()]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({', '.join(str(p) for p in missing[:3])}"
                     f"{' and more' if len(missing) > 3 else ''})")
    if unreadable:
        named = "; ".join(f"{p} ({bad[p]})" for p in unreadable[:3])
        parts.append(f"{len(unreadable)} unreadable or too small ({named}{' and more' if len(unreadable) > 3 else ''})")
    listed = "; ".join(parts)
    if not skip:
        raise VitqError(f"{len(bad)} of the {len(data)} images of {data.annotations.name} cannot be used: {listed}. "
                        f"Images are looked for by file_name under {data.root / 'images'}, the annotations' split "
                        f"folder (COCO's val2017/) or {data.root}; put them there, or pass --skip-bad-images to leave "
                        "them out (counted in the report)")
    keep = [i for i, p in enumerate(data.images) if p not in bad]
    if not keep:
        raise VitqError(f"none of the {len(data)} images of {data.annotations} can be used: {listed}")
    return data.subset(keep), len(bad)


def read_image(path: Path, size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """An image file as a ``[3, H, W]`` float tensor in [0, 1] (RGB); ``size`` (width, height), when
    given, must be the file's (the annotations' boxes are in its pixels)."""
    img = open_rgb(path)
    if size is not None and tuple(img.size) != tuple(size):
        raise VitqError(f"image {path} is {img.size[0]}×{img.size[1]} but its annotations say {size[0]}×{size[1]}: "
                        "the boxes would not fit it")
    return pil_to_tensor(img).float().div_(255)


class DetectionImages(Dataset):
    """``(image [3, H, W] in [0, 1], {"image_id": id})`` for image files (a detector's input form)."""

    def __init__(self, paths: Sequence[Path], image_ids: Sequence[int],
                 sizes: Optional[Sequence[Optional[Tuple[int, int]]]] = None) -> None:
        self.paths = list(paths)
        self.image_ids = list(image_ids)
        self.sizes = list(sizes) if sizes is not None else [None] * len(self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, Dict[str, int]]:
        return read_image(self.paths[i], self.sizes[i]), {"image_id": self.image_ids[i]}


def _collate(batch) -> Tuple[List[torch.Tensor], List[Dict[str, int]]]:
    return [b[0] for b in batch], [b[1] for b in batch]


def _loader(dataset: Dataset, batch_size: int, num_workers: int) -> DataLoader:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise VitqError(f"batch size must be a positive integer, got {batch_size!r}")
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_collate)


def detection_loader(data: DetectionSet, batch_size: int = 2, num_workers: int = 0) -> DataLoader:
    """An ordered loader of ``(list of images, list of {"image_id": id})`` batches of ``data``."""
    return _loader(DetectionImages(data.images, data.image_ids, data.sizes), batch_size, num_workers)


def detection_calibration_loader(images: ImageList, batch_size: int = 2, num_workers: int = 0) -> DataLoader:
    """Calibration batches of any folder of images in the same form (image ids :data:`NO_IMAGE_ID`;
    their labels are not used)."""
    return _loader(DetectionImages(images.paths, [NO_IMAGE_ID] * len(images)), batch_size, num_workers)
