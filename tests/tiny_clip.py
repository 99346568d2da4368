"""Tiny OpenCLIP configs and in-memory image tasks shared by the data and module tests."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import datasets
import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

TEXT_CFG = {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread; on a busy 2-core machine OpenMP spinning costs 100x."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def register_tiny_openclip(folder: Path, models: dict[str, tuple[int, int]]) -> None:
    """Write and register tiny two-layer OpenCLIP configs, ``{name: (image_size, width)}`` (random weights)."""
    for name, (image_size, width) in models.items():
        config = {
            "embed_dim": 16,
            "vision_cfg": {"image_size": image_size, "layers": 2, "width": width, "patch_size": 8, "head_width": 8},
            "text_cfg": TEXT_CFG,
        }
        (folder / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)


def image_split(
    count: int,
    seed: int,
    classnames: list[str],
    draw: Callable[[np.random.Generator, int], np.ndarray],
    image_column: str = "image",
    label_column: str = "label",
) -> datasets.Dataset:
    """A labelled image split: example i has label i % len(classnames) and the uint8 pixels ``draw(rng, label)``."""
    rng = np.random.default_rng(seed)
    labels = [index % len(classnames) for index in range(count)]
    images = [Image.fromarray(draw(rng, label)) for label in labels]
    features = datasets.Features({image_column: datasets.Image(), label_column: datasets.ClassLabel(names=classnames)})
    return datasets.Dataset.from_dict({image_column: images, label_column: labels}, features=features)
