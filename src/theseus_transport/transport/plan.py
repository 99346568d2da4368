"""TransportPlan: the maps of a source/target pair, computed once and applied to many task vectors."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import CorruptFileError, FamilyMismatchError, HashMismatchError, ShapeMismatchError, TaskVectorKeyError
from .layermap import LayerMap, expand_state_dict, unmapped_block_keys
from .io import load_tensors, save_task_vector, sidecar_path, tensors_sha256
from .methods import get_method
from .rule import ParamRule, Piece

PLAN_FORMAT = "theseus-transport-plan/1"


def _rule_to_json(rule: ParamRule) -> dict[str, Any]:
    if rule.skipped:
        return {"skip": rule.skip_reason}
    return {"pieces": [piece.__dict__ for piece in rule.pieces]}


def _rule_from_json(payload: Mapping[str, Any]) -> ParamRule:
    if "skip" in payload:
        return ParamRule(skip_reason=payload["skip"])
    pieces = []
    for piece in payload["pieces"]:
        rows = {k: tuple(v) if v is not None else None for k, v in piece.items() if k.endswith("_rows")}
        pieces.append(Piece(piece["kind"], piece["out_space"], piece.get("in_space"), **rows))
    return ParamRule(tuple(pieces))


@dataclass
class KeyReport:
    """Norms of one transported key."""

    key: str
    source_norm: float
    target_norm: float

    @property
    def norm_ratio(self) -> float:
        """Target update norm over source update norm (1.0 when the rule preserves it)."""
        return self.target_norm / self.source_norm if self.source_norm > 0 else float("nan")


@dataclass
class TransportPlan:
    """Maps per space, a rule per source key, and the shapes they expect, for one model pair."""

    family: str
    method: str
    maps: dict[str, torch.Tensor]
    rules: dict[str, ParamRule]
    source_shapes: dict[str, tuple[int, ...]]
    target_shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, Any] = field(default_factory=dict)
    # depth mismatch: the task vector is expanded with this map before the width transport
    layer_map: LayerMap | None = None
    block_prefix: str | None = None
    original_source_shapes: dict[str, tuple[int, ...]] | None = None

    def expand(self, task_vector: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """Return the task vector expanded to the target's depth (unchanged without a layer map)."""
        if self.layer_map is None:
            return task_vector
        reference = self.original_source_shapes or self.source_shapes
        return expand_state_dict(task_vector, self.block_prefix, self.layer_map, reference_keys=reference)

    def validate(self, task_vector: Mapping[str, torch.Tensor], family: str | None = None) -> None:
        """Raise a named error if a task vector does not fit this plan's source model."""
        if family is not None and family != self.family:
            raise FamilyMismatchError(f"task vector is for family {family!r}, this plan transports {self.family!r}")
        source_shapes = self.original_source_shapes or self.source_shapes
        for key, value in task_vector.items():
            if key not in source_shapes:
                hint = ""
                if any(key.endswith(k) for k in source_shapes):
                    hint = " (a prefix such as 'visual.' may need stripping)"
                raise TaskVectorKeyError(f"task-vector key {key!r} is not a parameter of the source model{hint}")
            if tuple(value.shape) != source_shapes[key]:
                raise ShapeMismatchError(
                    f"task-vector key {key!r} has shape {tuple(value.shape)}, the source parameter has "
                    f"{source_shapes[key]}"
                )
            if not torch.isfinite(value).all():
                raise ValueError(f"task-vector key {key!r} contains NaN or Inf")

    def apply(
        self, task_vector: Mapping[str, torch.Tensor], seed: int = 0, family: str | None = None, alpha: float = 1.0
    ) -> tuple[dict[str, torch.Tensor], list[KeyReport], dict[str, str]]:
        """Transport a source task vector, scaled by alpha; return the target task vector, per-key norms and skipped keys.

        The norms are those of the unscaled transport; alpha is applied in float64 before the one cast.
        """
        self.validate(task_vector, family)
        skipped: dict[str, str] = {}
        if self.layer_map is not None:
            # a layer map may leave source blocks out (a shallower target): their updates are not carried
            reference = self.original_source_shapes or self.source_shapes
            for key in unmapped_block_keys(task_vector, self.block_prefix, self.layer_map, reference_keys=reference):
                skipped[key] = "its source block is in no target block of the layer map"
        task_vector = self.expand(task_vector)
        method = get_method(self.method)
        maps = {name: value.to(torch.float64) for name, value in self.maps.items()}
        transported: dict[str, torch.Tensor] = {}
        norms: list[KeyReport] = []
        for key in sorted(task_vector):
            rule = self.rules.get(key, ParamRule(skip_reason="no transport rule for this parameter"))
            if rule.skipped:
                skipped[key] = rule.skip_reason
                continue
            delta = task_vector[key]
            target_shape = self.target_shapes[key]
            update = method.update(key, rule, delta.to(torch.float64), maps, target_shape, seed)
            if tuple(update.shape) != target_shape:
                raise ShapeMismatchError(f"{key}: transported shape {tuple(update.shape)} != target {target_shape}")
            # cast at the very end: everything up to here, alpha included, is float64
            transported[key] = (update * alpha if alpha != 1.0 else update).to(delta.dtype)
            norms.append(KeyReport(key, float(delta.to(torch.float64).norm()), float(update.norm())))
        return transported, norms, skipped

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Save maps (safetensors) and rules, shapes and metadata (JSON sidecar)."""
        metadata = {
            "format": PLAN_FORMAT,
            "family": self.family,
            "method": self.method,
            "rules": {key: _rule_to_json(rule) for key, rule in self.rules.items()},
            "source_shapes": {key: list(shape) for key, shape in self.source_shapes.items()},
            "target_shapes": {key: list(shape) for key, shape in self.target_shapes.items()},
            "metadata": self.metadata,
            "layer_map": None if self.layer_map is None else self.layer_map.to_json(),
            "block_prefix": self.block_prefix,
            "original_source_shapes": None
            if self.original_source_shapes is None
            else {key: list(shape) for key, shape in self.original_source_shapes.items()},
        }
        maps = {name: value.contiguous() for name, value in self.maps.items()}
        return save_task_vector(path, maps, metadata, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TransportPlan":
        """Load a plan saved with `save`, checking its sha256."""
        maps = load_tensors(path)
        try:
            info = json.loads(sidecar_path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise CorruptFileError(f"plan sidecar {sidecar_path(path)} is missing or unreadable: {error}") from error
        if info.get("format") != PLAN_FORMAT:
            raise CorruptFileError(f"{path} is not a transport plan (format {info.get('format')!r})")
        if info.get("sha256") != tensors_sha256(maps):
            raise HashMismatchError(f"{path}: maps do not match the sha256 in the plan sidecar")
        return cls(
            family=info["family"],
            method=info["method"],
            maps=maps,
            rules={key: _rule_from_json(rule) for key, rule in info["rules"].items()},
            source_shapes={key: tuple(shape) for key, shape in info["source_shapes"].items()},
            target_shapes={key: tuple(shape) for key, shape in info["target_shapes"].items()},
            metadata=info.get("metadata", {}),
            layer_map=None if info.get("layer_map") is None else LayerMap.from_json(info["layer_map"]),
            block_prefix=info.get("block_prefix"),
            original_source_shapes=None
            if info.get("original_source_shapes") is None
            else {key: tuple(shape) for key, shape in info["original_source_shapes"].items()},
        )
