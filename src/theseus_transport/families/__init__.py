"""Model-family adapters and their registry: one file per family."""

from ..transport.errors import UnknownNameError
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
    "load_base_encoder",
    "load_t5_encoder",
    "register_family",
]


def load_base_encoder(family: str, model_name: str, pretrained: str | None = None, device: str = "cpu"):
    """Load the pretrained encoder that a family transports (OpenCLIP `visual`, T5 encoder)."""
    if family == "openclip":
        return load_openclip(model_name, pretrained, device=device)[0].visual
    if family == "t5":
        return load_t5_encoder(model_name if pretrained in (None, "") else pretrained, device=device)
    raise UnknownNameError(f"no loader for family {family!r}; known: ['openclip', 't5']")
