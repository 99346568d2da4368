"""Datamodules, calibration protocols and the registry of the paper's datasets."""

from .base import TaskDataModule
from .calibration import CALIBRATION_PROTOCOLS, sample_k_batches, sample_k_shots
from .image import ImageClassificationDataModule, ImageLabelDataset, PairedImageDataset
from .preprocess import image_size_of, openclip_image_transform, openclip_preprocess_cfg
from .registry import TEXT_TASKS, VISION_TASKS, TextPairTaskSpec, VisionTaskSpec, find_text_task, find_vision_task
from .sources import load_dataset_dict
from .templates import GENERIC_TEMPLATES, TASK_TEMPLATES, templates_for
from .text import TextPairDataModule
from .tokenizers import OFFLINE_BYTE_TOKENIZER, load_tokenizer

__all__ = [
    "CALIBRATION_PROTOCOLS",
    "GENERIC_TEMPLATES",
    "ImageClassificationDataModule",
    "ImageLabelDataset",
    "OFFLINE_BYTE_TOKENIZER",
    "PairedImageDataset",
    "TASK_TEMPLATES",
    "TEXT_TASKS",
    "TaskDataModule",
    "TextPairDataModule",
    "TextPairTaskSpec",
    "VISION_TASKS",
    "VisionTaskSpec",
    "find_text_task",
    "find_vision_task",
    "image_size_of",
    "load_dataset_dict",
    "load_tokenizer",
    "openclip_image_transform",
    "openclip_preprocess_cfg",
    "sample_k_batches",
    "sample_k_shots",
    "templates_for",
]
