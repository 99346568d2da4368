"""The adapter interface every model family implements, and helpers for activation capture."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..transport.errors import UnknownNameError
from ..transport.heads import AttentionLayout
from ..transport.rule import ParamRule

MAP_MODES = ("rank_aware", "paper")

# an output capture point's link to its input point: (input point, weight `out x in`, bias or None),
# meaning output = input @ weight.T + bias for every token
LinearLink = tuple[str, torch.Tensor, torch.Tensor | None]


class Capture:
    """Activations of the current batch, filled by hooks, keyed by space name (B x N x D).

    Inside `streaming(consumer)` wanted activations are handed to the consumer as they are produced
    instead of being stored, so a caller can use and drop each one before the next is computed.
    """

    def __init__(self, wanted: set[str], sequence_first: bool = False) -> None:
        self.wanted = wanted
        self.sequence_first = sequence_first
        self.activations: dict[str, torch.Tensor] = {}
        self._consumer: Callable[[str, torch.Tensor], None] | None = None

    def wants(self, space: str) -> bool:
        """Whether the current pass should keep activations of `space`."""
        return space in self.wanted

    def put(self, space: str, activation: torch.Tensor, sequence_first: bool | None = None) -> None:
        """Store an activation (or hand it to the streaming consumer), normalised to batch-first, if wanted."""
        if space not in self.wanted:
            return
        seq_first = self.sequence_first if sequence_first is None else sequence_first
        activation = activation.detach()
        if activation.ndim == 2:
            activation = activation.unsqueeze(1)
        elif seq_first:
            activation = activation.transpose(0, 1)
        if self._consumer is not None:
            self._consumer(space, activation)
        else:
            self.activations[space] = activation

    @contextlib.contextmanager
    def streaming(self, consumer: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
        """Within the block, call `consumer(space, activation)` for each wanted activation instead of storing it."""
        self._consumer = consumer
        try:
            yield
        finally:
            self._consumer = None

    def clear(self) -> None:
        """Forget the previous batch's activations."""
        self.activations.clear()


def hook_output(module: nn.Module, capture: Capture, space: str) -> torch.utils.hooks.RemovableHandle:
    """Register a forward hook storing `module`'s output under `space`."""

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        capture.put(space, output[0] if isinstance(output, tuple) else output)

    return module.register_forward_hook(hook)


def hook_input(module: nn.Module, capture: Capture, space: str) -> torch.utils.hooks.RemovableHandle:
    """Register a forward hook storing `module`'s first input under `space`."""

    def hook(_module: nn.Module, inputs: Any, _output: Any) -> None:
        capture.put(space, inputs[0])

    return module.register_forward_hook(hook)


class FamilyAdapter(ABC):
    """What the engine needs to know about a model family: keys, spaces, capture, blocks."""

    name: str = ""
    default_token_alignment: str = "none"

    @abstractmethod
    def encoder(self, model: nn.Module) -> nn.Module:
        """Return the submodule whose parameters form the task vector (e.g. OpenCLIP's `visual`)."""

    @abstractmethod
    def matches(self, encoder: nn.Module) -> bool:
        """Whether `encoder` is a model this adapter handles."""

    @abstractmethod
    def param_rules(self, encoder: nn.Module, map_mode: str) -> dict[str, ParamRule]:
        """Return a rule (pieces or skip reason) for every floating-point key of the encoder."""

    def embedding_rules(self, source: nn.Module, target: nn.Module) -> dict[str, ParamRule]:
        """Rules for the embedding-stage keys (transport_embeddings=True); families without one refuse."""
        raise ValueError(f"the {self.name!r} family has no embedding-stage transport; leave transport_embeddings off")

    def check_embedding_target(self, model: nn.Module) -> None:
        """Refuse a whole target model whose embedding stage parts outside its encoder also use (default: none do).

        Called with the model as the user passed it (transport_embeddings=True), before `encoder`
        hides what else holds the tensors the embedding update is written to.
        """

    @abstractmethod
    @contextlib.contextmanager
    def capture(self, encoder: nn.Module, spaces: set[str]) -> Iterator[Capture]:
        """Install hooks that fill a Capture with the wanted spaces on each forward pass."""

    def attention_layouts(self, encoder: nn.Module) -> list[AttentionLayout]:
        """Return each attention layer's q / k / v / context capture points and heads (attention_maps='heads').

        Default: none, and head-aware maps are refused for the family.
        """
        return []

    def linear_outputs(self, encoder: nn.Module) -> dict[str, LinearLink]:
        """Return {output point: (input point, weight, bias)} for points that are a linear layer of another point.

        The engine derives such a point's statistics from its input point's (no per-batch products)
        when it collects both. Default: none, every point is captured.
        """
        return {}

    @abstractmethod
    def forward(self, encoder: nn.Module, batch: Any) -> None:
        """Run the encoder on one calibration batch (outputs are not needed)."""

    def token_mask(self, batch: Any) -> torch.Tensor | None:
        """Return a B x N mask of real (non-padding) tokens, or None when all tokens count."""
        return None

    @abstractmethod
    def blocks(self, encoder: nn.Module) -> nn.ModuleList:
        """Return the encoder's list of residual blocks (for depth expansion)."""

    @abstractmethod
    def block_prefix(self, encoder: nn.Module) -> str:
        """Return the state-dict prefix of the blocks, e.g. 'transformer.resblocks'."""

    def describe(self, encoder: nn.Module) -> dict[str, Any]:
        """Return a short description (widths, depth) for reports and errors."""
        return {"depth": len(self.blocks(encoder))}

    def batch_to(self, batch: Any, device: torch.device) -> Any:
        """Move a calibration batch (tensor or dict of tensors) to `device`."""
        if isinstance(batch, torch.Tensor):
            return batch.to(device)
        if isinstance(batch, dict) or hasattr(batch, "items"):
            return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
        return batch


_REGISTRY: dict[str, Callable[[], FamilyAdapter]] = {}


def register_family(name: str) -> Callable[[type[FamilyAdapter]], type[FamilyAdapter]]:
    """Class decorator registering a FamilyAdapter under `name` (a duplicate name raises)."""

    def decorate(cls: type[FamilyAdapter]) -> type[FamilyAdapter]:
        if name in _REGISTRY:
            raise ValueError(f"model family {name!r} is already registered")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def get_family(name: str) -> FamilyAdapter:
    """Return a new adapter for the family `name` (an unknown name lists the known ones)."""
    if name not in _REGISTRY:
        raise UnknownNameError(f"unknown model family {name!r}; known families: {sorted(_REGISTRY)}")
    return _REGISTRY[name]()


def known_families() -> list[str]:
    """Return the registered family names."""
    return sorted(_REGISTRY)


def detect_family(encoder: nn.Module) -> FamilyAdapter:
    """Return the adapter of the first registered family that handles `encoder` (or the encoder inside it)."""
    for name in sorted(_REGISTRY):
        adapter = _REGISTRY[name]()
        # a whole model (a T5ForConditionalGeneration, a CLIP) is recognised by the encoder the adapter takes from it
        if adapter.matches(encoder) or adapter.matches(adapter.encoder(encoder)):
            return adapter
    raise UnknownNameError(f"no registered family handles {type(encoder).__name__}; known families: {sorted(_REGISTRY)}")
