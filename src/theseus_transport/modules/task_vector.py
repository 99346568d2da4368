"""Encoder snapshots and task vectors (fine-tuned minus base), as plain functions."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..transport.io import save_task_vector


def snapshot_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU copies of a module's floating-point state (parameters and float buffers)."""
    return {
        key: value.detach().to("cpu", copy=True)
        for key, value in module.state_dict().items()
        if torch.is_floating_point(value)
    }


def task_vector_from(module: nn.Module, base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The module's current floating-point state minus ``base``, key by key (keys of ``base``), in base's dtypes.

    A module trained in lower precision than its snapshot (Lightning's ``bf16-true`` casts it after the
    snapshot) started from the base rounded to its dtype, so that rounding is the start, not part of the update.
    """
    now = module.state_dict()
    missing = sorted(set(base) - set(now))
    if missing:
        raise KeyError(f"base snapshot has keys the module lacks: {missing[:5]}")
    vector = {}
    for key, start in base.items():
        current = now[key].detach().to("cpu")
        vector[key] = current.to(start.dtype) - start.to(current.dtype).to(start.dtype)
    return vector


def write_task_vector(
    path: str | os.PathLike,
    module: nn.Module,
    base: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any],
    overwrite: bool = False,
) -> Path:
    """Write ``module - base`` as a task vector (safetensors plus JSON sidecar)."""
    return save_task_vector(path, task_vector_from(module, base), dict(metadata), overwrite=overwrite)
