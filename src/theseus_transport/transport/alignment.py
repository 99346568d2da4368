"""Token correspondence between source and target activations (DESIGN.md section 2).

All functions take batch-first activations (B x N x D); the source sequence is resized to the
target's length, the target is never changed.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

TOKEN_ALIGNMENTS = ("none", "mean", "interpolate", "interpolate2d")


def to_batch_first(activation: torch.Tensor, sequence_first: bool) -> torch.Tensor:
    """Return activations as B x N x D (2-D B x D becomes B x 1 x D)."""
    if activation.ndim == 2:
        return activation.unsqueeze(1)
    if activation.ndim != 3:
        raise ValueError(f"expected a 2-D or 3-D activation, got shape {tuple(activation.shape)}")
    return activation.transpose(0, 1) if sequence_first else activation


def _resample_1d(tokens: torch.Tensor, length: int) -> torch.Tensor:
    # F.interpolate works on B x C x L, so channels go in the middle
    return F.interpolate(tokens.transpose(1, 2), size=length, mode="linear", align_corners=False).transpose(1, 2)


def _square_side(count: int) -> int | None:
    side = math.isqrt(count)
    return side if side * side == count and side > 0 else None


def interpolate_tokens_2d(source: torch.Tensor, target_length: int) -> torch.Tensor:
    """Resize a CLS + square-grid token sequence to `target_length`, keeping the CLS token apart."""
    source_length = source.shape[1]
    if source_length == target_length:
        return source
    source_side, target_side = _square_side(source_length - 1), _square_side(target_length - 1)
    if source_side is None or target_side is None:
        # no CLS + square grid on both sides: treat the whole sequence as 1-D, and say so, since a
        # rectangular grid or register tokens then pair tokens from different places in the image
        warnings.warn(
            f"token counts {source_length} and {target_length} are not both a CLS token plus a square grid; "
            "interpolate2d falls back to 1-D resampling of the token sequence (token_alignment='interpolate')",
            stacklevel=3,
        )
        return _resample_1d(source, target_length)
    cls, patches = source[:, :1], source[:, 1:]
    batch, _, width = patches.shape
    grid = patches.transpose(1, 2).reshape(batch, width, source_side, source_side)
    resized = F.interpolate(grid, size=(target_side, target_side), mode="bilinear", align_corners=False)
    return torch.cat([cls, resized.reshape(batch, width, -1).transpose(1, 2)], dim=1)


def _mean_over_tokens(tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Each example's mean token (B x N x d -> B x d), over its real tokens when `mask` fits its token count."""
    if mask is None or mask.shape != tokens.shape[:2]:
        return tokens.mean(1)
    weights = mask.to(tokens.dtype).unsqueeze(-1)
    counts = weights.sum(1)
    if bool((counts == 0).any()):
        raise ValueError("an example has no real tokens (its mask is all padding); it has no mean token")
    return (tokens * weights).sum(1) / counts


def align_tokens(
    source: torch.Tensor,
    target: torch.Tensor,
    strategy: str = "interpolate2d",
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Put source and target tokens in correspondence and return paired rows (N x d_A, N x d_B).

    `mask` (B x N, true for real tokens) drops padding tokens (for `mean`, from each side whose token
    count it fits); otherwise it needs equal token counts.
    """
    if source.shape[0] != target.shape[0]:
        raise ValueError(f"source and target batches differ in size: {source.shape[0]} vs {target.shape[0]}")
    if strategy not in TOKEN_ALIGNMENTS:
        raise ValueError(f"unknown token alignment {strategy!r}; choose one of {TOKEN_ALIGNMENTS}")
    if strategy == "mean":
        return _mean_over_tokens(source, mask), _mean_over_tokens(target, mask)
    if source.shape[1] != target.shape[1]:
        if strategy == "none":
            raise ValueError(
                f"token counts differ ({source.shape[1]} vs {target.shape[1]}); choose a token alignment"
            )
        if strategy == "interpolate":
            source = _resample_1d(source, target.shape[1])
        else:
            source = interpolate_tokens_2d(source, target.shape[1])
    if mask is not None:
        keep = mask.to(torch.bool)
        return source[keep], target[keep]
    return source.reshape(-1, source.shape[-1]), target.reshape(-1, target.shape[-1])
