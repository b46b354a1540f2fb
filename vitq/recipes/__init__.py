"""Recipes (DESIGN layer 8)."""
from ..quant.observers import ObserverConfig
from .recipe import RECIPES, Recipe, load_recipe

__all__ = ["RECIPES", "ObserverConfig", "Recipe", "load_recipe"]
