"""Tests of the representation-similarity diagnostics."""

from __future__ import annotations

import pytest
import torch

from theseus_transport.transport import linear_cka, procrustes_readout_accuracy
from theseus_transport.transport.maps import procrustes


def _rotation(width: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(width, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def test_cka_is_one_for_rotated_scaled_and_widened_features():
    features = torch.randn(200, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    widened = torch.cat([3.0 * features @ _rotation(16, 1), torch.zeros(200, 8, dtype=torch.float64)], dim=1)
    assert linear_cka(features, widened) == pytest.approx(1.0, abs=1e-12)


def test_cka_is_small_for_unrelated_features_and_rejects_mismatched_rows():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(2000, 8, generator=generator), torch.randn(2000, 12, generator=generator)
    assert linear_cka(a, b) < 0.05
    with pytest.raises(ValueError, match="same n inputs"):
        linear_cka(a, b[:10])


def test_readout_through_the_procrustes_map_recovers_labels_of_rotated_features():
    generator = torch.Generator().manual_seed(0)
    head_source = torch.nn.functional.normalize(torch.randn(4, 8, generator=generator, dtype=torch.float64), dim=-1)
    labels = torch.randint(4, (300,), generator=generator)
    source = head_source[labels] + 0.05 * torch.randn(300, 8, generator=generator, dtype=torch.float64)
    rotation = _rotation(8, 3)
    target = source @ rotation
    head_target = head_source @ rotation
    feature_map = procrustes(source.T @ target)
    assert procrustes_readout_accuracy(source, head_target, labels, feature_map) == 1.0
    # without the map the target head reads rotated class directions: far from perfect
    assert procrustes_readout_accuracy(source, head_target, labels, torch.eye(8, dtype=torch.float64)) < 0.9
