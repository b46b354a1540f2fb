"""Run folders and reports (DESIGN layer 9)."""
from .markdown import run_report
from .plots import search_curve
from .run_folder import RunFolder

__all__ = ["RunFolder", "run_report", "search_curve"]
