"""Classification heads: CLIP zero-shot weights from prompt templates (a plain function)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

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


def zeroshot_logits(features: torch.Tensor, head: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP logits: logit_scale * cos(image feature, class embedding)."""
    return logit_scale * F.normalize(features, dim=-1) @ head.t()
