"""Refiners and the calibration lifecycle (DESIGN layer 7)."""
from .lifecycle import calibrate, check_bits, convert, is_prepared, prepare
from .plan import Plan, apply_plan, plan_from_model
from .stages import STAGES, Stage, StageContext, StageSettings
from .search import FITNESS, MUTATIONS, Evolution, SearchSettings, SearchStage  # registers the "search" stage
from .smooth import SmoothSettings, SmoothStage, fold_smoothing, smoothing_of  # registers "smooth"
from .gptq import GPTQSettings, GPTQStage  # registers "gptq"
from .bias_correct import BiasCorrectSettings, BiasCorrectStage  # registers "bias_correct"
from .reconstruct import ReconstructSettings, ReconstructStage  # registers "reconstruct"
from .reparam import ReparamSettings, ReparamStage  # registers "reparam"
from .attn_reparam import AttnReparamSettings, AttnReparamStage  # registers "attn_reparam"
from .opt_m import OptMSettings, OptMStage  # registers "opt_m"
from .mixed import GreedyMPSettings, GreedyMPStage, parse_budget  # registers "greedy_mp"
from .prefix_rows import PrefixRowsSettings, PrefixRowsStage  # registers "prefix_rows"
from .recalibrate import RecalibrateSettings, RecalibrateStage  # registers "recalibrate"

__all__ = [
    "AttnReparamSettings", "AttnReparamStage", "BiasCorrectSettings", "BiasCorrectStage", "Evolution", "FITNESS", "GPTQSettings", "GPTQStage", "GreedyMPSettings", "GreedyMPStage", "MUTATIONS",
    "OptMSettings", "OptMStage", "Plan", "PrefixRowsSettings", "PrefixRowsStage", "RecalibrateSettings", "RecalibrateStage", "ReconstructSettings", "ReconstructStage", "ReparamSettings", "ReparamStage", "STAGES", "SearchSettings",
    "SearchStage", "SmoothSettings", "SmoothStage", "Stage", "StageContext", "StageSettings", "apply_plan",
    "calibrate", "check_bits", "convert", "fold_smoothing", "is_prepared", "parse_budget", "plan_from_model",
    "prepare", "smoothing_of",
]
