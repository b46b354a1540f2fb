"""Data-free calibration images (DESIGN layer 6): gaussian, psaq, clamp."""
from .generators import (
    GENERATORS,
    GaussianGenerator,
    GenerationDiverged,
    GenerationResult,
    Generator,
    GeneratorSettings,
    PatchContrastiveGenerator,
    PatchSimilarityGenerator,
    create_generator,
    make_refresher,
)

__all__ = [
    "GENERATORS",
    "GaussianGenerator",
    "GenerationDiverged",
    "GenerationResult",
    "Generator",
    "GeneratorSettings",
    "PatchContrastiveGenerator",
    "PatchSimilarityGenerator",
    "create_generator",
    "make_refresher",
]
