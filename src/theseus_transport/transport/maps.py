"""Feature maps between a source and a target space (d_A x d_B), from cross-statistics.

Every builder has the signature `(stats, options) -> Tensor` and returns a float64 map R with
target features ~ source features @ R. The transport rule (rule.py) uses them all the same way.
SVDs and inverses run in float64 on the statistics' device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .statistics import CrossStatistics


@dataclass(frozen=True)
class MapOptions:
    """Options shared by the map builders."""

    center: bool = False  # centered or uncentered cross-covariance (authors' code: uncentered)
    rank_aware: bool = True  # restrict Procrustes to the numerically determined subspace
    rank_rtol: float = 1e-7  # singular values below rank_rtol * largest count as null space
    ridge: float = 1e-2  # Tikhonov strength, relative to the Gram's mean eigenvalue
    seed: int = 0


def numerical_rank(singular_values: torch.Tensor, rtol: float) -> int:
    """Return how many singular values exceed `rtol` times the largest one."""
    if singular_values.numel() == 0 or singular_values[0] <= 0:
        return 0
    return int((singular_values > rtol * singular_values[0]).sum())


def procrustes(cross_covariance: torch.Tensor, rank_aware: bool = False, rank_rtol: float = 1e-7) -> torch.Tensor:
    """Return the orthogonal Procrustes map U V^T of a d_A x d_B cross-covariance.

    With `rank_aware`, singular directions below the numerical rank are dropped (R = U_r V_r^T):
    the SVD does not determine them, so they get no map at all instead of an arbitrary rotation.
    """
    return procrustes_from_svd(*float64_svd(cross_covariance), rank_aware=rank_aware, rank_rtol=rank_rtol)


def float64_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return the thin SVD (U, S, V^T) of a matrix, computed in float64 on its device."""
    return torch.linalg.svd(matrix.to(torch.float64), full_matrices=False)


def procrustes_from_svd(
    left: torch.Tensor, singular_values: torch.Tensor, right_t: torch.Tensor, rank_aware: bool = False,
    rank_rtol: float = 1e-7,
) -> torch.Tensor:
    """Return the Procrustes map U V^T from an SVD already computed (see `procrustes`)."""
    if rank_aware:
        rank = numerical_rank(singular_values, rank_rtol)
        left, right_t = left[:, :rank], right_t[:rank]
    return left @ right_t


def nearest_orthogonal(matrix: torch.Tensor) -> torch.Tensor:
    """Return the semi-orthogonal matrix closest to `matrix` in Frobenius norm (polar factor)."""
    return procrustes(matrix)


def theseus_map(stats: CrossStatistics, options: MapOptions) -> torch.Tensor:
    """Theseus: Procrustes on the cross-covariance (rank-aware or as in the paper)."""
    return procrustes(stats.cross_covariance(options.center), options.rank_aware, options.rank_rtol)


def zero_pad_map(stats: CrossStatistics, options: MapOptions) -> torch.Tensor:
    """Zero-padding (or cropping) of the source coordinates into the target's."""
    device = stats.cross.device if stats.cross is not None else None
    return torch.eye(stats.source_dim, stats.target_dim, dtype=torch.float64, device=device)


def _ridge_inverse(gram: torch.Tensor, ridge: float) -> torch.Tensor:
    strength = ridge * gram.diagonal().mean().clamp_min(torch.finfo(gram.dtype).tiny)
    return torch.linalg.inv(gram + strength * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device))


def pinv_map(stats: CrossStatistics, options: MapOptions) -> torch.Tensor:
    """Least-squares transport: R = X_A^T X_B (X_B^T X_B)^+, so R^T = pinv(X_B) X_A."""
    return stats.cross_covariance(options.center) @ torch.linalg.pinv(
        stats.gram("target", options.center), hermitian=True
    )


def pinv_ridge_map(stats: CrossStatistics, options: MapOptions) -> torch.Tensor:
    """Least-squares transport with a Tikhonov ridge on the target Gram matrix."""
    return stats.cross_covariance(options.center) @ _ridge_inverse(stats.gram("target", options.center), options.ridge)


def decoupled_least_squares_map(stats: CrossStatistics, options: MapOptions) -> torch.Tensor:
    """Independent least-squares feature map M = argmin ||X_A M - X_B|| = (X_A^T X_A)^+ X_A^T X_B."""
    return torch.linalg.pinv(stats.gram("source", options.center), hermitian=True) @ stats.cross_covariance(
        options.center
    )


def decoupled_orthogonal_map(stats: CrossStatistics, options: MapOptions) -> torch.Tensor:
    """The nearest semi-orthogonal map to the decoupled least-squares map."""
    return nearest_orthogonal(decoupled_least_squares_map(stats, options))


MapBuilder = Callable[[CrossStatistics, MapOptions], torch.Tensor]
