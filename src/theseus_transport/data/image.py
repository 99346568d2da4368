"""Image classification datamodule: OpenCLIP preprocessing, zero-shot prompts, paired calibration."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .base import TaskDataModule
from .preprocess import openclip_image_transform
from .registry import find_vision_task
from .sources import ZOO_PREFIX, class_names_from_features, find_image_column, find_label_column
from .templates import templates_for


def to_rgb_image(value: Any) -> Image.Image:
    """Return a PIL RGB image from a PIL image, an array, or a datasets {"bytes"/"path"} dict."""
    if isinstance(value, dict):
        value = datasets.Image().decode_example(value)
    if not isinstance(value, Image.Image):
        value = Image.fromarray(np.asarray(value))
    return value if value.mode == "RGB" else value.convert("RGB")


class ImageLabelDataset(Dataset):
    """(preprocessed image, label) pairs over one HF split."""

    def __init__(self, split: datasets.Dataset, image_column: str, label_column: str, transform: Callable) -> None:
        self.split, self.image_column, self.label_column, self.transform = split, image_column, label_column, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        row = self.split[int(index)]
        return self.transform(to_rgb_image(row[self.image_column])), int(row[self.label_column])


class PairedImageDataset(Dataset):
    """The same example preprocessed by the source and by the target model's eval transform."""

    def __init__(
        self,
        split: datasets.Dataset,
        image_column: str,
        label_column: str,
        source_transform: Callable,
        target_transform: Callable,
    ) -> None:
        self.split, self.image_column, self.label_column = split, image_column, label_column
        self.source_transform, self.target_transform = source_transform, target_transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.split[int(index)]
        image = to_rgb_image(row[self.image_column])
        return {
            "source": self.source_transform(image),
            "target": self.target_transform(image),
            "label": int(row[self.label_column]),
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
        calibration_batches: int = 1,
        calibration_batch_size: int = 32,
        calibration_shots: int = 4,
        calibration_seed: int = 0,
        val_fraction: float = 0.1,
        seed: int = 0,
        train_limit: int | None = None,
        val_limit: int | None = None,
        test_limit: int | None = None,
        classnames: list[str] | None = None,
        templates: list[str] | None = None,
        cache_dir: str | None = None,
    ) -> None:
        spec = find_vision_task(dataset, dataset_config)
        if spec is not None:  # a short name resolves to its hub id and config
            dataset, dataset_config = spec.hub_id, spec.config
        super().__init__(
            dataset=dataset,
            dataset_config=dataset_config,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            calibration_protocol=calibration_protocol,
            calibration_batches=calibration_batches,
            calibration_batch_size=calibration_batch_size,
            calibration_shots=calibration_shots,
            calibration_seed=calibration_seed,
            val_fraction=val_fraction,
            seed=seed,
            train_limit=train_limit,
            val_limit=val_limit,
            test_limit=test_limit,
            cache_dir=cache_dir,
        )
        self.save_hyperparameters()
        self.spec = spec
        self.model_name, self.pretrained = model_name, pretrained
        self.source_model_name, self.source_pretrained = source_model_name, source_pretrained
        self.train_augment = train_augment
        self._classnames_override = list(classnames) if classnames is not None else None
        self._templates_override = list(templates) if templates is not None else None
        self.image_column: str | None = None
        self.label_column: str | None = None
        self._classnames: list[str] | None = None

    # ----- names, prompts ----------------------------------------------------------------------------
    @property
    def task_name(self) -> str:
        """Registry short name for known hub datasets, else the zoo task / folder / id tail."""
        return self.spec.name if self.spec is not None else super().task_name

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
        self._ensure_splits()
        if self._classnames is None:
            raise ValueError(f"{self.dataset!r} has no ClassLabel names; pass classnames=[...] to the datamodule")
        return list(self._classnames)

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classnames)

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
    def _split_names(self) -> dict[str, str | None]:
        if self.spec is None:
            return {}
        return {"train_split": self.spec.train_split, "val_split": self.spec.val_split, "test_split": self.spec.test_split}

    def _on_splits_ready(self, splits: dict[str, datasets.Dataset]) -> None:
        features = splits["train"].features
        self.image_column = find_image_column(features)
        self.label_column = find_label_column(features)
        zoo_task = self._zoo_task()
        if zoo_task is not None:
            self._classnames = list(zoo_task.classnames)
        else:
            self._classnames = class_names_from_features(features, self.label_column)

    def _labels(self, dataset: datasets.Dataset) -> list[int]:
        return [int(label) for label in dataset[self.label_column]]

    # ----- transforms and datasets ---------------------------------------------------------------------
    def target_transform(self, train: bool = False) -> Callable:
        """The target model's preprocessing (train transform only when train_augment is set)."""
        return openclip_image_transform(self.model_name, self.pretrained, train=train and self.train_augment)

    def _wrap(self, split: str) -> Dataset:
        splits = self._ensure_splits()
        transform = self.target_transform(train=split == "train")
        return ImageLabelDataset(splits[split], self.image_column, self.label_column, transform)

    def _paired(self, split: datasets.Dataset, source_model_name: str | None, source_pretrained: str | None) -> Dataset:
        source_model_name = source_model_name or self.source_model_name
        if source_pretrained is None and source_model_name == self.source_model_name:
            source_pretrained = self.source_pretrained
        if source_model_name is None:
            raise ValueError("calibration needs the source model: set source_model_name on the datamodule or pass it here")
        return PairedImageDataset(
            split,
            self.image_column,
            self.label_column,
            source_transform=openclip_image_transform(source_model_name, source_pretrained, train=False),
            target_transform=openclip_image_transform(self.model_name, self.pretrained, train=False),
        )

    def calibration_dataloader(
        self,
        source_model_name: str | None = None,
        source_pretrained: str | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> DataLoader:
        """Paired calibration batches ``{"source", "target", "label"}``: same examples, each model's eval transform.

        The source model defaults to the datamodule's ``source_model_name``; a callback that knows
        the source model can pass it here instead. ``rank``/``world_size`` shard the batches.
        """
        self._ensure_splits()
        paired = self._paired(self.calibration_split(), source_model_name, source_pretrained)
        return self._calibration_loader(paired, rank, world_size)

    def held_out_dataloader(
        self,
        source_model_name: str | None = None,
        source_pretrained: str | None = None,
        batches: int = 1,
        rank: int = 0,
        world_size: int = 1,
    ) -> DataLoader:
        """Paired batches like calibration, drawn from the validation split (for the activation-cosine report)."""
        self._ensure_splits()
        paired = self._paired(self.held_out_split(), source_model_name, source_pretrained)
        return self._calibration_loader(paired, rank, world_size, batch_sampler=self.held_out_batches_for(batches, rank, world_size))
