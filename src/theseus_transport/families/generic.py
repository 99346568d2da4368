"""Any model made of nn.Linear and normalisation layers, with user-declared tied spaces."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..transport.rule import ParamRule, Piece
from .base import Capture, FamilyAdapter, LinearLink, hook_input, hook_output, register_family

NORM_TYPES = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)


@register_family("generic")
class GenericLinearAdapter(FamilyAdapter):
    """Transports every nn.Linear (input and output spaces) and norm layer (output space).

    `tied_spaces` maps a space to the one whose map it shares in rank-aware mode, e.g.
    {"blocks.0.fc1:out": "blocks.0.fc2:in"} when only an elementwise activation lies between.
    """

    def __init__(self, tied_spaces: dict[str, str] | None = None, blocks_attr: str = "blocks") -> None:
        self.tied_spaces = dict(tied_spaces or {})
        self.blocks_attr = blocks_attr

    def encoder(self, model: nn.Module) -> nn.Module:
        """Return the model itself."""
        return model

    def matches(self, encoder: nn.Module) -> bool:
        """Never chosen automatically: ask for it by name."""
        return False

    def blocks(self, encoder: nn.Module) -> nn.ModuleList:
        """Return the model's `blocks_attr` ModuleList."""
        return getattr(encoder, self.blocks_attr)

    def block_prefix(self, encoder: nn.Module) -> str:
        """Return `blocks_attr`."""
        return self.blocks_attr

    def param_rules(self, encoder: nn.Module, map_mode: str) -> dict[str, ParamRule]:
        """Return a rule for every Linear and norm parameter; everything else is skipped."""
        tie = (lambda space: self.tied_spaces.get(space, space)) if map_mode == "rank_aware" else (lambda space: space)
        rules: dict[str, ParamRule] = {}
        for name, module in encoder.named_modules():
            if isinstance(module, nn.Linear):
                out_space = tie(f"{name}:out")
                rules[f"{name}.weight"] = ParamRule((Piece("matrix", out_space, tie(f"{name}:in")),))
                if module.bias is not None:
                    rules[f"{name}.bias"] = ParamRule((Piece("vector", out_space),))
            elif isinstance(module, NORM_TYPES):
                for param_name, _ in module.named_parameters(recurse=False):
                    rules[f"{name}.{param_name}"] = ParamRule((Piece("vector", tie(f"{name}:out")),))
        for key, value in encoder.state_dict().items():
            if key not in rules and value.is_floating_point():
                rules[key] = ParamRule(skip_reason="not a parameter of an nn.Linear or norm layer")
        return rules

    def linear_outputs(self, encoder: nn.Module) -> dict[str, LinearLink]:
        """Link every nn.Linear's output point to its input point (both are captured by the hooks below)."""
        return {f"{name}:out": (f"{name}:in", module.weight, module.bias)
                for name, module in encoder.named_modules() if isinstance(module, nn.Linear)}

    @contextlib.contextmanager
    def capture(self, encoder: nn.Module, spaces: set[str]) -> Iterator[Capture]:
        """Hook inputs and outputs of every Linear and outputs of every norm layer."""
        capture = Capture(spaces)
        handles = []
        try:
            for name, module in encoder.named_modules():
                if isinstance(module, nn.Linear):
                    handles.append(hook_input(module, capture, f"{name}:in"))
                    handles.append(hook_output(module, capture, f"{name}:out"))
                elif isinstance(module, nn.GroupNorm):
                    handles.append(_hook_channels_last(module, capture, f"{name}:out"))
                elif isinstance(module, NORM_TYPES):
                    handles.append(hook_output(module, capture, f"{name}:out"))
            yield capture
        finally:
            for handle in handles:
                handle.remove()
            capture.clear()

    def forward(self, encoder: nn.Module, batch: Any) -> None:
        """Call the model on the batch."""
        encoder(batch)


def _hook_channels_last(module: nn.Module, capture: Capture, space: str) -> torch.utils.hooks.RemovableHandle:
    """Capture a channels-second output (GroupNorm: B x C x ...) with its channels last, as every point is."""

    def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        if output.ndim > 2:
            # the features a GroupNorm's weight and bias act on are its channels (dim 1), not the last dim
            output = output.movedim(1, -1).reshape(output.shape[0], -1, output.shape[1])
        capture.put(space, output)

    return module.register_forward_hook(hook)
