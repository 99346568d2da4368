"""Update fidelity: the transported update moves the target's activations like the task vector moved the source's."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from theseus_transport import apply_task_vector, transport
from theseus_transport.families import get_family
from theseus_transport.transport import measure_update_alignment

from test_transport_exactness import twin_setup  # noqa: F401 - the permuted-twin fixture, shared
from twins import random_task_vector


@pytest.fixture(scope="module")
def twin_transport(twin_setup):
    source, twin, task_vector, calibration, held_out_images, _ = twin_setup
    held_out = [{"source": images, "target": images} for images in held_out_images.split(4)]
    result = transport(source, twin, task_vector, calibration, map_mode="rank_aware", progress=False)
    return source, twin, task_vector, calibration, result, held_out


def _measure(source, twin, task_vector, target_vector, result, held_out):
    return measure_update_alignment(
        get_family("openclip"), source, apply_task_vector(copy.deepcopy(source), task_vector),
        twin, apply_task_vector(copy.deepcopy(twin), target_vector),
        result.plan.maps, held_out, result.plan.metadata["token_alignment"],
    )


def test_exact_transport_on_a_twin_has_full_fidelity_at_every_point(twin_transport):
    source, twin, task_vector, _, result, held_out = twin_transport
    fidelity = _measure(source, twin, task_vector, result.task_vector, result, held_out)
    assert set(fidelity) == set(result.plan.maps)
    changed = {space: values for space, values in fidelity.items() if not math.isnan(values["cosine"])}
    assert len(changed) >= len(fidelity) - 1  # every point after the first transported layer moves
    for space, values in changed.items():
        assert values["cosine"] > 1 - 1e-6, space
        assert abs(values["norm_ratio"] - 1) < 1e-4, space


def test_an_unrelated_update_scores_low_and_no_update_scores_zero_norm(twin_transport):
    source, twin, task_vector, _, result, held_out = twin_transport
    unrelated = random_task_vector(twin, lambda key: key in result.task_vector, seed=7)
    fidelity = _measure(source, twin, task_vector, unrelated, result, held_out)
    cosines = [values["cosine"] for values in fidelity.values() if not math.isnan(values["cosine"])]
    assert max(abs(c) for c in cosines) < 0.9 and sum(abs(c) for c in cosines) / len(cosines) < 0.5

    nothing = {key: torch.zeros_like(value) for key, value in result.task_vector.items()}
    fidelity = _measure(source, twin, task_vector, nothing, result, held_out)
    assert all(values["norm_ratio"] == 0.0 and math.isnan(values["cosine"]) for values in fidelity.values())


def test_transport_reports_update_fidelity_even_from_a_one_shot_iterator(twin_transport):
    source, twin, task_vector, calibration, _, held_out = twin_transport
    result = transport(source, twin, task_vector, calibration, held_out=iter(held_out), progress=False)
    assert result.report.alignment and set(result.report.update_alignment) == set(result.report.alignment)
    expected = _measure(source, twin, task_vector, result.task_vector, result, held_out)
    for space, values in expected.items():
        reported = result.report.update_alignment[space]
        assert reported["cosine"] == pytest.approx(values["cosine"], nan_ok=True), space
    assert "update fidelity on held-out batches" in result.report.summary()


def test_transport_with_held_out_data_leaves_the_models_modes_as_they_were(twin_transport):
    source, twin, task_vector, calibration, _, held_out = twin_transport
    source, twin = copy.deepcopy(source), copy.deepcopy(twin)
    source.train()
    twin.train()
    twin.ln_post.eval()  # a mixed model: one part kept in eval mode by its owner
    transport(source, twin, task_vector, calibration, held_out=held_out, progress=False)
    assert all(module.training for module in source.modules())
    assert not twin.ln_post.training and all(m.training for name, m in twin.named_modules() if name != "ln_post")
