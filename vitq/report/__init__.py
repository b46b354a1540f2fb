"""Run folders and reports (DESIGN layer 9)."""
from .markdown import run_report
from .run_folder import RunFolder

__all__ = ["RunFolder", "run_report"]
