"""Peak memory of the calibration passes: streamed statistics per point, and budgets that bound memory."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import pytest
import torch
from torch import nn
from transformers import T5Config, T5EncoderModel

from theseus_transport import build_plan
from theseus_transport.families import GenericLinearAdapter, get_family
from theseus_transport.families.base import Capture
from theseus_transport.transport import CalibrationError, CrossStatistics, align_tokens
from theseus_transport.transport.engine import collect_statistics, measure_alignment

from twins import tiny_vit


def vit_case() -> tuple[str, nn.Module, nn.Module, list[dict], str]:
    """Tiny OpenCLIP towers of different widths and token counts (interpolate2d alignment)."""
    source, target = tiny_vit(width=32), tiny_vit(width=48, heads=6, image_size=20, seed=1)
    generator = torch.Generator().manual_seed(0)
    calibration = []
    for _ in range(2):
        images = torch.randn(4, 3, 20, 20, generator=generator)
        calibration.append({"source": nn.functional.interpolate(images, size=(16, 16), mode="bilinear"), "target": images})
    return "openclip", source, target, calibration, "interpolate2d"


def t5_case(gated: bool = False) -> tuple[str, nn.Module, nn.Module, list[dict], str]:
    """Tiny T5 encoders of different widths and heads, with padding masked out."""
    models = []
    for seed, (d_model, d_ff, heads) in enumerate([(32, 64, 4), (48, 96, 6)]):
        torch.manual_seed(seed)
        config = T5Config(vocab_size=384, d_model=d_model, d_ff=d_ff, num_heads=heads, d_kv=8, num_layers=2, dropout_rate=0.0,
                          feed_forward_proj="gated-gelu" if gated else "relu")
        models.append(T5EncoderModel(config).eval())
    generator = torch.Generator().manual_seed(0)
    calibration = []
    for _ in range(2):
        mask = torch.ones(4, 12, dtype=torch.long)
        mask[:, 9:] = 0
        batch = {"input_ids": torch.randint(0, 384, (4, 12), generator=generator), "attention_mask": mask}
        calibration.append({"source": batch, "target": batch})
    return "t5", models[0], models[1], calibration, "none"


CASES = {"openclip": vit_case, "t5": t5_case, "t5-gated": lambda: t5_case(gated=True)}


def all_spaces(adapter, encoder: nn.Module) -> list[str]:
    """Every capture point either map mode uses."""
    rules = [rule for mode in ("rank_aware", "paper") for rule in adapter.param_rules(encoder, mode).values() if not rule.skipped]
    return sorted(set().union(*(rule.spaces() for rule in rules)))


@torch.no_grad()
def previous_statistics(adapter, source, target, calibration, spaces, alignment, with_grams, batch_products) -> dict[str, CrossStatistics]:
    """The engine's previous algorithm: hold every point of both models for the batch, then update in sorted order."""
    statistics: dict[str, CrossStatistics] = {}
    with adapter.capture(source, set(spaces)) as source_capture, adapter.capture(target, set(spaces)) as target_capture:
        for item in calibration:
            adapter.forward(source, item["source"])
            adapter.forward(target, item["target"])
            for space in sorted(spaces):
                rows = align_tokens(source_capture.activations[space], target_capture.activations[space], alignment,
                                    adapter.token_mask(item["target"]))
                if space not in statistics:
                    statistics[space] = CrossStatistics(rows[0].shape[1], rows[1].shape[1], with_grams, batch_products=batch_products)
                statistics[space].update(*rows)
            source_capture.clear()
            target_capture.clear()
    return statistics


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("batch_products", ["float64", "float32"])
def test_streamed_statistics_equal_the_previous_path_bitwise(case, batch_products):
    family, source, target, calibration, alignment = CASES[case]()
    adapter = get_family(family)
    spaces = all_spaces(adapter, source)
    expected = previous_statistics(adapter, source, target, calibration, spaces, alignment, True, batch_products)
    # the captured path for every point (derived points are compared in test_transport_derived.py)
    streamed = collect_statistics(adapter, source, target, calibration, spaces, alignment, with_grams=True, progress=False,
                                  batch_products=batch_products, derive_linear_outputs=False)
    assert list(streamed) == sorted(expected)  # same points, in the same (sorted) order
    for space, stats in expected.items():
        produced = streamed[space]
        assert produced.count == stats.count, space
        for name in ("source_sum", "target_sum", "cross", "source_gram", "target_gram"):
            assert torch.equal(getattr(produced, name), getattr(stats, name)), (space, name)


@pytest.mark.parametrize("case", sorted(CASES))
def test_streamed_alignment_equals_the_previous_path(case):
    family, source, target, calibration, alignment = CASES[case]()
    adapter = get_family(family)
    spaces = all_spaces(adapter, source)
    generator = torch.Generator().manual_seed(1)
    widths = previous_statistics(adapter, source, target, calibration[:1], spaces, alignment, False, "float64")
    maps = {space: torch.randn(s.source_dim, s.target_dim, dtype=torch.float64, generator=generator) for space, s in widths.items()}
    expected = {}
    with torch.no_grad(), adapter.capture(source, set(maps)) as source_capture, adapter.capture(target, set(maps)) as target_capture:
        for item in calibration:
            adapter.forward(source, item["source"])
            adapter.forward(target, item["target"])
            for space, feature_map in maps.items():
                a, b = (rows.double() for rows in align_tokens(source_capture.activations[space], target_capture.activations[space],
                                                               alignment, adapter.token_mask(item["target"])))
                totals = expected.setdefault(space, [0.0, 0.0, 0])
                totals[0] += float(nn.functional.cosine_similarity(nn.functional.pad(a, (0, b.shape[1] - a.shape[1])), b, dim=1).sum())
                totals[1] += float(nn.functional.cosine_similarity(a @ feature_map, b, dim=1).sum())
                totals[2] += a.shape[0]
    measured = measure_alignment(adapter, source, target, maps, calibration, alignment)
    assert measured == {space: {"before": t[0] / t[2], "after": t[1] / t[2]} for space, t in expected.items()}


class HeldActivations:
    """Records, each time a capture point fires, the bytes of captured activations alive in all captures plus the new one."""

    def __init__(self) -> None:
        self.captures: list[Capture] = []
        self.fired: list[tuple[str, str, int]] = []  # (model, space, bytes)
        self.peak = 0

    def watch(self, capture: Capture, model: str) -> None:
        """Instrument `capture.put` (the hooks look it up on the instance at call time)."""
        original = capture.put

        def put(space: str, activation: torch.Tensor, sequence_first: bool | None = None) -> None:
            if capture.wants(space):
                held = sum(t.nbytes for c in self.captures for t in c.activations.values())
                self.peak = max(self.peak, held + activation.nbytes)
                self.fired.append((model, space, activation.nbytes))
            original(space, activation, sequence_first)

        capture.put = put
        self.captures.append(capture)


def recording_adapter(family: str, source: nn.Module, recorder: HeldActivations):
    """The family's adapter, with every capture it opens watched by `recorder`."""

    class Recording(type(get_family(family))):
        @contextlib.contextmanager
        def capture(self, encoder: nn.Module, spaces: set[str]) -> Iterator[Capture]:
            with super().capture(encoder, spaces) as capture:
                recorder.watch(capture, "source" if encoder is source else "target")
                yield capture

    return Recording()


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_models_activations_are_held_at_a_time(case):
    family, source, target, calibration, alignment = CASES[case]()
    recorder = HeldActivations()
    adapter = recording_adapter(family, source, recorder)
    collect_statistics(adapter, source, target, calibration[:1], all_spaces(adapter, source), alignment, progress=False)
    source_bytes = sum(size for model, _, size in recorder.fired if model == "source")
    target_sizes = [size for model, _, size in recorder.fired if model == "target"]
    assert len(target_sizes) > 1 and sum(target_sizes) > max(target_sizes)  # holding both would exceed the bound
    # the source pass's activations plus one target point at a time, never every point of both models
    assert recorder.peak <= source_bytes + max(target_sizes), (recorder.peak, source_bytes, sum(target_sizes))


def test_non_finite_and_missing_points_report_the_first_point_in_order():
    family, source, target, calibration, alignment = vit_case()
    adapter = get_family(family)
    spaces = all_spaces(adapter, source)
    poisoned = [dict(item) for item in calibration]
    poisoned[1]["source"] = poisoned[1]["source"].clone()
    poisoned[1]["source"][0, 0, 0, 0] = float("nan")
    # the NaN reaches every point; the error names the batch and the first point in sorted order, as before
    with pytest.raises(CalibrationError, match=rf"calibration batch 1, capture point '{spaces[0]}': .*NaN or Inf"):
        collect_statistics(adapter, source, target, poisoned, spaces, alignment, progress=False)
    with pytest.raises(CalibrationError, match="'a.missing:out' produced no activation in the source and target model"):
        collect_statistics(adapter, source, target, calibration, spaces + ["a.missing:out"], alignment, progress=False)


def test_a_point_firing_twice_in_one_pass_is_an_error():
    class Twice(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(width, width)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.blocks[0](self.blocks[0](x))

    calibration = [{"source": torch.randn(4, 3, 8), "target": torch.randn(4, 3, 12)}]
    with pytest.raises(CalibrationError, match="'blocks.0:in' produced more than one activation"):
        collect_statistics(GenericLinearAdapter(), Twice(8), Twice(12), calibration, ["blocks.0:in"], "none", progress=False)


def test_budget_releases_each_groups_statistics_before_the_next_pass(monkeypatch):
    source, target = tiny_vit(width=32), tiny_vit(width=48, heads=6, seed=1)
    calibration = [{"source": images, "target": images} for images in torch.randn(2, 4, 3, 16, 16, generator=torch.Generator().manual_seed(0))]
    accumulated: list[weakref.ref] = []
    update = CrossStatistics.update

    def tracked_update(self: CrossStatistics, source_rows: torch.Tensor, target_rows: torch.Tensor) -> None:
        if self.count == 0:
            accumulated.append(weakref.ref(self))
        update(self, source_rows, target_rows)

    monkeypatch.setattr(CrossStatistics, "update", tracked_update)
    alive_at_pass_start: list[int] = []

    class Recording(type(get_family("openclip"))):
        @contextlib.contextmanager
        def capture(self, encoder: nn.Module, spaces: set[str]) -> Iterator[Capture]:
            if encoder is source:  # each pass (and the probe) opens the source capture first
                alive_at_pass_start.append(sum(ref() is not None for ref in accumulated))
            with super().capture(encoder, spaces) as capture:
                yield capture

    plan, _ = build_plan(source, target, calibration, family=Recording(), memory_budget_bytes=256 * 1024, progress=False)
    assert len(alive_at_pass_start) >= 4  # the probe and at least three group passes
    derived = plan.metadata["derived_points"]
    assert derived  # q, k, v, attn out, c_proj out, proj:tokens
    assert len(accumulated) + len(derived) == len(plan.maps)  # every other point was accumulated, in some pass
    assert alive_at_pass_start == [0] * len(alive_at_pass_start)


def test_a_budget_refuses_one_shot_calibration_iterators():
    # with a budget the data is read several times: a generator would lose its probe batch silently
    source, target = tiny_vit(width=32), tiny_vit(width=48, heads=6, seed=1)
    batches = [{"source": images, "target": images} for images in torch.randn(2, 4, 3, 16, 16, generator=torch.Generator().manual_seed(0))]
    with pytest.raises(CalibrationError, match="one-shot generator"):
        build_plan(source, target, (batch for batch in batches), memory_budget_bytes=256 * 1024, progress=False)
    plan, _ = build_plan(source, target, batches, memory_budget_bytes=256 * 1024, progress=False)
    assert plan.maps
