"""Head-aware attention maps: one map shared by q and k (and one by v and the attention context), block
structured by a matching of source heads to target heads.

Why: attention logits are per-head bilinear forms, q_h . k_h. Two independent Procrustes maps for the
q and k spaces (DESIGN item 6) preserve q and k each, but not q . k, and they spread a source head's
update over target heads whose attention patterns differ. A shared map whose blocks are orthogonal
head_dim x head_dim rotations between matched heads preserves every matched head's logits exactly:
(R q) . (R k) = q . k. The value space and the context (softmax(q k^T) v, per head) are one per-head
space seen before and after the attention weights, so they share a head-block map too, like the MLP
hidden space in the rank-aware mode (DESIGN item 8).

Plain functions over float64 tensors; the engine calls `head_block_maps` on each attention layer's
cross-covariances.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .maps import procrustes


@dataclass(frozen=True)
class AttentionLayout:
    """One attention layer of one model: its capture points, and heads as contiguous slices of head_dim."""

    query_space: str
    key_space: str
    value_space: str
    context_space: str
    heads: int
    head_dim: int

    @property
    def spaces(self) -> tuple[str, str, str, str]:
        """The four capture points whose maps the head-aware maps replace."""
        return (self.query_space, self.key_space, self.value_space, self.context_space)


def max_weight_matching(score: torch.Tensor) -> list[tuple[int, int]]:
    """Pairs (row, column) of a one-to-one assignment maximising the summed score (Hungarian method).

    Every row is matched when rows <= columns, every column otherwise. Exact, O(n^3); heads number
    in the tens, so this is instantaneous (no SciPy dependency for one call).
    """
    transposed = score.shape[0] > score.shape[1]
    cost = -(score.T if transposed else score).to(torch.float64)
    rows, columns = cost.shape
    # potentials-based Kuhn-Munkres on a rows <= columns cost matrix, 1-indexed with a virtual column 0
    infinity = float("inf")
    row_potential = [0.0] * (rows + 1)
    column_potential = [0.0] * (columns + 1)
    owner = [0] * (columns + 1)  # owner[j]: the row matched to column j (0: none)
    way = [0] * (columns + 1)
    values = cost.tolist()
    for row in range(1, rows + 1):
        owner[0] = row
        column = 0
        slack = [infinity] * (columns + 1)
        used = [False] * (columns + 1)
        while True:
            used[column] = True
            current_row, delta, next_column = owner[column], infinity, 0
            for j in range(1, columns + 1):
                if used[j]:
                    continue
                reduced = values[current_row - 1][j - 1] - row_potential[current_row] - column_potential[j]
                if reduced < slack[j]:
                    slack[j], way[j] = reduced, column
                if slack[j] < delta:
                    delta, next_column = slack[j], j
            for j in range(columns + 1):
                if used[j]:
                    row_potential[owner[j]] += delta
                    column_potential[j] -= delta
                else:
                    slack[j] -= delta
            column = next_column
            if owner[column] == 0:
                break
        while column:
            previous = way[column]
            owner[column] = owner[previous]
            column = previous
    pairs = sorted((owner[j] - 1, j - 1) for j in range(1, columns + 1) if owner[j])
    return sorted((j, i) for i, j in pairs) if transposed else pairs


def _block(matrix: torch.Tensor, source_head: int, target_head: int, head_dim: int) -> torch.Tensor:
    return matrix[source_head * head_dim : (source_head + 1) * head_dim, target_head * head_dim : (target_head + 1) * head_dim]


def head_scores(cross_covariances: Sequence[torch.Tensor], head_dim: int) -> torch.Tensor:
    """Source-head x target-head affinity: the Procrustes objective (nuclear norm) of each head-pair block.

    Each cross-covariance is normalised by its own nuclear norm first, so the q/k and v/context
    evidence weigh alike whatever their scales.
    """
    source_dim, target_dim = cross_covariances[0].shape
    source_heads, target_heads = source_dim // head_dim, target_dim // head_dim
    score = torch.zeros(source_heads, target_heads, dtype=torch.float64)
    for matrix in cross_covariances:
        matrix = matrix.to(torch.float64)
        total = torch.linalg.matrix_norm(matrix, "nuc").clamp_min(torch.finfo(torch.float64).tiny)
        blocks = matrix.reshape(source_heads, head_dim, target_heads, head_dim).permute(0, 2, 1, 3)
        score += torch.linalg.matrix_norm(blocks, "nuc").cpu() / total.cpu()
    return score


def head_block_map(
    cross_covariance: torch.Tensor, matching: Sequence[tuple[int, int]], head_dim: int, rank_aware: bool = True,
    rank_rtol: float = 1e-7,
) -> torch.Tensor:
    """A d_A x d_B map that is a Procrustes rotation on each matched head pair's block and zero elsewhere."""
    cross_covariance = cross_covariance.to(torch.float64)
    result = torch.zeros_like(cross_covariance)
    for source_head, target_head in matching:
        result[source_head * head_dim : (source_head + 1) * head_dim, target_head * head_dim : (target_head + 1) * head_dim] = (
            procrustes(_block(cross_covariance, source_head, target_head, head_dim), rank_aware, rank_rtol)
        )
    return result


def head_block_maps(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, context: torch.Tensor, head_dim: int,
    rank_aware: bool = True, rank_rtol: float = 1e-7,
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """Return (q/k map, v/context map, head matching) from the four d_A x d_B cross-covariances of a layer."""
    query_key, value_context = query.to(torch.float64) + key.to(torch.float64), value.to(torch.float64) + context.to(torch.float64)
    matching = max_weight_matching(head_scores([query_key, value_context], head_dim))
    return (head_block_map(query_key, matching, head_dim, rank_aware, rank_rtol),
            head_block_map(value_context, matching, head_dim, rank_aware, rank_rtol), matching)
