"""Turn whatever splits a dataset ships into train / val / test (/ calibration) splits."""

from __future__ import annotations

import datasets
import torch

from ..transport.errors import DataLayoutError

VAL_SPLIT_NAMES = ("val", "validation", "valid", "dev")
CALIBRATION_SPLIT = "calibration"


def carve_validation(train: datasets.Dataset, fraction: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split a seeded ``fraction`` of train off as validation; returns (remaining train, validation)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {fraction}")
    parts = train.train_test_split(test_size=fraction, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def standard_splits(
    raw: datasets.DatasetDict,
    *,
    train_split: str = "train",
    val_split: str | None = None,
    test_split: str | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> dict[str, datasets.Dataset]:
    """Return {"train", "val", "test"} plus "calibration" when the dataset ships one.

    A missing validation split is carved from train (``val_fraction``, ``seed``), so validation never
    overlaps test; a missing test split is an error rather than a silent reuse of validation.
    """
    if train_split not in raw:
        raise DataLayoutError(f"split {train_split!r} not found; the dataset has {list(raw)}")
    test_name = test_split or "test"
    # a split that serves as the test split is never also found as the validation split (GLUE tests on
    # its public "validation" split): validation would then be the test set
    val_name = val_split or next((name for name in VAL_SPLIT_NAMES if name in raw and name != test_name), None)
    if val_name is not None and val_name == test_name:
        raise DataLayoutError(f"the validation and test splits are both {test_name!r}; name different splits")
    if test_name not in raw:
        raise DataLayoutError(f"test split {test_name!r} not found; the dataset has {list(raw)}")
    train = raw[train_split]
    if val_name is not None and val_name in raw:
        val = raw[val_name]
    elif val_split is not None:
        raise DataLayoutError(f"validation split {val_split!r} not found; the dataset has {list(raw)}")
    else:
        train, val = carve_validation(train, val_fraction, seed)
    splits = {"train": train, "val": val, "test": raw[test_name]}
    if CALIBRATION_SPLIT in raw:
        splits[CALIBRATION_SPLIT] = raw[CALIBRATION_SPLIT]
    return splits


def limit(dataset: datasets.Dataset, count: int | None, seed: int = 0) -> datasets.Dataset:
    """Keep a seeded random ``count`` examples (all when None), in their original order; for quick runs."""
    if count is None or count >= len(dataset):
        return dataset
    # random rather than the first rows: many datasets are stored sorted by class
    keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count]
    return dataset.select(sorted(keep.tolist()))
