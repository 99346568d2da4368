"""Offline premise/hypothesis tasks (``toy:<task>``) for the tiny T5 configs: no download, fully seeded."""

from __future__ import annotations

import datasets
import numpy as np

from ..transport.errors import UnknownNameError

COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
OBJECTS = ("circle", "square", "triangle", "star", "cross", "ring")
TOY_SPLIT_SIZES = {"train": 2048, "validation": 256, "test": 512, "calibration": 256}


def _objects_example(rng: np.random.Generator) -> dict[str, object]:
    """A scene of 2-3 coloured objects; does the hypothesis name one of them (entailment) or not."""
    count = int(rng.integers(2, 4))
    scene = {(COLORS[int(rng.integers(len(COLORS)))], OBJECTS[int(rng.integers(len(OBJECTS)))]) for _ in range(count)}
    listed = sorted(scene)
    rng.shuffle(listed)
    # short texts: the tiny T5 models read bytes, so every character is a token
    premise = ", ".join(f"{color} {thing}" for color, thing in listed)
    label = int(rng.integers(2))
    if label == 0:
        color, thing = listed[int(rng.integers(len(listed)))]
    else:
        # a near miss: usually the right object in the wrong colour, so word overlap alone cannot decide
        while True:
            color, thing = COLORS[int(rng.integers(len(COLORS)))], listed[int(rng.integers(len(listed)))][1]
            if rng.random() < 0.3:
                thing = OBJECTS[int(rng.integers(len(OBJECTS)))]
            if (color, thing) not in scene:
                break
    return {"premise": premise, "hypothesis": f"{color} {thing}", "label": label}


TOY_TASKS = {"objects": ("entailment", "not_entailment")}


def load_toy_task(task: str, seed: int = 0) -> datasets.DatasetDict:
    """Build ``toy:<task>`` (train / validation / test / calibration splits, distinct seeds per split)."""
    if task not in TOY_TASKS:
        raise UnknownNameError(f"unknown toy task {task!r}; known: {sorted(TOY_TASKS)}")
    features = datasets.Features(
        {
            "premise": datasets.Value("string"),
            "hypothesis": datasets.Value("string"),
            "label": datasets.ClassLabel(names=list(TOY_TASKS[task])),
        }
    )
    splits = {}
    for index, (split, size) in enumerate(TOY_SPLIT_SIZES.items()):
        rng = np.random.default_rng([seed, index])
        rows = [_objects_example(rng) for _ in range(size)]
        columns = {key: [row[key] for row in rows] for key in features}
        splits[split] = datasets.Dataset.from_dict(columns, features=features)
    return datasets.DatasetDict(splits)
