"""The transport rule (paper Eq. 10) for matrices and vectors, and how each parameter uses it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .alignment import interpolate_tokens_2d


@dataclass(frozen=True)
class Piece:
    """One transported block of a parameter: its kind, spaces, and rows in source and target.

    kind: "matrix" (nn.Linear weight, out x in), "vector" (bias / norm / LayerScale of an output
    space), "input_projection" (a matrix applied as x @ P, in x out, like OpenCLIP's `proj`),
    "output_matrix" (a weight whose input side both models share, e.g. a patch embedding's pixels:
    only the output is mapped; dims after the first are kept) or "token_rows" (one row per token,
    e.g. a positional embedding: rows resampled to the target's token count, columns mapped).
    Fused parameters (OpenCLIP's in_proj_weight) are several pieces stacked along dim 0.
    """

    kind: str
    out_space: str
    in_space: str | None = None
    source_rows: tuple[int, int] | None = None
    target_rows: tuple[int, int] | None = None


@dataclass(frozen=True)
class ParamRule:
    """How one parameter key is transported: its pieces, or why it is skipped."""

    pieces: tuple[Piece, ...] = ()
    skip_reason: str | None = None

    @property
    def skipped(self) -> bool:
        """Whether the key is not transported (its target delta is zero)."""
        return self.skip_reason is not None

    def spaces(self) -> set[str]:
        """Return the names of the spaces this rule needs maps for."""
        names = set()
        for piece in self.pieces:
            names.add(piece.out_space)
            if piece.in_space is not None:
                names.add(piece.in_space)
        return names


def transport_matrix(delta: torch.Tensor, out_map: torch.Tensor, in_map: torch.Tensor) -> torch.Tensor:
    """Return R_out^T dW_A R_in for a weight stored out x in (float64 in, float64 out)."""
    return out_map.T @ delta @ in_map


def transport_vector(delta: torch.Tensor, out_map: torch.Tensor) -> torch.Tensor:
    """Return R_out^T db_A for a 1-D parameter of an output space."""
    return out_map.T @ delta


def transport_input_projection(delta: torch.Tensor, out_map: torch.Tensor, in_map: torch.Tensor) -> torch.Tensor:
    """Return R_in^T dP_A R_out for a projection stored in x out and applied as x @ P."""
    return in_map.T @ delta @ out_map


def transport_output_matrix(delta: torch.Tensor, out_map: torch.Tensor) -> torch.Tensor:
    """Return R_out^T dW_A for a weight (out x ...) whose input side is shared by both models."""
    return (out_map.T @ delta.reshape(delta.shape[0], -1)).reshape(out_map.shape[1], *delta.shape[1:])


def transport_token_rows(delta: torch.Tensor, out_map: torch.Tensor, target_tokens: int) -> torch.Tensor:
    """Return the rows (tokens) of dE_A resampled to `target_tokens` (class token kept, grid bilinear), mapped by R_out."""
    rows = interpolate_tokens_2d(delta.unsqueeze(0), target_tokens)[0] if delta.shape[0] != target_tokens else delta
    return rows @ out_map


def transport_piece(
    piece: Piece, delta: torch.Tensor, maps: dict[str, torch.Tensor], target_shape: tuple[int, ...] | None = None
) -> torch.Tensor:
    """Apply the rule of one piece to its slice of the source update (`target_shape`: the whole target parameter's)."""
    out_map = maps[piece.out_space]
    if piece.kind == "vector":
        return transport_vector(delta, out_map)
    if piece.kind == "output_matrix":
        return transport_output_matrix(delta, out_map)
    if piece.kind == "token_rows":
        if target_shape is None:
            raise ValueError("a token_rows piece needs the target parameter's shape (its token count)")
        return transport_token_rows(delta, out_map, target_shape[0])
    in_map = maps[piece.in_space]
    if piece.kind == "matrix":
        return transport_matrix(delta, out_map, in_map)
    if piece.kind == "input_projection":
        return transport_input_projection(delta, out_map, in_map)
    raise ValueError(f"unknown piece kind {piece.kind!r}")


def split_rows(tensor: torch.Tensor, rows: tuple[int, int] | None) -> torch.Tensor:
    """Return the rows [start, stop) of a tensor, or the tensor itself when rows is None."""
    return tensor if rows is None else tensor[rows[0] : rows[1]]


def transport_parameter(
    rule: ParamRule, delta: torch.Tensor, maps: dict[str, torch.Tensor], target_shape: tuple[int, ...] | None = None
) -> torch.Tensor:
    """Transport one parameter's update piece by piece and re-fuse the pieces (float64)."""
    delta64 = delta.to(torch.float64)
    pieces = [transport_piece(piece, split_rows(delta64, piece.source_rows), maps, target_shape) for piece in rule.pieces]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)
