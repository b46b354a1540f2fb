"""Run folders and reports (DESIGN layer 9)."""
from .markdown import run_report
from .plots import bits_per_layer, detection_examples, pareto, search_curve, segmentation_examples
from .run_folder import RunFolder

__all__ = ["RunFolder", "bits_per_layer", "detection_examples", "pareto", "run_report", "search_curve",
           "segmentation_examples"]
