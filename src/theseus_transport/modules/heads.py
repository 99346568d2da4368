"""Classification heads: CLIP zero-shot weights from prompt templates (a plain function)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def zeroshot_weights(
    clip_model: nn.Module,
    tokenizer: Callable,
    classnames: Sequence[str],
    templates: Sequence[str],
    device: torch.device | str | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """Return a (num_classes x embed_dim) head: per class, mean of normalised prompt embeddings, renormalised."""
    if not classnames or not templates:
        raise ValueError("zero-shot heads need at least one class name and one template")
    device = torch.device(device) if device is not None else next(clip_model.parameters()).device
    prompts = [template.format(name) for name in classnames for template in templates]
    was_training = clip_model.training
    clip_model.eval()
    try:
        chunks = []
        for start in range(0, len(prompts), batch_size):
            tokens = tokenizer(prompts[start : start + batch_size]).to(device)
            chunks.append(F.normalize(clip_model.encode_text(tokens).float(), dim=-1))
    finally:
        clip_model.train(was_training)
    per_prompt = torch.cat(chunks).view(len(classnames), len(templates), -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1)


# Class embeddings closer than this mean the text tower all but ignores the words that name the
# classes (duplicate class names, a template that truncates them, or a model that never learnt them):
# on the zoo family, the positions and glyphs heads sit at 0.9999+ and zero-shot accuracy at chance.
NEAR_DUPLICATE_COSINE = 0.999


class NearDuplicateClassesWarning(UserWarning):
    """A zero-shot head whose text tower maps two or more classes to almost the same embedding."""


@dataclass(frozen=True)
class ClassSimilarity:
    """The most similar pair of classes of a zero-shot head, and their cosine."""

    first: str
    second: str
    cosine: float


def closest_classes(head: torch.Tensor, classnames: Sequence[str]) -> ClassSimilarity:
    """The pair of distinct classes whose head rows have the largest cosine similarity."""
    if head.ndim != 2 or head.shape[0] != len(classnames):
        raise ValueError(f"head of shape {tuple(head.shape)} does not match {len(classnames)} class names")
    if head.shape[0] < 2:
        raise ValueError("a head needs at least two classes to compare")
    rows = F.normalize(head.double(), dim=-1)
    cosine = rows @ rows.T
    cosine.fill_diagonal_(-torch.inf)
    flat = int(torch.argmax(cosine))
    first, second = divmod(flat, head.shape[0])
    return ClassSimilarity(classnames[first], classnames[second], float(cosine[first, second]))


def warn_near_duplicate_classes(head: torch.Tensor, classnames: Sequence[str]) -> ClassSimilarity:
    """Warn (NearDuplicateClassesWarning) when two classes of a zero-shot head are nearly the same."""
    closest = closest_classes(head, classnames)
    if closest.cosine > NEAR_DUPLICATE_COSINE:
        warnings.warn(
            f"zero-shot head: classes {closest.first!r} and {closest.second!r} have text embeddings with cosine "
            f"{closest.cosine:.4f}; the text tower barely tells them apart, so zero-shot accuracy on them is "
            "near chance and fine-tuning with this head frozen learns them slowly (check the class names and "
            "templates)",
            NearDuplicateClassesWarning,
            stacklevel=2,
        )
    return closest


def zeroshot_logits(features: torch.Tensor, head: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP logits: logit_scale * cos(image feature, class embedding)."""
    return logit_scale * F.normalize(features, dim=-1) @ head.t()
