"""Refiners and the calibration lifecycle (DESIGN layer 7)."""
from .lifecycle import calibrate, check_bits, convert, is_prepared, prepare
from .plan import Plan, apply_plan, plan_from_model
from .stages import STAGES, Stage, StageContext, StageSettings
from .search import FITNESS, MUTATIONS, Evolution, SearchSettings, SearchStage  # registers the "search" stage

__all__ = [
    "FITNESS", "MUTATIONS", "STAGES", "Evolution", "Plan", "SearchSettings", "SearchStage", "Stage", "StageContext",
    "StageSettings", "apply_plan", "calibrate", "check_bits", "convert", "is_prepared", "plan_from_model", "prepare",
]
