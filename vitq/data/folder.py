"""Image folders: ImageFolder layout or a flat folder of ImageNet files, seeded class-balanced subsets."""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image, UnidentifiedImageError
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset

from ..errors import VitqError
from .synthetic.io import SYNTHETIC_MARKER

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")
_SYNSET = re.compile(r"^(n\d{8})")


@lru_cache(maxsize=1)
def imagenet_synsets() -> Tuple[str, ...]:
    """The 1,000 ImageNet-1k synsets in class-index order (timm ships the list)."""
    from timm.data import ImageNetInfo

    return tuple(ImageNetInfo("imagenet-1k").label_names())


@dataclass(frozen=True)
class ImageList:
    """Files and their class indices.

    Attributes:
        root: the folder.
        paths: image files, sorted.
        labels: class index of each file.
        classes: class name of each index present (synset or sub-folder name).
        layout: ``imagefolder``, ``flat-synset`` or ``synthetic`` (vitq's generated images, stored
            at the model's input size: fed as they are, without resize or crop).
    """

    root: Path
    paths: Tuple[Path, ...]
    labels: Tuple[int, ...]
    classes: Dict[int, str]
    layout: str

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: Sequence[int]) -> "ImageList":
        return ImageList(
            self.root,
            tuple(self.paths[i] for i in indices),
            tuple(self.labels[i] for i in indices),
            self.classes,
            self.layout,
        )


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES


def _class_indices(names: Sequence[str]) -> Dict[str, int]:
    """ImageNet-1k order when every name is an ImageNet-1k synset, else sorted-name order."""
    synsets = imagenet_synsets()
    if all(n in synsets for n in names):
        position = {s: i for i, s in enumerate(synsets)}
        return {n: position[n] for n in names}
    return {n: i for i, n in enumerate(sorted(names))}


def scan_folder(root: str | Path, labelled: bool = True) -> ImageList:
    """List the images of ``root`` with their labels.

    Two layouts: one sub-folder per class (class index = sorted folder name, or the ImageNet-1k
    index when the folders are ImageNet synsets), or a flat folder whose file names begin with an
    ImageNet synset id (``n01440764_tench.JPEG``). With ``labelled=False`` (calibration images of a
    dense model, whose class labels are not image-level) any flat folder of images is accepted, as
    layout ``unlabelled`` with every label -1.
    """
    root = Path(root).expanduser().resolve()  # absolute paths: subsets of one folder compare equal
    if not root.exists():
        raise VitqError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise VitqError(f"{root} is not a folder: pass a folder of images (one sub-folder per class)")
    try:
        entries = sorted(root.iterdir())
    except PermissionError:
        raise VitqError(f"data folder {root} cannot be read (permission denied)") from None
    subdirs = [d for d in entries if d.is_dir() and not d.name.startswith(".")]
    flat = [p for p in entries if _is_image(p)]
    if subdirs and not flat:
        per_class = {d.name: sorted(p for p in d.rglob("*") if _is_image(p)) for d in subdirs}
        per_class = {k: v for k, v in per_class.items() if v}
        if not per_class:
            raise VitqError(f"data folder {root} has sub-folders but no images ({', '.join(IMAGE_SUFFIXES)})")
        index = _class_indices(list(per_class))
        paths, labels = [], []
        for name, files in per_class.items():
            paths += files
            labels += [index[name]] * len(files)
        layout = "synthetic" if (root / SYNTHETIC_MARKER).is_file() else "imagefolder"
        return ImageList(root, tuple(paths), tuple(labels), {v: k for k, v in index.items()}, layout)
    if not flat:
        raise VitqError(f"data folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    synsets = [_SYNSET.match(p.name) for p in flat]
    bad = [p.name for p, m in zip(flat, synsets) if m is None]
    if bad and not labelled:
        return ImageList(root, tuple(flat), (-1,) * len(flat), {}, "unlabelled")
    if bad:
        raise VitqError(
            f"{root} is a flat folder, but {len(bad)} file name(s) do not begin with an ImageNet synset id "
            f"(e.g. {bad[0]!r}); name files like 'n01440764_tench.JPEG' or use one sub-folder per class"
        )
    names = [m.group(1) for m in synsets]
    index = _class_indices(sorted(set(names)))
    return ImageList(
        root, tuple(flat), tuple(index[n] for n in names), {v: k for k, v in index.items()}, "flat-synset"
    )


def balanced_subset(
    images: ImageList, n: Optional[int], seed: int, exclude: Sequence[Path] = (), what: str = "images"
) -> ImageList:
    """A seeded subset of ``n`` images (None: all), as even across classes as the folder allows.

    Classes are visited in a seeded random order, one image each per round, each class's images
    in a seeded random order. ``exclude`` removes files first (e.g. the calibration images from
    an evaluation set drawn from the same folder).
    """
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n <= 0):
        raise VitqError(f"the number of {what} must be a positive integer, got {n!r}")
    excluded = {Path(p).expanduser().resolve() for p in exclude}
    pool = [i for i, p in enumerate(images.paths) if p not in excluded]
    if not pool:
        raise VitqError(f"no {what} left in {images.root} once the calibration images are excluded")
    n = len(pool) if n is None else n
    if n > len(pool):
        extra = f" ({len(excluded)} excluded as calibration images)" if excluded else ""
        raise VitqError(f"asked for {n} {what} but {images.root} has only {len(pool)}{extra}; pass a smaller number")
    rng = random.Random(seed)
    by_class: Dict[int, List[int]] = {}
    for i in pool:
        by_class.setdefault(images.labels[i], []).append(i)
    order = sorted(by_class)
    rng.shuffle(order)
    for label in order:
        rng.shuffle(by_class[label])
    chosen: List[int] = []
    depth = 0
    while len(chosen) < n:
        for label in order:
            if depth < len(by_class[label]):
                chosen.append(by_class[label][depth])
                if len(chosen) == n:
                    break
        depth += 1
    return images.subset(sorted(chosen))


def build_transform(data_config: Dict[str, Any]):
    """timm's evaluation transform for a model's data config (resize, centre crop, normalise)."""
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    return create_transform(is_training=False, **{k: data_config[k] for k in keys if k in data_config})


class ImageDataset(Dataset):
    """Images of an :class:`ImageList`, converted to RGB and transformed for the model."""

    def __init__(self, images: ImageList, data_config: Dict[str, Any]) -> None:
        self.images = images
        if images.layout == "synthetic":
            from torchvision import transforms

            size = tuple(data_config["input_size"][1:])
            self.transform = transforms.Compose([
                transforms.Resize(size),  # a no-op for images generated for this model
                transforms.ToTensor(),
                transforms.Normalize(data_config["mean"], data_config["std"]),
            ])
        else:
            self.transform = build_transform(data_config)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        path = self.images.paths[i]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")  # greyscale, palette, CMYK and RGBA images become RGB
        except (UnidentifiedImageError, OSError) as err:
            raise VitqError(f"cannot read image {path}: {err}; remove or replace the file") from None
        return self.transform(img), self.images.labels[i]


#: images smaller than this on a side carry nothing a model can use once resized: refused as bad
MIN_IMAGE_SIDE = 8


def open_rgb(path: Path) -> Image.Image:
    """An image file as an RGB PIL image; refused by name when unreadable or smaller than
    :data:`MIN_IMAGE_SIDE` on a side."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except Exception as err:
        raise VitqError(f"cannot read image {path}: {err}; remove or replace the file") from None
    if min(img.size) < MIN_IMAGE_SIDE:
        raise VitqError(f"image {path} has only {img.size[0]}×{img.size[1]} pixels")
    return img


def find_bad_images(images: ImageList) -> List[Tuple[Path, str]]:
    """The files of ``images`` that cannot be read as images, or are tiny, each with the reason
    (PIL opens each and checks its integrity without decoding all of it)."""
    bad = []
    for path in images.paths:
        try:
            with Image.open(path) as img:
                size = img.size
                img.verify()
        except Exception as err:  # UnidentifiedImageError, OSError, SyntaxError (broken PNG chunks), ...
            bad.append((path, f"{type(err).__name__}: {err}"))
            continue
        if min(size) < MIN_IMAGE_SIDE:
            bad.append((path, f"only {size[0]}×{size[1]} pixels (fewer than {MIN_IMAGE_SIDE} on a side)"))
    return bad


def check_images(images: ImageList, what: str = "images", skip: bool = False) -> Tuple[ImageList, int]:
    """``images`` without unreadable files, before any work starts.

    Returns:
        The images to use and how many were skipped.

    Raises:
        VitqError: when some cannot be read and ``skip`` is False (naming them and the fix), or
            when none can.
    """
    bad = find_bad_images(images)
    if not bad:
        return images, 0
    listed = "; ".join(f"{p} ({why})" for p, why in bad[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
    if not skip:
        raise VitqError(f"{len(bad)} of the {len(images)} {what} cannot be used (unreadable or too small): "
                        f"{listed}. Remove or replace them, or pass --skip-bad-images to leave them out (they are "
                        "counted in the report)")
    bad_paths = {p for p, _ in bad}
    keep = [i for i, p in enumerate(images.paths) if p not in bad_paths]
    if not keep:
        raise VitqError(f"none of the {len(images)} {what} in {images.root} can be read: {listed}")
    return images.subset(keep), len(bad)


def make_loader(
    images: ImageList, data_config: Dict[str, Any], batch_size: int = 64, num_workers: int = 0
) -> DataLoader:
    """An ordered (unshuffled) loader of ``(images, labels)`` batches."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise VitqError(f"batch size must be a positive integer, got {batch_size!r}")
    return DataLoader(ImageDataset(images, data_config), batch_size=batch_size, shuffle=False, num_workers=num_workers)


def check_labels(images: ImageList, num_classes: int) -> None:
    """Refuse a folder whose class indices the model cannot output."""
    top = max(images.labels)
    if top >= num_classes:
        raise VitqError(
            f"{images.root} has class index {top} ({images.classes.get(top)!r}) but the model has "
            f"{num_classes} outputs: is this data set the one the model was trained on?"
        )


def load_images(
    folder: str | Path, num: Optional[int], seed: int, exclude: Sequence[Path] = (), what: str = "images"
) -> ImageList:
    """Scan ``folder`` and take a seeded, class-balanced subset of ``num`` images (all if None)."""
    images = scan_folder(folder)
    if num is None and not exclude:
        return images
    return balanced_subset(images, num, seed, exclude, what)
