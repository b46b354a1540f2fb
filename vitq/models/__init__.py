"""Model families (DESIGN layer 5): adapters, loading, and the reference segmentation model."""
from .adapters import ADAPTERS, BackboneAdapter, ModelAdapter, NormLinearPair, find_adapter, find_backbones, iter_quantizers
from .detection import TransformerFeatures, build_detector
from .loading import LoadedModel, load_model
from .segmentation import ViTSegmenter, resize_vit_grid

__all__ = ["ADAPTERS", "BackboneAdapter", "LoadedModel", "ModelAdapter", "NormLinearPair", "TransformerFeatures",
           "ViTSegmenter", "build_detector", "find_adapter", "find_backbones", "iter_quantizers", "load_model",
           "resize_vit_grid"]
