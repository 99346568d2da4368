"""Depth mismatch: target blocks as convex combinations of source blocks (paper Sec. 4.4)."""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LayerMap:
    """For each target block, the source blocks it is made of and their weights (summing to 1)."""

    sources: tuple[tuple[tuple[int, float], ...], ...]

    def __post_init__(self) -> None:
        for index, combination in enumerate(self.sources):
            total = sum(weight for _, weight in combination)
            if not combination or abs(total - 1.0) > 1e-9:
                raise ValueError(f"target block {index}: weights must be non-empty and sum to 1, got {combination}")

    @property
    def target_depth(self) -> int:
        """Number of blocks after expansion."""
        return len(self.sources)

    @classmethod
    def identity(cls, depth: int) -> "LayerMap":
        """Pair block i with block i."""
        return cls(tuple(((i, 1.0),) for i in range(depth)))

    @classmethod
    def interpolated(cls, source_depth: int, target_depth: int) -> "LayerMap":
        """Place target block j at source position j * n_s / n_t and blend its two neighbours.

        For target_depth = 2 * source_depth this is the paper's rule: after each block i a block
        averaging i and i + 1, the last inserted block a copy of the last block.
        """
        if source_depth < 1 or target_depth < 1:
            raise ValueError("depths must be positive")
        sources = []
        for j in range(target_depth):
            position = j * source_depth / target_depth
            low = min(math.floor(position), source_depth - 1)
            high = min(low + 1, source_depth - 1)
            fraction = position - math.floor(position)
            if high == low or fraction == 0.0:
                sources.append(((low, 1.0),))
            else:
                sources.append(((low, 1.0 - fraction), (high, fraction)))
        return cls(tuple(sources))

    def to_json(self) -> list[list[list[float]]]:
        """Return a JSON-friendly form."""
        return [[[index, weight] for index, weight in combination] for combination in self.sources]

    @classmethod
    def from_json(cls, payload: list) -> "LayerMap":
        """Rebuild a LayerMap from `to_json` output."""
        return cls(tuple(tuple((int(index), float(weight)) for index, weight in combination) for combination in payload))


def _block_pattern(prefix: str) -> re.Pattern:
    return re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$")


def expand_state_dict(
    state: Mapping[str, torch.Tensor], block_prefix: str, layer_map: LayerMap,
    reference_keys: Collection[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Return a state dict (or task vector) whose blocks follow `layer_map`; other keys unchanged.

    A parameter that only the first block has (T5's relative attention bias: block 0 computes the
    position bias every later block reuses) stays a first-block parameter: target block 0 takes it
    from source block 0, whatever blocks it blends, and no other target block gets it. Another
    parameter that only some source blocks have is blended over the blocks that have it. For a task
    vector pass the source model's keys as `reference_keys`: a key the model has but the vector lacks
    is then a zero update, weighted as such, not a block left out of the blend.
    """
    pattern = _block_pattern(block_prefix)
    per_block: dict[int, dict[str, torch.Tensor]] = {}
    expanded: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = pattern.match(key)
        if match:
            per_block.setdefault(int(match.group(1)), {})[match.group(2)] = value
        else:
            expanded[key] = value
    has_parameter = _block_names(reference_keys if reference_keys is not None else state, pattern)
    first_only = first_block_names(has_parameter)
    for target_index, combination in enumerate(layer_map.sources):
        names = set().union(*(per_block.get(source, {}).keys() for source, _ in combination)) - first_only
        if target_index == 0:
            for name in sorted(first_only & per_block.get(0, {}).keys()):
                expanded[f"{block_prefix}.0.{name}"] = per_block[0][name].clone()
        for name in sorted(names):
            parts = [(per_block[source][name], weight) for source, weight in combination if name in per_block.get(source, {})]
            if not parts[0][0].is_floating_point():
                expanded[f"{block_prefix}.{target_index}.{name}"] = parts[0][0].clone()
                continue
            # blend in float64 so an exact copy (weight 1) stays bitwise equal after the cast back;
            # the weights are renormalised over the blocks that have the parameter at all
            weight_sum = sum(weight for source, weight in combination if name in has_parameter.get(source, ()))
            total = sum(tensor.to(torch.float64) * (weight / weight_sum) for tensor, weight in parts)
            expanded[f"{block_prefix}.{target_index}.{name}"] = total.to(parts[0][0].dtype)
    return expanded


def first_block_names(names: Mapping[int, set[str]]) -> set[str]:
    """Parameter names that block 0 has and no other block has (T5's relative attention bias)."""
    others = [block_names for index, block_names in names.items() if index != 0]
    return set(names.get(0, set())) - set().union(*others) if others else set()


def _block_names(keys: Collection[str], pattern: re.Pattern) -> dict[int, set[str]]:
    """For each block index, the parameter names (after the block prefix) among `keys`."""
    names: dict[int, set[str]] = {}
    for key in keys:
        match = pattern.match(key)
        if match:
            names.setdefault(int(match.group(1)), set()).add(match.group(2))
    return names


def unmapped_block_keys(
    keys: Collection[str], block_prefix: str, layer_map: LayerMap, reference_keys: Collection[str] | None = None,
) -> list[str]:
    """The keys of source blocks that no target block of `layer_map` takes anything from.

    A first-block-only parameter of block 0 (T5's relative attention bias) is not one of them:
    `expand_state_dict` always carries it into target block 0, whatever blocks the map blends.
    `reference_keys` are as in `expand_state_dict` (the source model's keys, for a task vector).
    """
    pattern = _block_pattern(block_prefix)
    used = {source for combination in layer_map.sources for source, _ in combination}
    # the same first-block-only names expand_state_dict carries, so the two never disagree
    carried = {f"{block_prefix}.0.{name}"
               for name in first_block_names(_block_names(reference_keys if reference_keys is not None else keys, pattern))}
    return sorted(key for key in keys
                  if (match := pattern.match(key)) and int(match.group(1)) not in used and key not in carried)


def expand_module(encoder: nn.Module, blocks: nn.ModuleList, block_prefix: str, layer_map: LayerMap) -> nn.Module:
    """Return a deep copy of `encoder` with its blocks replaced as `layer_map` says."""
    expanded = copy.deepcopy(encoder)
    # each target block is built like the source block of its position: block 0 like block 0 (with any
    # first-block-only parameter), later blocks like a later block, whatever blocks their weights blend
    later = range(1, len(blocks))

    def template(target_index: int, combination: tuple[tuple[int, float], ...]) -> nn.Module:
        if target_index == 0 or not later:
            return blocks[0]
        return blocks[next((source for source, _ in combination if source != 0), later[0])]

    new_blocks = nn.ModuleList(copy.deepcopy(template(t, combination)) for t, combination in enumerate(layer_map.sources))
    owner_path, _, attr = block_prefix.rpartition(".")
    owner = expanded.get_submodule(owner_path) if owner_path else expanded
    setattr(owner, attr, new_blocks)
    state = expand_state_dict(encoder.state_dict(), block_prefix, layer_map)
    expanded.load_state_dict(state)
    return expanded
