"""Model-family adapters and their registry: one file per family."""

from .base import Capture, FamilyAdapter, MAP_MODES, detect_family, get_family, known_families, register_family
from .generic import GenericLinearAdapter
from .openclip import OpenCLIPVisionAdapter, load_openclip
from .t5 import TINY_T5_CONFIGS, T5EncoderAdapter, load_t5_encoder

__all__ = [
    "Capture",
    "FamilyAdapter",
    "GenericLinearAdapter",
    "MAP_MODES",
    "OpenCLIPVisionAdapter",
    "T5EncoderAdapter",
    "TINY_T5_CONFIGS",
    "detect_family",
    "get_family",
    "known_families",
    "load_openclip",
    "load_t5_encoder",
    "register_family",
]
