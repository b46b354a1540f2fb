"""Refiners and the calibration lifecycle (DESIGN layer 7)."""
from .lifecycle import calibrate, check_bits, convert, is_prepared, prepare
from .plan import Plan, apply_plan, plan_from_model

__all__ = ["Plan", "apply_plan", "calibrate", "check_bits", "convert", "is_prepared", "plan_from_model", "prepare"]
