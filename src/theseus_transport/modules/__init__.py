"""LightningModules: OpenCLIP image classifiers, linear probes and T5 text classifiers."""

from .base import EncoderClassifier
from .heads import (
    ClassSimilarity,
    NearDuplicateClassesWarning,
    closest_classes,
    warn_near_duplicate_classes,
    zeroshot_logits,
    zeroshot_weights,
)
from .image import HEADS, ImageClassifier, LinearProbe, load_openclip_model
from .schedule import warmup_cosine_factor, warmup_cosine_scheduler
from .task_vector import snapshot_state, task_vector_from, write_task_vector
from .text import TextClassifier, load_t5, mean_pool

__all__ = [
    "ClassSimilarity",
    "NearDuplicateClassesWarning",
    "closest_classes",
    "warn_near_duplicate_classes",
    "EncoderClassifier",
    "HEADS",
    "ImageClassifier",
    "LinearProbe",
    "TextClassifier",
    "load_openclip_model",
    "load_t5",
    "mean_pool",
    "snapshot_state",
    "task_vector_from",
    "warmup_cosine_factor",
    "warmup_cosine_scheduler",
    "write_task_vector",
    "zeroshot_logits",
    "zeroshot_weights",
]
