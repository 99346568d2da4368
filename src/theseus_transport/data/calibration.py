"""Calibration protocols: which training examples feed the transport statistics (plain functions)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

CALIBRATION_PROTOCOLS = ("batches", "shots")


def _generator(seed: int) -> torch.Generator:
    # a private CPU generator so sampling never touches (or depends on) the global RNG state
    return torch.Generator(device="cpu").manual_seed(int(seed))


def sample_k_batches(num_examples: int, k: int, batch_size: int, seed: int) -> list[int]:
    """Return k * batch_size distinct indices in [0, num_examples), drawn at random with a seed.

    Consecutive runs of ``batch_size`` indices form the k batches; this matches the reference
    protocol (a seeded ``randperm`` of the training split, first ``k * batch_size`` entries).
    """
    if k < 1 or batch_size < 1:
        raise ValueError(f"need k >= 1 and batch_size >= 1, got k={k}, batch_size={batch_size}")
    wanted = k * batch_size
    if wanted > num_examples:
        raise ValueError(
            f"{k} calibration batches of {batch_size} need {wanted} examples but the split has only "
            f"{num_examples}; lower calibration_batches or calibration_batch_size"
        )
    return torch.randperm(num_examples, generator=_generator(seed))[:wanted].tolist()


def sample_k_shots(labels: Sequence[int], k: int, seed: int) -> list[int]:
    """Return k random indices per class (all of a class if it has fewer), interleaved by class.

    The order is round-robin over classes (first shot of every class, then the second, ...), so any
    prefix of the list, e.g. one calibration batch, stays as class-balanced as possible.
    """
    if k < 1:
        raise ValueError(f"need k >= 1 shots per class, got {k}")
    labels_tensor = torch.as_tensor(list(labels), dtype=torch.long)
    generator = _generator(seed)
    per_class: list[list[int]] = []
    short: list[int] = []
    for label in torch.unique(labels_tensor).tolist():  # sorted, so the class order is fixed
        members = torch.nonzero(labels_tensor == label).flatten()
        chosen = members[torch.randperm(len(members), generator=generator)[:k]]
        if len(chosen) < k:
            short.append(label)
        per_class.append(chosen.tolist())
    if short:
        warnings.warn(f"classes {short} have fewer than {k} examples; all of theirs are used", stacklevel=2)
    order: list[int] = []
    for shot in range(k):
        order.extend(members[shot] for members in per_class if shot < len(members))
    return order
