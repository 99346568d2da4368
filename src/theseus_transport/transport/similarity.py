"""Representation similarity between two models' features of the same inputs (diagnostics)."""

from __future__ import annotations

import torch


def linear_cka(source_features: torch.Tensor, target_features: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019) of two feature matrices (n x d_A, n x d_B) over the same n inputs.

    1 when the two are equal up to a rotation and an isotropic scale, near 0 for unrelated features;
    widths may differ. Computed in float64.
    """
    if source_features.ndim != 2 or target_features.ndim != 2 or len(source_features) != len(target_features):
        raise ValueError(
            f"linear_cka needs two n x d matrices over the same n inputs, got {tuple(source_features.shape)} "
            f"and {tuple(target_features.shape)}"
        )
    a = source_features.to(torch.float64)
    b = target_features.to(torch.float64)
    a = a - a.mean(dim=0)
    b = b - b.mean(dim=0)
    cross = torch.linalg.matrix_norm(a.T @ b) ** 2
    scale = torch.linalg.matrix_norm(a.T @ a) * torch.linalg.matrix_norm(b.T @ b)
    return float(cross / scale) if scale > 0 else 0.0


def procrustes_readout_accuracy(
    source_features: torch.Tensor, target_head: torch.Tensor, labels: torch.Tensor, feature_map: torch.Tensor
) -> float:
    """Accuracy of a target's classifier head on source features carried over by a d_A x d_B map.

    Tells whether the target's head could read the source's (e.g. fine-tuned) features if the target
    reproduced them exactly, up to the map: a rough ceiling for transports that act through the
    embedding (a transported target may still land elsewhere and score higher).
    """
    mapped = torch.nn.functional.normalize(source_features.to(torch.float64) @ feature_map.to(torch.float64), dim=-1)
    predictions = (mapped @ target_head.to(torch.float64).T).argmax(dim=-1)
    return float((predictions.cpu() == labels.cpu()).to(torch.float64).mean())
