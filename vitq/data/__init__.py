"""Image sources (DESIGN layer 6)."""
from .folder import (
    ImageDataset,
    ImageList,
    balanced_subset,
    build_transform,
    check_labels,
    load_images,
    make_loader,
    scan_folder,
)

__all__ = [
    "ImageDataset",
    "ImageList",
    "balanced_subset",
    "build_transform",
    "check_labels",
    "load_images",
    "make_loader",
    "scan_folder",
]
