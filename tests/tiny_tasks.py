"""Tiny offline tasks and task vectors shared by the Lightning tests (callbacks, compare, configs)."""

from __future__ import annotations

import os

import datasets

from theseus_transport.data import TextPairDataModule
from theseus_transport.families import load_t5_encoder
from theseus_transport.transport import save_task_vector
from twins import random_task_vector

T5_SOURCE, T5_TARGET = "t5-tiny-offline", "t5-tiny-offline-wide"


def text_raw() -> datasets.DatasetDict:
    """An easy in-memory premise/hypothesis task; every premise carries a unique case number."""

    def split(count: int, offset: int) -> datasets.Dataset:
        label = [index % 2 for index in range(count)]
        premise = [f"case {offset + index}: the sky is {'blue' if y else 'green'}" for index, y in enumerate(label)]
        hypothesis = ["yes yes yes" if y else "no no no" for y in label]
        features = datasets.Features(
            {
                "premise": datasets.Value("string"),
                "hypothesis": datasets.Value("string"),
                "label": datasets.ClassLabel(names=["entailment", "not_entailment"]),
            }
        )
        return datasets.Dataset.from_dict({"premise": premise, "hypothesis": hypothesis, "label": label}, features=features)

    return datasets.DatasetDict({"train": split(32, 0), "validation": split(16, 100), "test": split(8, 200)})


def text_data(**kwargs) -> TextPairDataModule:
    """The easy task as a datamodule (byte tokenizer, 64 tokens, batches of 8, calibration batches of 4)."""
    # 64 bytes hold every templated pair whole, so each example's case number is in its tokens
    settings = dict(name="toy-rte", tokenizer_name="byt5-offline", max_length=64, batch_size=8, calibration_batch_size=4)
    settings.update(kwargs)
    return TextPairDataModule.from_datasets(text_raw(), **settings)


def t5_task_vector(folder: str | os.PathLike, name: str = "t5-source") -> str:
    """A random update of every float key of the tiny source T5, saved with a sidecar naming the source."""
    source = load_t5_encoder(T5_SOURCE)
    vector = random_task_vector(source, lambda key: True, scale=0.05, seed=7)
    path = os.path.join(folder, f"{name}.safetensors")
    save_task_vector(path, vector, {"family": "t5", "model": T5_SOURCE, "task": "toy-rte"})
    return path
