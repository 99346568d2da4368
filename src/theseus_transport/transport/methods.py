"""Transport methods: Theseus and the baselines, each a map builder plus an update rule."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import UnknownNameError
from .maps import (
    MapBuilder,
    decoupled_least_squares_map,
    decoupled_orthogonal_map,
    pinv_map,
    pinv_ridge_map,
    theseus_map,
    zero_pad_map,
)
from .rule import ParamRule, transport_parameter

UpdateFn = Callable[[str, ParamRule, torch.Tensor, dict[str, torch.Tensor], tuple[int, ...], int], torch.Tensor]


def _generator(key: str, seed: int) -> torch.Generator:
    # one stream per key, so the result does not depend on the order keys are processed in
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))


def _random_like_norm(shape: tuple[int, ...], norm: torch.Tensor, key: str, seed: int) -> torch.Tensor:
    noise = torch.randn(shape, generator=_generator(key, seed), dtype=torch.float64)
    return noise * (norm / noise.norm().clamp_min(torch.finfo(torch.float64).tiny))


def rule_update(key: str, rule: ParamRule, delta: torch.Tensor, maps: dict[str, torch.Tensor], target_shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Send the source update through the maps with the transport rule."""
    return transport_parameter(rule, delta, maps, target_shape)


def random_update(key: str, rule: ParamRule, delta: torch.Tensor, maps: dict[str, torch.Tensor], target_shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A random target update with the source update's Frobenius norm (ignores the maps)."""
    return _random_like_norm(target_shape, delta.to(torch.float64).norm(), key, seed)


def random_through_maps_update(key: str, rule: ParamRule, delta: torch.Tensor, maps: dict[str, torch.Tensor], target_shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A random source update of equal norm, sent through the learned maps."""
    noise = _random_like_norm(tuple(delta.shape), delta.to(torch.float64).norm(), key, seed)
    return transport_parameter(rule, noise, maps, target_shape)


@dataclass(frozen=True)
class Method:
    """A transport method: how maps are built, how an update is mapped, whether Grams are needed."""

    name: str
    build_map: MapBuilder
    update: UpdateFn
    needs_grams: bool = False
    description: str = ""


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method("theseus", theseus_map, rule_update, description="Procrustes maps and the closed-form rule (paper)"),
        Method("zero_pad", zero_pad_map, rule_update, description="zero-pad (or crop) the source update"),
        Method("random", zero_pad_map, random_update, description="random update of equal Frobenius norm"),
        Method("random_maps", theseus_map, random_through_maps_update, description="random update through the Theseus maps"),
        Method("pinv", pinv_map, rule_update, needs_grams=True, description="least-squares transport with pseudo-inverses"),
        Method("pinv_ridge", pinv_ridge_map, rule_update, needs_grams=True, description="least squares with a Tikhonov ridge"),
        Method("decoupled_ls", decoupled_least_squares_map, rule_update, needs_grams=True, description="independent least-squares feature maps"),
        Method("decoupled_orth", decoupled_orthogonal_map, rule_update, needs_grams=True, description="nearest orthogonal maps of the least-squares maps"),
    )
}


def get_method(name: str) -> Method:
    """Return the method called `name` (an unknown name lists the known ones)."""
    if name not in METHODS:
        raise UnknownNameError(f"unknown transport method {name!r}; known methods: {sorted(METHODS)}")
    return METHODS[name]
