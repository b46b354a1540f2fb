"""Unit tests of vitq.data.folder: folder layouts, seeded balanced subsets, the dataset, label checks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import IMG, write_images
from vitq.data.folder import ImageDataset, balanced_subset, check_labels, scan_folder
from vitq.errors import VitqError

DATA_CONFIG = {"input_size": (3, IMG, IMG), "interpolation": "bilinear", "crop_pct": 1.0,
               "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}


def write_flat(root: Path, names) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(root / name)
    return root


# -- scan_folder ----------------------------------------------------------------------------------
def test_scan_imagefolder_labels_in_sorted_folder_order(tmp_path):
    root = write_images(tmp_path / "imgs", per_class=2, classes=("zebra", "ant", "moth", "cat"))
    images = scan_folder(root)
    assert images.layout == "imagefolder"
    assert len(images) == 8
    assert images.classes == {0: "ant", 1: "cat", 2: "moth", 3: "zebra"}
    for path, label in zip(images.paths, images.labels):
        assert images.classes[label] == path.parent.name
    assert sorted(images.labels) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_scan_flat_synset_folder_uses_imagenet_indices(tmp_path):
    root = write_flat(tmp_path / "flat", [
        "n01443537_goldfish.png", "n01440764_tench.png", "n15075141_toilet_tissue.png", "n01440764_2.png",
    ])
    images = scan_folder(root)
    assert images.layout == "flat-synset"
    by_name = {p.name: label for p, label in zip(images.paths, images.labels)}
    assert by_name == {
        "n01440764_tench.png": 0,
        "n01440764_2.png": 0,
        "n01443537_goldfish.png": 1,
        "n15075141_toilet_tissue.png": 999,
    }
    assert images.classes == {0: "n01440764", 1: "n01443537", 999: "n15075141"}


def test_scan_flat_folder_with_non_synset_name(tmp_path):
    root = write_flat(tmp_path / "flat", ["n01440764_tench.png", "holiday_photo.png"])
    with pytest.raises(VitqError, match="holiday_photo.png"):
        scan_folder(root)


def test_scan_missing_and_empty_folders(tmp_path):
    with pytest.raises(VitqError, match="does not exist"):
        scan_folder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VitqError, match="no images"):
        scan_folder(tmp_path / "empty")


# -- balanced_subset ------------------------------------------------------------------------------
@pytest.fixture
def folder20(tmp_path):
    """4 classes × 5 images."""
    return scan_folder(write_images(tmp_path / "imgs", per_class=5, size=8))


def test_balanced_subset_is_deterministic(folder20):
    a = balanced_subset(folder20, 8, seed=3)
    b = balanced_subset(folder20, 8, seed=3)
    assert a.paths == b.paths and a.labels == b.labels


def test_balanced_subset_differs_across_seeds(folder20):
    subsets = {balanced_subset(folder20, 8, seed=s).paths for s in range(5)}
    assert len(subsets) > 1
    assert balanced_subset(folder20, 8, seed=0).paths != balanced_subset(folder20, 8, seed=1).paths


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_balanced_subset_is_class_balanced(folder20, seed):
    subset = balanced_subset(folder20, 8, seed=seed)
    assert len(subset) == 8
    assert sorted(subset.labels.count(c) for c in range(4)) == [2, 2, 2, 2]
    assert set(subset.paths) <= set(folder20.paths)
    assert len(set(subset.paths)) == 8
    for path, label in zip(subset.paths, subset.labels):
        assert folder20.labels[folder20.paths.index(path)] == label


def test_balanced_subset_uneven_remainder(folder20):
    subset = balanced_subset(folder20, 6, seed=0)
    assert sorted(subset.labels.count(c) for c in range(4)) == [1, 1, 2, 2]


def test_balanced_subset_none_takes_all(folder20):
    assert set(balanced_subset(folder20, None, seed=0).paths) == set(folder20.paths)


def test_balanced_subset_honours_exclude(folder20):
    calib = balanced_subset(folder20, 8, seed=0)
    rest = balanced_subset(folder20, None, seed=0, exclude=calib.paths)
    assert len(rest) == 12
    assert not set(rest.paths) & set(calib.paths)
    some = balanced_subset(folder20, 12, seed=5, exclude=calib.paths)
    assert not set(some.paths) & set(calib.paths)
    with pytest.raises(VitqError, match="excluded"):
        balanced_subset(folder20, 13, seed=0, exclude=calib.paths)


@pytest.mark.parametrize("n", [21, 0, -1])
def test_balanced_subset_bad_sizes(folder20, n):
    with pytest.raises(VitqError):
        balanced_subset(folder20, n, seed=0)


# -- ImageDataset ---------------------------------------------------------------------------------
def test_image_dataset_greyscale_to_normalised_rgb_tensor(tmp_path):
    root = tmp_path / "grey" / "white"
    root.mkdir(parents=True)
    Image.fromarray(np.full((20, 20), 255, dtype=np.uint8), mode="L").save(root / "a.png")
    Image.fromarray(np.zeros((50, 40), dtype=np.uint8), mode="L").save(root / "b.png")
    dataset = ImageDataset(scan_folder(tmp_path / "grey"), DATA_CONFIG)
    assert len(dataset) == 2
    white, label = dataset[0]
    black, _ = dataset[1]
    assert label == 0
    assert isinstance(white, torch.Tensor) and white.dtype == torch.float32
    assert white.shape == black.shape == (3, IMG, IMG)
    torch.testing.assert_close(white, torch.full((3, IMG, IMG), 2.0))  # (1 - 0.5) / 0.25
    torch.testing.assert_close(black, torch.full((3, IMG, IMG), -2.0))  # (0 - 0.5) / 0.25


def test_image_dataset_corrupt_file(tmp_path):
    root = write_images(tmp_path / "imgs", per_class=1, classes=("a",), size=8)
    (root / "a" / "000.png").write_bytes(b"not a png at all")
    dataset = ImageDataset(scan_folder(root), DATA_CONFIG)
    with pytest.raises(VitqError, match="cannot read image"):
        dataset[0]


# -- check_labels ---------------------------------------------------------------------------------
def test_check_labels(tmp_path):
    images = scan_folder(write_images(tmp_path / "imgs", per_class=1, size=8))  # 4 classes
    check_labels(images, 4)
    check_labels(images, 1000)
    with pytest.raises(VitqError, match="3 outputs"):
        check_labels(images, 3)
