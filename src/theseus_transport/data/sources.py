"""Where datasets come from (hub id, offline zoo task, local save_to_disk folder) and their columns."""

from __future__ import annotations

import os
from pathlib import Path

import datasets

from ..transport.errors import DataLayoutError, OfflineError

ZOO_PREFIX = "zoo:"
TOY_PREFIX = "toy:"  # offline text-pair tasks, see data/toy.py
IMAGE_COLUMN_NAMES = ("image", "img", "png", "jpg", "pixel_values")
LABEL_COLUMN_NAMES = ("label", "labels", "fine_label", "target", "class")


def _offline_mode() -> bool:
    flags = (os.environ.get("HF_DATASETS_OFFLINE", ""), os.environ.get("HF_HUB_OFFLINE", ""))
    return any(flag.strip().lower() in ("1", "true", "yes", "on") for flag in flags)


def offline_dataset_message(dataset: str, config: str | None) -> str:
    """Explain how to make a hub dataset available to a machine without network access."""
    call = f"datasets.load_dataset({dataset!r}" + (f", {config!r})" if config else ")")
    return (
        f"dataset {dataset!r}" + (f" (config {config!r})" if config else "") + " is not in the local cache and "
        f"the hub cannot be reached. On a machine with network run `python -c \"import datasets; {call}\"` "
        "and copy its cache (~/.cache/huggingface/datasets) here, pointing HF_DATASETS_CACHE at it; or save the "
        "dataset with `save_to_disk` and pass that folder as the dataset."
    )


def load_hub_dataset(dataset: str, config: str | None = None, cache_dir: str | None = None) -> datasets.DatasetDict:
    """Load a hub dataset, turning "cannot reach the hub" into OfflineError naming the id."""
    try:
        loaded = datasets.load_dataset(dataset, config, cache_dir=cache_dir)
    except ConnectionError as error:
        raise OfflineError(offline_dataset_message(dataset, config)) from error
    except OSError as error:
        # offline, a missing cache surfaces as FileNotFoundError-like errors rather than ConnectionError
        if _offline_mode():
            raise OfflineError(offline_dataset_message(dataset, config)) from error
        raise
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    return loaded


def load_zoo_task(task: str, cache_dir: str | None = None) -> datasets.DatasetDict:
    """Load one task of the offline procedural world (built and cached by theseus_transport.zoo)."""
    from ..zoo.world import load_task  # lazy: the zoo is optional for hub and local datasets

    return load_task(task, cache_dir=cache_dir)


def load_dataset_dict(dataset: str, config: str | None = None, cache_dir: str | None = None) -> datasets.DatasetDict:
    """Load ``zoo:<task>``, ``toy:<task>`` (offline text pairs), a ``save_to_disk`` folder, or a hub id."""
    if dataset.startswith(ZOO_PREFIX):
        return load_zoo_task(dataset[len(ZOO_PREFIX) :], cache_dir=cache_dir)
    if dataset.startswith(TOY_PREFIX):
        from .toy import load_toy_task

        return load_toy_task(dataset[len(TOY_PREFIX) :])
    path = Path(dataset).expanduser()
    if path.exists():
        loaded = datasets.load_from_disk(str(path))
        return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})
    return load_hub_dataset(dataset, config, cache_dir=cache_dir)


def find_image_column(features: datasets.Features) -> str:
    """Return the name of the image column: the first Image feature, else a conventional name."""
    for name, feature in features.items():
        if isinstance(feature, datasets.Image):
            return name
    for name in IMAGE_COLUMN_NAMES:
        if name in features:
            return name
    raise DataLayoutError(f"no image column among {list(features)}; expected an Image feature or one of {IMAGE_COLUMN_NAMES}")


def find_label_column(features: datasets.Features) -> str:
    """Return the name of the label column: a ClassLabel feature (a conventional name first), else a conventional name."""
    class_labels = [name for name, feature in features.items() if isinstance(feature, datasets.ClassLabel)]
    # a dataset may carry other ClassLabel columns (a domain or split id) before its labels
    for name in LABEL_COLUMN_NAMES:
        if name in class_labels:
            return name
    if class_labels:
        return class_labels[0]
    for name in LABEL_COLUMN_NAMES:
        if name in features:
            return name
    raise DataLayoutError(f"no label column among {list(features)}; expected a ClassLabel or one of {LABEL_COLUMN_NAMES}")


def class_names_from_features(features: datasets.Features, label_column: str) -> list[str] | None:
    """Return readable class names from a ClassLabel column (underscores become spaces), else None."""
    feature = features[label_column]
    if not isinstance(feature, datasets.ClassLabel):
        return None
    return [name.replace("_", " ").strip() for name in feature.names]
