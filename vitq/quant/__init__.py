"""The quantization core (DESIGN layers 1-3): primitives, observers, quantizers, protocols."""
from .observers import OBSERVERS, Observer, ObserverConfig, create_observer
from .protocol import PROTOCOLS, ROLES, Protocol, get_protocol
from .quantizer import Quantizer
from .spec import QuantSpec

__all__ = [
    "OBSERVERS",
    "Observer",
    "ObserverConfig",
    "PROTOCOLS",
    "Protocol",
    "QuantSpec",
    "Quantizer",
    "ROLES",
    "create_observer",
    "get_protocol",
]
