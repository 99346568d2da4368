"""Statistics of linear outputs derived from their input point's statistics (benchmarks/README.md, proposal C)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from theseus_transport import build_plan, transport
from theseus_transport.families import get_family
from theseus_transport.transport import CrossStatistics, derive_linear_output
from theseus_transport.transport.engine import _statistics_groups, collect_statistics, linear_derivations

from test_transport_memory import CASES, HeldActivations, all_spaces, recording_adapter
from twins import random_task_vector

STATISTICS = ("source_sum", "target_sum", "cross", "source_gram", "target_gram")
NOT_TRANSPORTED = ("conv1", "class_embedding", "positional_embedding")


def double_case(case: str) -> tuple[str, nn.Module, nn.Module, list[dict], str]:
    """A case of test_transport_memory in float64, so captured outputs carry no float32 rounding to compare against."""
    family, source, target, calibration, alignment = CASES[case]()
    as_double = lambda value: value.double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value  # noqa: E731
    calibration = [
        {side: {k: as_double(v) for k, v in batch.items()} if isinstance(batch, dict) else as_double(batch) for side, batch in item.items()}
        for item in calibration
    ]
    return family, source.double(), target.double(), calibration, alignment


def relative(produced: torch.Tensor, expected: torch.Tensor) -> float:
    return float((produced - expected).norm() / expected.norm())


@pytest.mark.parametrize("biases", ["both", "source", "target", "none"])
def test_derive_linear_output_equals_the_statistics_of_the_outputs(biases):
    generator = torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, dtype=torch.float64, generator=generator)  # noqa: E731
    # inputs with non-zero means, so every bias term of the formula matters
    inputs = [(randn(40, 5) + 1.0, randn(40, 7) - 0.5) for _ in range(3)]
    weight_a, weight_b = randn(6, 5), randn(9, 7)
    bias_a = randn(6) if biases in ("both", "source") else None
    bias_b = randn(9) if biases in ("both", "target") else None
    input_stats, output_stats = CrossStatistics(5, 7, with_grams=True), CrossStatistics(6, 9, with_grams=True)
    for x_a, x_b in inputs:
        input_stats.update(x_a, x_b)
        y_a, y_b = x_a @ weight_a.T, x_b @ weight_b.T
        output_stats.update(y_a if bias_a is None else y_a + bias_a, y_b if bias_b is None else y_b + bias_b)
    derived = derive_linear_output(input_stats, weight_a, bias_a, weight_b, bias_b)
    assert (derived.source_dim, derived.target_dim, derived.count) == (6, 9, 120)
    for name in STATISTICS:
        assert relative(getattr(derived, name), getattr(output_stats, name)) < 1e-12, name
    # float32 weights are used as float64 (cast first, never a float32 product)
    from_float32 = derive_linear_output(input_stats, weight_a.float(), bias_a, weight_b.float(), bias_b)
    expected = derive_linear_output(input_stats, weight_a.float().double(), bias_a, weight_b.float().double(), bias_b)
    for name in STATISTICS:
        assert getattr(from_float32, name).dtype == torch.float64
        assert torch.equal(getattr(from_float32, name), getattr(expected, name)), name


def test_derive_linear_output_checks_widths():
    stats = CrossStatistics(3, 4)
    stats.update(torch.randn(5, 3), torch.randn(5, 4))
    with pytest.raises(Exception, match="inputs of width 4 and 4"):
        derive_linear_output(stats, torch.randn(2, 4), None, torch.randn(2, 4), None)


EXPECTED_DERIVED = {
    "openclip": {"proj:tokens"} | {f"transformer.resblocks.{i}.{name}" for i in range(2)
                                   for name in ("attn:q", "attn:k", "attn:v", "attn:out", "mlp.c_fc:out", "mlp.c_proj:out")},
    "t5": {f"encoder.block.{i}.{name}" for i in range(2) for name in (
        "layer.0.SelfAttention.q:out", "layer.0.SelfAttention.k:out", "layer.0.SelfAttention.v:out",
        "layer.0.SelfAttention.o:out", "layer.1.DenseReluDense.wi:out", "layer.1.DenseReluDense.wo:out")},
    "t5-gated": {f"encoder.block.{i}.{name}" for i in range(2) for name in (
        "layer.0.SelfAttention.q:out", "layer.0.SelfAttention.k:out", "layer.0.SelfAttention.v:out",
        "layer.0.SelfAttention.o:out", "layer.1.DenseReluDense.wi_0:out", "layer.1.DenseReluDense.wi_1:out",
        "layer.1.DenseReluDense.wo:out")},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_derived_statistics_equal_the_captured_ones(case):
    # openclip: different token counts (interpolate2d); t5: padding masked out
    family, source, target, calibration, alignment = double_case(case)
    adapter = get_family(family)
    spaces = all_spaces(adapter, source)
    assert set(linear_derivations(adapter, source, target, spaces)) == EXPECTED_DERIVED[case]
    derived = collect_statistics(adapter, source, target, calibration, spaces, alignment, with_grams=True, progress=False)
    captured = collect_statistics(adapter, source, target, calibration, spaces, alignment, with_grams=True, progress=False,
                                  derive_linear_outputs=False)
    assert list(derived) == list(captured)
    for space in spaces:
        assert derived[space].count == captured[space].count, space
        for name in STATISTICS:
            assert relative(getattr(derived[space], name), getattr(captured[space], name)) < 1e-10, (space, name)


def test_a_linear_output_is_captured_when_its_input_is_not_collected():
    family, source, target, calibration, alignment = double_case("openclip")
    adapter = get_family(family)
    wanted = ["transformer.resblocks.0.attn:q", "transformer.resblocks.0.mlp.c_proj:out", "transformer.resblocks.0.mlp.c_proj:in"]
    assert set(linear_derivations(adapter, source, target, wanted)) == {"transformer.resblocks.0.mlp.c_proj:out"}
    statistics = collect_statistics(adapter, source, target, calibration, wanted, alignment, progress=False)
    assert sorted(statistics) == sorted(wanted)


@pytest.mark.parametrize("case", ["openclip", "t5-gated"])
@pytest.mark.parametrize("map_mode", ["rank_aware", "paper"])
def test_transported_task_vectors_agree_with_derivation_on_and_off(case, map_mode):
    family, source, target, calibration, alignment = double_case(case)
    keep = (lambda key: not key.startswith(NOT_TRANSPORTED)) if family == "openclip" else (lambda key: "shared" not in key)
    task_vector = random_task_vector(source, keep)
    on = transport(source, target, task_vector, calibration, map_mode=map_mode, progress=False)
    off = transport(source, target, task_vector, calibration, map_mode=map_mode, progress=False, derive_linear_outputs=False)
    assert on.plan.metadata["derived_points"] and not off.plan.metadata["derived_points"]
    assert on.task_vector.keys() == off.task_vector.keys()
    deficient = {space for space, rank in off.report.ranks.items() if rank["rank"] < rank["full_rank"]}
    if map_mode == "paper":
        # paper mode fills a rank-deficient map's null space with whatever the SVD returns (DESIGN item 8),
        # which a 1e-16 change of the matrix may turn around: compare those maps on their determined part,
        # C^T R = V Sigma V^T, which the fill does not enter
        assert deficient & set(on.plan.metadata["derived_points"])  # c_fc / wi outputs: rank <= width + 1
        statistics = collect_statistics(get_family(family), source, target, calibration, deficient, alignment, progress=False,
                                        derive_linear_outputs=False)
        for space in deficient:
            cross = statistics[space].cross_covariance()
            assert relative(cross.T @ on.plan.maps[space], cross.T @ off.plan.maps[space]) < 1e-9, space
    else:
        assert not deficient
    compared = 0
    for key, value in off.task_vector.items():
        if deficient & off.plan.rules[key].spaces():
            continue
        compared += 1
        assert float((on.task_vector[key] - value).norm()) <= 1e-9 * max(float(value.norm()), 1e-30), key
    assert compared > len(off.task_vector) // 2


def test_derived_points_are_not_accumulated_per_batch(monkeypatch):
    family, source, target, calibration, alignment = CASES["openclip"]()
    updated: list[int] = []
    update = CrossStatistics.update

    def tracked_update(self: CrossStatistics, source_rows: torch.Tensor, target_rows: torch.Tensor) -> None:
        updated.append(id(self))
        update(self, source_rows, target_rows)

    monkeypatch.setattr(CrossStatistics, "update", tracked_update)
    for derive in (True, False):
        recorder = HeldActivations()
        adapter = recording_adapter(family, source, recorder)
        spaces = all_spaces(adapter, source)
        updated.clear()
        statistics = collect_statistics(adapter, source, target, calibration, spaces, alignment, progress=False,
                                        derive_linear_outputs=derive)
        fired = {space for _, space, _ in recorder.fired}
        accumulated = {space for space, stats in statistics.items() if id(stats) in set(updated)}
        derived = EXPECTED_DERIVED["openclip"]
        if derive:
            # neither captured (no activation, no alignment) nor updated per batch: computed once from the input
            assert not fired & derived and not accumulated & derived
            assert accumulated == fired == set(spaces) - derived
            assert len(updated) == len(calibration) * len(accumulated)
        else:
            assert accumulated == fired == set(spaces)


def test_a_budget_keeps_each_derived_point_in_its_inputs_pass():
    family, source, target, calibration, alignment = double_case("openclip")
    adapter = get_family(family)
    spaces = sorted(all_spaces(adapter, source))
    derivations = linear_derivations(adapter, source, target, spaces)
    groups = _statistics_groups(adapter, source, target, calibration, spaces, False, 64 * 1024, derivations=derivations)
    assert len(groups) > 3
    assert sorted(space for group in groups for space in group) == spaces
    for group in groups:
        assert all(derivations[space].input_space in group for space in group if space in derivations)
    budgeted, _ = build_plan(source, target, calibration, family=family, memory_budget_bytes=64 * 1024, progress=False)
    unbudgeted, _ = build_plan(source, target, calibration, family=family, progress=False)
    assert budgeted.maps.keys() == unbudgeted.maps.keys()
    for space, matrix in unbudgeted.maps.items():
        assert torch.equal(budgeted.maps[space], matrix), space


def test_generic_adapter_derives_every_linear_output_from_its_input():
    from test_transport_exactness import EmbeddedResidualNet
    from theseus_transport.families import GenericLinearAdapter

    torch.manual_seed(0)
    source, target = EmbeddedResidualNet(8, 16).double(), EmbeddedResidualNet(12, 20).double()
    calibration = [(chunk, torch.randn(64, 12, dtype=torch.float64)) for chunk in torch.randn(3, 64, 8, dtype=torch.float64)]
    adapter = GenericLinearAdapter()
    spaces = {f"blocks.{i}.{layer}:{side}" for i in range(2) for layer in ("fc1", "fc2") for side in ("in", "out")}
    derived = collect_statistics(adapter, source, target, calibration, spaces, "none", progress=False)
    captured = collect_statistics(adapter, source, target, calibration, spaces, "none", progress=False,
                                  derive_linear_outputs=False)
    assert set(linear_derivations(adapter, source, target, spaces)) == {s for s in spaces if s.endswith(":out")}
    for space in spaces:
        assert relative(derived[space].cross, captured[space].cross) < 1e-10, space
        assert relative(derived[space].source_sum, captured[space].source_sum) < 1e-10, space
