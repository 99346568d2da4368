"""The paper's real datasets: hub ids, configs, splits and column names (data, not code)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VisionTaskSpec:
    """One image-classification task on the Hugging Face hub."""

    name: str
    hub_id: str
    config: str | None = None
    train_split: str = "train"
    val_split: str | None = None  # None: a seeded val_fraction of train becomes validation
    test_split: str = "test"


@dataclass(frozen=True)
class TextPairTaskSpec:
    """One premise/hypothesis classification task on the Hugging Face hub."""

    name: str
    hub_id: str
    config: str | None
    first_column: str
    second_column: str
    label_column: str = "label"
    train_split: str = "train"
    val_split: str | None = None
    test_split: str = "test"
    label_names: tuple[str, ...] | None = None  # for string label columns (SciTail)


VISION_TASKS: dict[str, VisionTaskSpec] = {
    spec.name: spec
    for spec in (
        VisionTaskSpec("sun397", "tanganke/sun397"),
        VisionTaskSpec("stanford_cars", "tanganke/stanford_cars"),
        VisionTaskSpec("resisc45", "tanganke/resisc45"),
        VisionTaskSpec("eurosat", "tanganke/eurosat"),
        VisionTaskSpec("gtsrb", "tanganke/gtsrb"),
        VisionTaskSpec("dtd", "tanganke/dtd"),
        VisionTaskSpec("svhn", "ufldl-stanford/svhn", config="cropped_digits"),
        VisionTaskSpec("mnist", "ylecun/mnist"),
    )
}

# GLUE hides its test labels, so GLUE tasks test on the public validation split (matched for MNLI)
# and carve their validation split from train, as the reference implementation does.
TEXT_TASKS: dict[str, TextPairTaskSpec] = {
    spec.name: spec
    for spec in (
        TextPairTaskSpec("mnli", "nyu-mll/glue", "mnli", "premise", "hypothesis", test_split="validation_matched"),
        TextPairTaskSpec("qnli", "nyu-mll/glue", "qnli", "question", "sentence", test_split="validation"),
        TextPairTaskSpec("rte", "nyu-mll/glue", "rte", "sentence1", "sentence2", test_split="validation"),
        TextPairTaskSpec("snli", "stanfordnlp/snli", None, "premise", "hypothesis", val_split="validation"),
        TextPairTaskSpec(
            "scitail",
            "allenai/scitail",
            "tsv_format",
            "premise",
            "hypothesis",
            val_split="validation",
            label_names=("entails", "neutral"),
        ),
    )
}

_LEGACY_IDS = {"glue": "nyu-mll/glue", "snli": "stanfordnlp/snli", "scitail": "allenai/scitail"}


def _find(tasks: dict, dataset: str, config: str | None):
    if dataset in tasks and config in (None, tasks[dataset].config):
        return tasks[dataset]
    hub_id = _LEGACY_IDS.get(dataset, dataset)
    matches = [spec for spec in tasks.values() if spec.hub_id == hub_id]
    if config is not None:
        matches = [spec for spec in matches if spec.config == config]
    return matches[0] if len(matches) == 1 else None


def find_vision_task(dataset: str, config: str | None = None) -> VisionTaskSpec | None:
    """Return the spec for a short name ("eurosat") or hub id, or None for an unknown dataset."""
    return _find(VISION_TASKS, dataset, config)


def find_text_task(dataset: str, config: str | None = None) -> TextPairTaskSpec | None:
    """Return the spec for a short name ("rte") or hub id plus config, or None if unknown."""
    return _find(TEXT_TASKS, dataset, config)
