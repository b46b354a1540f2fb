"""Image sources (DESIGN layer 6)."""
from .assets import assets_dir
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
from .detection import (DetectionSet, check_detection_images, detection_calibration_loader, detection_loader,
                        scan_detection)
from .segmentation import SegmentationSet, scan_segmentation, segmentation_loader

__all__ = [
    "assets_dir",
    "DetectionSet",
    "check_detection_images",
    "detection_calibration_loader",
    "detection_loader",
    "scan_detection",
    "ImageDataset",
    "ImageList",
    "balanced_subset",
    "build_transform",
    "check_labels",
    "load_images",
    "make_loader",
    "scan_folder",
    "SegmentationSet",
    "scan_segmentation",
    "segmentation_loader",
]
