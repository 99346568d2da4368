"""Update fidelity: does the transported update move the target's activations the way the task vector moved the source's?

Alignment (paper Sec. 4.7) compares the two base models; it says nothing about the update. This
diagnostic compares the *changes*: per capture point, the source's activation change under its task
vector, carried into the target's space by that point's map, against the target's activation change
under the transported task vector, on the same held-out inputs. A point where the cosine is near 1
reproduces the source's update; where it falls to ~0 the update no longer carries, and the layers
after it cannot recover it. It needs no fine-tuning of the target, so it can be computed before a
transported model is trusted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .alignment import align_tokens
from .engine import _frozen_eval, split_pair


def _activations(adapter: Any, encoder: nn.Module, spaces: set[str], batch: Any) -> dict[str, torch.Tensor]:
    """One forward pass of `encoder` with the points in `spaces` captured (float64, detached)."""
    with adapter.capture(encoder, spaces) as capture:
        adapter.forward(encoder, batch)
        return {space: value.detach().to(torch.float64) for space, value in capture.activations.items()}


@torch.no_grad()
def measure_update_alignment(
    adapter: Any,
    source_base: nn.Module,
    source_updated: nn.Module,
    target_base: nn.Module,
    target_updated: nn.Module,
    maps: Mapping[str, torch.Tensor],
    held_out: Iterable[Any],
    token_alignment: str,
) -> dict[str, dict[str, float]]:
    """Per capture point: cosine between the mapped source activation change and the target's, and their norm ratio.

    `held_out` yields paired items like calibration data (dicts with 'source' and 'target', or pairs).
    Returns {space: {"cosine": ..., "norm_ratio": ...}}, both over all held-out tokens (Frobenius),
    with norm_ratio = |target change| / |mapped source change|.
    """
    spaces = set(maps)
    # sums of <mapped source change, target change>, |mapped source change|^2, |target change|^2
    totals: dict[str, list[float]] = {}
    with _frozen_eval(source_base, source_updated, target_base, target_updated):
        for item in held_out:
            source_batch, target_batch = split_pair(item)
            before = _activations(adapter, source_base, spaces, source_batch)
            after = _activations(adapter, source_updated, spaces, source_batch)
            source_change = {space: after[space] - before[space] for space in before if space in after}
            before = _activations(adapter, target_base, spaces, target_batch)
            after = _activations(adapter, target_updated, spaces, target_batch)
            target_change = {space: after[space] - before[space] for space in before if space in after}
            mask = adapter.token_mask(target_batch)
            for space in sorted(spaces & source_change.keys() & target_change.keys()):
                # token alignment is linear, so aligning the changes equals changing the aligned activations
                source_rows, target_rows = align_tokens(source_change[space], target_change[space], token_alignment, mask)
                mapped = source_rows @ maps[space].to(source_rows.device, torch.float64)
                entry = totals.setdefault(space, [0.0, 0.0, 0.0])
                entry[0] += float((mapped * target_rows).sum())
                entry[1] += float(mapped.pow(2).sum())
                entry[2] += float(target_rows.pow(2).sum())
    result = {}
    for space, (inner, mapped_sq, target_sq) in sorted(totals.items()):
        # undefined where a change is zero: the cosine has no direction, the ratio no denominator
        cosine = inner / (mapped_sq * target_sq) ** 0.5 if mapped_sq > 0.0 and target_sq > 0.0 else float("nan")
        if mapped_sq > 0.0:
            ratio = (target_sq / mapped_sq) ** 0.5
        else:
            ratio = float("nan") if target_sq == 0.0 else float("inf")
        result[space] = {"cosine": cosine, "norm_ratio": ratio}
    return result
