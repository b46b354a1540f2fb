"""Model families (DESIGN layer 5): adapters and loading."""
from .adapters import ADAPTERS, ModelAdapter, NormLinearPair, find_adapter, iter_quantizers
from .loading import LoadedModel, load_model

__all__ = ["ADAPTERS", "LoadedModel", "ModelAdapter", "NormLinearPair", "find_adapter", "iter_quantizers", "load_model"]
