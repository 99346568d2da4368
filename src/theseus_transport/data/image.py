"""Image classification datamodule: OpenCLIP preprocessing, zero-shot prompts, paired calibration."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..arguments import init_arguments
from .base import TaskDataModule, resolve_task
from .preprocess import openclip_image_transform
from .registry import find_vision_task
from .sources import ZOO_PREFIX, class_names_from_features, find_image_column, find_label_column
from .templates import templates_for


def to_rgb_image(value: Any) -> Image.Image:
    """Return a PIL RGB image from a PIL image, an array, or a datasets {"bytes"/"path"} dict."""
    if isinstance(value, dict):
        value = datasets.Image().decode_example(value)
    if not isinstance(value, Image.Image):
        array = np.asarray(value)
        if array.dtype.kind == "f":
            # float arrays hold [0, 1] intensities (torchvision, matplotlib); PIL would clip them to 0 or 1
            array = np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)
        elif array.dtype.kind in "iu" and array.dtype.itemsize > 1:
            array = _to_8bit(array, 65535.0 if array.dtype.itemsize == 2 else float(max(array.max(), 1)))
        value = Image.fromarray(array)
    if value.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # PIL's convert("RGB") clips these to 0..255 instead of rescaling: 16-bit scans came out near binary
        array = np.asarray(value)
        scale = 1.0 if value.mode == "F" and float(array.max(initial=0.0)) <= 1.0 else (
            65535.0 if value.mode.startswith("I;16") or float(array.max(initial=0)) > 255 else 255.0)
        value = Image.fromarray(_to_8bit(array, scale))
    return value if value.mode == "RGB" else value.convert("RGB")


def _to_8bit(array: np.ndarray, full_scale: float) -> np.ndarray:
    """Rescale intensities whose full scale is `full_scale` to 0..255 bytes."""
    return np.clip(np.rint(array.astype(np.float64) * (255.0 / full_scale)), 0, 255).astype(np.uint8)


def _label(value: Any, label_map: dict[str, int] | None) -> int:
    """A row's class index: through `label_map` for string labels."""
    return int(label_map[value] if label_map is not None else value)


class ImageLabelDataset(Dataset):
    """(preprocessed image, label) pairs over one HF split."""

    def __init__(
        self, split: datasets.Dataset, image_column: str, label_column: str, transform: Callable,
        label_map: dict[str, int] | None = None,
    ) -> None:
        self.split, self.image_column, self.label_column, self.transform = split, image_column, label_column, transform
        self.label_map = label_map

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        row = self.split[int(index)]
        return self.transform(to_rgb_image(row[self.image_column])), _label(row[self.label_column], self.label_map)


class PairedImageDataset(Dataset):
    """The same example preprocessed by the source and by the target model's eval transform."""

    def __init__(
        self,
        split: datasets.Dataset,
        image_column: str,
        label_column: str,
        source_transform: Callable,
        target_transform: Callable,
        label_map: dict[str, int] | None = None,
    ) -> None:
        self.split, self.image_column, self.label_column = split, image_column, label_column
        self.source_transform, self.target_transform = source_transform, target_transform
        self.label_map = label_map

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.split[int(index)]
        image = to_rgb_image(row[self.image_column])
        return {
            "source": self.source_transform(image),
            "target": self.target_transform(image),
            "label": _label(row[self.label_column], self.label_map),
        }


class ImageClassificationDataModule(TaskDataModule):
    """Train / val / test / calibration data for one image task, preprocessed for an OpenCLIP model.

    ``dataset`` is a hub id (or a registry short name such as ``eurosat``), ``zoo:<task>`` for the
    offline world, or a folder written by ``save_to_disk``. Batches are ``(images, labels)``;
    calibration batches are ``{"source", "target", "label"}`` dicts of the same examples.
    """

    def __init__(
        self,
        dataset: str,
        dataset_config: str | None = None,
        model_name: str = "ViT-B-16",
        pretrained: str | None = None,
        source_model_name: str | None = None,
        source_pretrained: str | None = None,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        train_augment: bool = False,
        calibration_protocol: str = "batches",
        calibration_batches: int | None = None,
        calibration_batch_size: int = 32,
        calibration_shots: int | None = None,
        calibration_seed: int = 0,
        val_fraction: float = 0.1,
        seed: int = 0,
        split_seed: int = 0,
        train_limit: int | None = None,
        val_limit: int | None = None,
        test_limit: int | None = None,
        classnames: list[str] | None = None,
        templates: list[str] | None = None,
        cache_dir: str | None = None,
    ) -> None:
        spec, dataset, dataset_config = resolve_task(find_vision_task, dataset, dataset_config)
        # the signature above stays explicit because LightningCLI reads it; the base's share goes on by name
        super().__init__(**init_arguments(TaskDataModule, locals()))
        self.save_hyperparameters()
        self.spec = spec
        self.model_name, self.pretrained = model_name, pretrained
        self.source_model_name, self.source_pretrained = source_model_name, source_pretrained
        self.train_augment = train_augment
        self._classnames_override = list(classnames) if classnames is not None else None
        self._templates_override = list(templates) if templates is not None else None
        self.image_column: str | None = None

    # ----- names, prompts ----------------------------------------------------------------------------
    def _zoo_task(self) -> Any | None:
        if not self.dataset.startswith(ZOO_PREFIX):
            return None
        from ..zoo.world import TASKS  # lazy: only zoo datasets need the zoo

        return TASKS[self.task_name]

    @property
    def classnames(self) -> list[str]:
        """Class names in label order (override, zoo task, or the ClassLabel feature)."""
        if self._classnames_override is not None:
            return list(self._classnames_override)
        return super().classnames

    @property
    def templates(self) -> list[str]:
        """Zero-shot prompt templates: override, the zoo task's, or this task's CLIP-style list."""
        if self._templates_override is not None:
            return list(self._templates_override)
        zoo_task = self._zoo_task()
        if zoo_task is not None:
            return list(zoo_task.templates)
        return templates_for(self.task_name)

    # ----- splits ------------------------------------------------------------------------------------------
    def _on_splits_ready(self, splits: dict[str, datasets.Dataset]) -> None:
        features = splits["train"].features
        self.image_column = find_image_column(features)
        self.label_column = find_label_column(features)
        zoo_task = self._zoo_task()
        if zoo_task is not None:
            self._classnames = list(zoo_task.classnames)
        else:
            self._classnames = class_names_from_features(features, self.label_column)
        # string labels ("cat", "dog"): numbered by the classnames override when given, else sorted
        self.label_map = self._string_label_map(splits, self._classnames_override)
        if self.label_map is not None and self._classnames is None:
            self._classnames = list(self.label_map)

    # ----- transforms and datasets ---------------------------------------------------------------------
    def target_transform(self, train: bool = False) -> Callable:
        """The target model's preprocessing (train transform only when train_augment is set)."""
        return openclip_image_transform(self.model_name, self.pretrained, train=train and self.train_augment)

    def _wrap(self, split: str) -> Dataset:
        splits = self._ensure_splits()
        transform = self.target_transform(train=split == "train")
        return ImageLabelDataset(splits[split], self.image_column, self.label_column, transform, self.label_map)

    def _paired(
        self, split: datasets.Dataset, source_model_name: str | None, source_pretrained: str | None, **options: Any
    ) -> tuple[Dataset, None]:
        """Each example through the source and the target eval transform; the source defaults to the datamodule's."""
        source_model_name = source_model_name or self.source_model_name
        if source_pretrained is None and source_model_name == self.source_model_name:
            source_pretrained = self.source_pretrained
        if source_model_name is None:
            raise ValueError("calibration needs the source model: set source_model_name on the datamodule or pass it here")
        paired = PairedImageDataset(
            split,
            self.image_column,
            self.label_column,
            source_transform=openclip_image_transform(source_model_name, source_pretrained, train=False),
            target_transform=openclip_image_transform(self.model_name, self.pretrained, train=False),
            label_map=self.label_map,
        )
        return paired, None
