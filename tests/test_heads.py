"""Head-aware attention maps (attention_maps='heads'): matching, block maps, exactness, refusals."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from theseus_transport import apply_task_vector, build_plan, transport
from theseus_transport.transport import ShapeMismatchError, head_block_maps, max_weight_matching
from theseus_transport.transport.heads import head_scores

from theseus_transport.families import GenericLinearAdapter

from test_transport_exactness import EmbeddedResidualNet, twin_setup  # noqa: F401 - the permuted-twin fixture, shared
from test_transport_units import pairs, t5_calibration, tiny_t5
from twins import random_task_vector, tiny_vit


def brute_force_best(score: torch.Tensor) -> float:
    rows, columns = score.shape
    if rows <= columns:
        return max(sum(float(score[i, j]) for i, j in enumerate(perm)) for perm in itertools.permutations(range(columns), rows))
    return max(sum(float(score[i, j]) for j, i in enumerate(perm)) for perm in itertools.permutations(range(rows), columns))


@pytest.mark.parametrize("shape", [(4, 4), (3, 6), (6, 3), (5, 7)])
def test_matching_is_optimal_and_one_to_one(shape):
    generator = torch.Generator().manual_seed(sum(shape))
    for _ in range(5):
        score = torch.rand(shape, generator=generator, dtype=torch.float64)
        pairs_found = max_weight_matching(score)
        assert len(pairs_found) == min(shape)
        assert len({i for i, _ in pairs_found}) == len({j for _, j in pairs_found}) == min(shape)
        assert sum(float(score[i, j]) for i, j in pairs_found) == pytest.approx(brute_force_best(score), abs=1e-12)


def test_block_maps_recover_a_head_permutation_with_rotations():
    # target = source with heads reordered and each head rotated (the same rotation for q and k, another for v)
    generator = torch.Generator().manual_seed(0)
    head_dim, heads, tokens = 4, 3, 200
    order = [2, 0, 1]
    rotations = [torch.linalg.qr(torch.randn(head_dim, head_dim, generator=generator, dtype=torch.float64))[0] for _ in range(2 * heads)]

    def rotate(x: torch.Tensor, offset: int) -> torch.Tensor:
        out = torch.empty_like(x)
        for h, target_head in enumerate(order):
            out[:, target_head * head_dim:(target_head + 1) * head_dim] = x[:, h * head_dim:(h + 1) * head_dim] @ rotations[offset + h]
        return out

    q, k, v, ctx = (torch.randn(tokens, heads * head_dim, generator=generator, dtype=torch.float64) for _ in range(4))
    cross = [a.T @ rotate(a, offset) for a, offset in ((q, 0), (k, 0), (v, heads), (ctx, heads))]
    qk_map, v_map, matching = head_block_maps(*cross, head_dim=head_dim)
    assert matching == [(0, 2), (1, 0), (2, 1)]
    torch.testing.assert_close(rotate(q, 0), q @ qk_map)
    torch.testing.assert_close(rotate(ctx, heads), ctx @ v_map)
    # logits of a matched head are preserved by the shared map: (q R) . (k R) = q . k
    torch.testing.assert_close((q @ qk_map) @ (k @ qk_map).T, q @ k.T)


def test_wider_target_gets_orthonormal_rows_and_untouched_extra_heads():
    generator = torch.Generator().manual_seed(1)
    cross = [torch.randn(8, 12, generator=generator, dtype=torch.float64) for _ in range(4)]  # 2 -> 3 heads of 4
    qk_map, v_map, matching = head_block_maps(*cross, head_dim=4)
    assert len(matching) == 2
    for value_map in (qk_map, v_map):
        torch.testing.assert_close(value_map @ value_map.T, torch.eye(8, dtype=torch.float64))
        unmatched = ({0, 1, 2} - {j for _, j in matching}).pop()
        assert value_map[:, unmatched * 4:(unmatched + 1) * 4].abs().max() == 0
    assert head_scores(cross, 4).shape == (2, 3)


def test_head_aware_maps_recover_the_permuted_twin_exactly(twin_setup):
    source, twin, task_vector, calibration, images, reference = twin_setup
    result = transport(source, twin, task_vector, calibration, attention_maps="heads", progress=False)
    with torch.no_grad():
        output = apply_task_vector(copy.deepcopy(twin), result.task_vector)(images)
    assert float((output - reference).norm() / reference.norm()) <= 1e-5
    settings = result.report.settings
    assert settings["attention"] == "heads"
    matchings = settings["head_matching"]
    assert set(matchings) == {f"transformer.resblocks.{i}.attn:q" for i in range(2)}
    for matching in matchings.values():
        assert sorted(i for i, _ in matching) == [0, 1, 2, 3] and sorted(j for _, j in matching) == [0, 1, 2, 3]
    for key in result.report.keys:
        assert key.norm_ratio == pytest.approx(1.0, abs=1e-6), key.key
    # the q and k of a layer share one map, v and the context another; per_point keeps four
    plan = result.plan
    p = "transformer.resblocks.0.attn"
    assert torch.equal(plan.maps[f"{p}:q"], plan.maps[f"{p}:k"]) and torch.equal(plan.maps[f"{p}:v"], plan.maps[f"{p}:ctx"])
    per_point, _ = build_plan(source, twin, calibration, progress=False)
    assert per_point.metadata["attention"] == "per_point" and "head_matching" not in per_point.metadata


def test_a_memory_budget_keeps_each_attention_layer_in_one_pass():
    source, target = tiny_vit(width=32), tiny_vit(width=48, heads=6, image_size=20, seed=1)
    calibration = pairs(2, 16, 20)
    for derive in (True, False):  # derived q/k/v sit with ln_1:out, the context is captured on its own
        whole, _ = build_plan(source, target, calibration, attention="heads", progress=False, derive_linear_outputs=derive)
        budgeted, _ = build_plan(source, target, calibration, attention="heads", progress=False, memory_budget_bytes=1,
                                 derive_linear_outputs=derive)
        assert budgeted.metadata["head_matching"] == whole.metadata["head_matching"]
        for space, value in whole.maps.items():
            torch.testing.assert_close(budgeted.maps[space], value, atol=1e-9, rtol=0, msg=space)


def test_t5_head_aware_transport_preserves_norms():
    source, target = tiny_t5(32, 64, 4, 0), tiny_t5(48, 96, 6, 1)
    task_vector = random_task_vector(source, lambda key: "embed" not in key and "shared" not in key and "relative" not in key)
    result = transport(source, target, task_vector, t5_calibration(), attention_maps="heads", progress=False)
    assert len(result.report.settings["head_matching"]) == 2
    for key in result.report.keys:
        assert key.norm_ratio == pytest.approx(1.0, abs=1e-6), key.key


def test_head_aware_maps_refuse_what_they_cannot_map(twin_setup):
    source, twin, _, calibration, _, _ = twin_setup
    with pytest.raises(ValueError, match="unknown attention maps"):
        build_plan(source, twin, calibration, attention="per_head", progress=False)
    with pytest.raises(ValueError, match="cannot use them"):
        build_plan(source, twin, calibration, method="pinv", attention="heads", progress=False)
    # 32 wide with 4 heads (8 each) against 48 wide with 4 heads (12 each)
    other = tiny_vit(width=48, heads=4, seed=1)
    with pytest.raises(ShapeMismatchError, match="equal head widths"):
        build_plan(source, other, calibration, attention="heads", progress=False)
    residual = EmbeddedResidualNet(4, 8)
    with pytest.raises(ValueError, match="describes no attention heads"):
        build_plan(residual, copy.deepcopy(residual), [{"source": torch.randn(3, 4), "target": torch.randn(3, 4)}],
                   family=GenericLinearAdapter(), attention="heads", progress=False)


def test_head_aware_maps_on_a_deeper_wider_target_with_the_embedding_stage():
    source = tiny_vit(width=32, layers=2)
    target = tiny_vit(width=48, heads=6, layers=3, image_size=20, seed=1)
    task_vector = random_task_vector(source, lambda key: True)
    result = transport(source, target, task_vector, pairs(2, 16, 20), attention_maps="heads", transport_embeddings=True,
                       layer_map="interpolate", progress=False)
    target_state = target.state_dict()
    assert all(value.shape == target_state[key].shape for key, value in result.task_vector.items())
    # every target block (one of them interpolated from the source's two) gets its own matching of 4 heads into 6
    matchings = result.report.settings["head_matching"]
    assert len(matchings) == 3 and all(len(matching) == 4 for matching in matchings.values())
    assert "positional_embedding" in result.task_vector and not result.report.skipped.get("transformer.resblocks.2.attn.in_proj_weight")
