"""Statistics, token alignment, T5, determinism, plans, depth and bad input (issue 2, Must show)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn
from safetensors.torch import save_file
from transformers import T5Config, T5EncoderModel

from theseus_transport import LayerMap, TransportPlan, apply_task_vector, build_plan, load_task_vector, save_task_vector, transport
from theseus_transport.transport.io import check_writable, staged_writes
from theseus_transport.transport import (
    CalibrationError,
    CorruptFileError,
    CrossStatistics,
    DepthMismatchError,
    FamilyMismatchError,
    HashMismatchError,
    NonFiniteError,
    OutputExistsError,
    OutputPathError,
    ShapeMismatchError,
    SharedParameterError,
    TaskVectorKeyError,
    UnknownNameError,
    align_tokens,
    expand_state_dict,
    interpolate_tokens_2d,
)
from theseus_transport.transport.engine import plan_groups

from twins import random_task_vector, tiny_vit

NOT_TRANSPORTED = ("conv1", "class_embedding", "positional_embedding")


def images(count: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def pairs(batches: int, size_a: int = 16, size_b: int = 16, batch: int = 8) -> list[dict]:
    out = []
    for index in range(batches):
        base = images(batch, 32, seed=index)
        resize = lambda x, s: torch.nn.functional.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)  # noqa: E731
        out.append({"source": resize(base, size_a), "target": resize(base, size_b)})
    return out


def test_streaming_statistics_equal_concatenated():
    generator = torch.Generator().manual_seed(0)
    chunks_a = [torch.randn(50, 6, generator=generator) for _ in range(5)]
    chunks_b = [torch.randn(50, 9, generator=generator) for _ in range(5)]
    streamed = CrossStatistics(6, 9, with_grams=True)
    for a, b in zip(chunks_a, chunks_b):
        streamed.update(a, b)
    all_a, all_b = torch.cat(chunks_a).double(), torch.cat(chunks_b).double()
    assert streamed.count == 250
    assert (streamed.cross_covariance() - all_a.T @ all_b).abs().max() <= 1e-12
    centered_a, centered_b = all_a - all_a.mean(0), all_b - all_b.mean(0)
    assert (streamed.cross_covariance(center=True) - centered_a.T @ centered_b).abs().max() <= 1e-12
    assert (streamed.gram("target") - all_b.T @ all_b).abs().max() <= 1e-12
    assert streamed.nbytes() == 8 * (6 + 9 + 54 + 36 + 81)


def test_token_alignment_keeps_cls_and_leaves_identical_grids():
    source = torch.randn(2, 197, 8)
    resized = interpolate_tokens_2d(source, 226)
    assert resized.shape == (2, 226, 8)
    assert torch.equal(resized[:, 0], source[:, 0])
    assert interpolate_tokens_2d(source, 197) is source
    constant = torch.ones(1, 197, 3)
    assert torch.allclose(interpolate_tokens_2d(constant, 226), torch.ones(1, 226, 3))
    rows_a, rows_b = align_tokens(torch.randn(2, 197, 8), torch.randn(2, 226, 12), "interpolate2d")
    assert rows_a.shape == (452, 8) and rows_b.shape == (452, 12)
    mean_a, _ = align_tokens(source, torch.randn(2, 226, 4), "mean")
    assert mean_a.shape == (2, 8)
    with pytest.raises(ValueError, match="token counts differ"):
        align_tokens(source, torch.randn(2, 226, 4), "none")


def test_different_image_sizes_transport():
    source, target = tiny_vit(width=32, image_size=16), tiny_vit(width=48, heads=6, image_size=20, output_dim=24, seed=1)
    task_vector = random_task_vector(source, lambda key: not key.startswith(NOT_TRANSPORTED))
    result = transport(source, target, task_vector, pairs(2, 16, 20), held_out=pairs(1, 16, 20), progress=False)
    assert result.report.settings["token_alignment"] == "interpolate2d"
    target_state = target.state_dict()
    for key, value in result.task_vector.items():
        assert value.shape == target_state[key].shape
    # the maps align the models better than zero-padding does
    after = [v["after"] for v in result.report.alignment.values()]
    before = [v["before"] for v in result.report.alignment.values()]
    assert sum(after) > sum(before)


def tiny_t5(d_model: int, d_ff: int, heads: int, seed: int, gated: bool = False, layers: int = 2) -> T5EncoderModel:
    torch.manual_seed(seed)
    config = T5Config(vocab_size=384, d_model=d_model, d_ff=d_ff, num_heads=heads, d_kv=8, num_layers=layers,
                      feed_forward_proj="gated-gelu" if gated else "relu", dropout_rate=0.0)
    return T5EncoderModel(config).eval()


@pytest.mark.parametrize("gated", [False, True])
def test_t5_pair_with_different_widths_and_heads(gated):
    source, target = tiny_t5(32, 64, 4, 0, gated), tiny_t5(48, 96, 6, 1, gated)
    task_vector = random_task_vector(source, lambda key: "relative" not in key)
    generator = torch.Generator().manual_seed(0)
    calibration = []
    for _ in range(3):
        ids = torch.randint(0, 384, (8, 24), generator=generator)
        mask = torch.ones(8, 24, dtype=torch.long)
        mask[:, 20:] = 0  # padding: must stay out of the statistics
        batch = {"input_ids": ids, "attention_mask": mask}
        calibration.append({"source": batch, "target": batch})
    result = transport(source, target, task_vector, calibration, progress=False)
    assert result.plan.family == "t5"
    target_state = target.state_dict()
    # the token table is not transported by default (DESIGN item 5): reported, and left out (a zero update)
    embedding_keys = {"shared.weight", "encoder.embed_tokens.weight"}
    assert embedding_keys <= set(result.report.skipped) and embedding_keys <= set(task_vector)
    assert set(result.task_vector) == set(task_vector) - embedding_keys
    for key, value in result.task_vector.items():
        assert value.shape == target_state[key].shape
    for key in result.report.keys:
        assert abs(key.norm_ratio - 1.0) <= 1e-6, key
    tokens = next(iter(result.plan.metadata["calibration_tokens"].values()))
    assert tokens == 3 * 8 * 20


def t5_pair(config_class: type, model_class: type) -> tuple[nn.Module, nn.Module]:
    """A source (32 wide, 4 heads) and a wider target (48, 6) of one T5-family class, random weights."""
    def build(d_model: int, heads: int, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        config = config_class(vocab_size=384, d_model=d_model, d_ff=2 * d_model, num_heads=heads, d_kv=8, num_layers=2,
                              dropout_rate=0.0)
        return model_class(config).eval()

    return build(32, 4, 0), build(48, 6, 1)


@pytest.mark.parametrize("kind", ["MT5", "UMT5"])
def test_mt5_and_umt5_encoders_transport_with_their_own_keys(kind):
    import transformers

    source, target = t5_pair(getattr(transformers, f"{kind}Config"), getattr(transformers, f"{kind}EncoderModel"))
    task_vector = random_task_vector(source, lambda key: "relative_attention_bias" not in key)
    result = transport(source, target, task_vector, t5_calibration(2), progress=False)  # family detected
    assert result.plan.family == "t5"
    transported = {key for key in result.task_vector if key not in result.report.skipped}
    assert "encoder.block.1.layer.1.DenseReluDense.wo.weight" in transported  # the encoder model's own key names
    apply_task_vector(target, result.task_vector)


def test_whole_t5_models_are_detected_and_decoder_stacks_refused():
    from transformers import T5ForConditionalGeneration

    source, target = t5_pair(T5Config, T5ForConditionalGeneration)
    encoder_vector = random_task_vector(source.get_encoder(), lambda key: "relative_attention_bias" not in key)
    result = transport(source, target, encoder_vector, t5_calibration(2), progress=False)  # no family given
    assert result.plan.family == "t5" and "block.0.layer.0.SelfAttention.q.weight" in result.task_vector
    with pytest.raises((FamilyMismatchError, UnknownNameError)):
        transport(source.decoder, target.decoder, {}, t5_calibration(1), family="t5", progress=False)


@pytest.mark.parametrize("kind", ["T5", "MT5", "UMT5"])
def test_embedding_transport_refuses_a_whole_t5_target_whose_decoder_shares_the_token_table(kind):
    import transformers

    source, target = t5_pair(getattr(transformers, f"{kind}Config"), getattr(transformers, f"{kind}ForConditionalGeneration"))
    assert target.decoder.embed_tokens.weight is target.encoder.embed_tokens.weight  # one table, as loaded
    encoder_vector = random_task_vector(source.get_encoder(), lambda key: "relative_attention_bias" not in key)
    before = {key: value.clone() for key, value in target.state_dict().items()}
    # the encoder's embedding update would also move the decoder's table and the tied LM head: refused, naming them
    with pytest.raises(SharedParameterError, match=rf"decoder\.embed_tokens\.weight.*{kind}EncoderModel"):
        transport(source, target, encoder_vector, t5_calibration(1), transport_embeddings=True, progress=False)
    assert all(torch.equal(value, before[key]) for key, value in target.state_dict().items())
    if kind != "T5":
        return
    # the remedy the message gives: the encoder gets its own copy, and only the encoder's table moves
    target.encoder.set_input_embeddings(copy.deepcopy(target.shared))
    result = transport(source, target, encoder_vector, t5_calibration(2), transport_embeddings=True, progress=False)
    assert "embed_tokens.weight" in result.task_vector
    apply_task_vector(target.get_encoder(), result.task_vector)
    assert not torch.equal(target.encoder.embed_tokens.weight, before["encoder.embed_tokens.weight"])
    for key in ("shared.weight", "decoder.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(target.state_dict()[key], before[key]), key


def t5_calibration(batches: int = 3) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    items = []
    for _ in range(batches):
        batch = {"input_ids": torch.randint(0, 384, (8, 24), generator=generator), "attention_mask": torch.ones(8, 24, dtype=torch.long)}
        items.append({"source": batch, "target": batch})
    return items


def test_t5_depth_expansion_transport():
    # only block 0 of a T5 stack owns the relative attention bias; expanded blocks must not invent keys
    source, deep = tiny_t5(32, 64, 4, 0, layers=2), tiny_t5(48, 96, 6, 1, layers=4)
    task_vector = random_task_vector(source, lambda key: "embed" not in key and "shared" not in key)
    with pytest.raises(DepthMismatchError, match="layer_map"):
        transport(source, deep, task_vector, t5_calibration(1), progress=False)
    result = transport(source, deep, task_vector, t5_calibration(), layer_map="interpolate", progress=False)
    state = deep.state_dict()
    assert set(result.task_vector) <= set(state)
    assert all(result.task_vector[k].shape == state[k].shape for k in result.task_vector)
    assert {f"encoder.block.{i}.layer.1.DenseReluDense.wo.weight" for i in range(4)} <= set(result.task_vector)
    bias = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    assert bias in result.report.skipped and bias not in result.task_vector
    updated = apply_task_vector(copy.deepcopy(deep), result.task_vector)
    batch = t5_calibration(1)[0]["target"]
    with torch.no_grad():
        before, after = deep(**batch).last_hidden_state, updated(**batch).last_hidden_state
    assert torch.isfinite(after).all() and not torch.allclose(before, after)


def test_t5_layer_maps_keep_the_relative_bias_in_the_first_block_whatever_they_blend():
    from theseus_transport.families.t5 import T5EncoderAdapter
    from theseus_transport.transport import expand_module

    source = tiny_t5(32, 64, 4, 0, layers=4)
    blocks, prefix = T5EncoderAdapter().blocks(source), T5EncoderAdapter().block_prefix(source)
    bias = "layer.0.SelfAttention.relative_attention_bias.weight"
    source_bias = source.state_dict()[f"{prefix}.0.{bias}"]
    # odd blocks only: target block 0 blends nothing of block 0, yet it is the block that computes the position bias
    odd = expand_module(source, blocks, prefix, LayerMap((((1, 1.0),), ((3, 1.0),))))
    state = odd.state_dict()
    assert torch.equal(state[f"{prefix}.0.{bias}"], source_bias) and f"{prefix}.1.{bias}" not in state
    assert torch.equal(state[f"{prefix}.1.layer.1.DenseReluDense.wo.weight"], source.state_dict()[f"{prefix}.3.layer.1.DenseReluDense.wo.weight"])
    # a blend is the same whichever order its blocks are listed in (one order used to crash)
    forward = expand_module(source, blocks, prefix, LayerMap((((0, 0.5), (1, 0.5)), ((1, 0.5), (0, 0.5)))))
    backward = expand_module(source, blocks, prefix, LayerMap((((1, 0.5), (0, 0.5)), ((0, 0.5), (1, 0.5)))))
    assert forward.state_dict().keys() == backward.state_dict().keys()
    assert all(torch.equal(value, backward.state_dict()[key]) for key, value in forward.state_dict().items())
    assert f"{prefix}.1.{bias}" not in forward.state_dict()  # only the first block owns it
    # through the engine: no skipped key that neither model has
    deep = tiny_t5(48, 96, 6, 1, layers=2)
    task_vector = random_task_vector(source, lambda key: "embed" not in key and "shared" not in key)
    result = transport(source, deep, task_vector, t5_calibration(), layer_map=LayerMap((((1, 1.0),), ((3, 1.0),))),
                       progress=False)
    assert set(result.report.skipped) <= set(source.state_dict()) | set(deep.state_dict())
    # the bias of source block 0 is carried into target block 0, so it is not one of the dropped keys
    from theseus_transport.transport.layermap import unmapped_block_keys

    keys = list(source.state_dict())
    dropped = unmapped_block_keys(keys, prefix, LayerMap((((1, 1.0),), ((3, 1.0),))), reference_keys=keys)
    assert f"{prefix}.0.{bias}" not in dropped and f"{prefix}.0.layer.1.DenseReluDense.wo.weight" in dropped
    assert "no target block" not in result.report.skipped[f"{prefix}.0.{bias}"]  # skipped for being a position table


def test_bitwise_deterministic_on_cpu():
    source, target = tiny_vit(width=32), tiny_vit(width=48, heads=6, seed=1)
    task_vector = random_task_vector(source, lambda key: not key.startswith(NOT_TRANSPORTED))
    for method in ("theseus", "random", "random_maps"):
        first = transport(source, target, task_vector, pairs(2), method=method, seed=3, progress=False).task_vector
        second = transport(source, target, task_vector, pairs(2), method=method, seed=3, progress=False).task_vector
        assert all(torch.equal(first[k], second[k]) for k in first), method


@pytest.mark.parametrize("method", ["zero_pad", "random", "random_maps", "pinv", "pinv_ridge", "decoupled_ls", "decoupled_orth"])
def test_baselines_share_the_signature(method):
    source, target = tiny_vit(width=32), tiny_vit(width=48, heads=6, seed=1)
    task_vector = random_task_vector(source, lambda key: not key.startswith(NOT_TRANSPORTED))
    result = transport(source, target, task_vector, pairs(2), method=method, progress=False)
    target_state = target.state_dict()
    assert set(result.task_vector) == set(task_vector)
    assert all(result.task_vector[k].shape == target_state[k].shape for k in result.task_vector)
    if method in ("random", "zero_pad"):
        # random keeps the norm by construction; zero-padding into a wider model loses nothing
        assert all(abs(k.norm_ratio - 1) < 1e-6 for k in result.report.keys)


def test_zero_pad_embeds_source_update():
    source, target = tiny_vit(width=32), tiny_vit(width=48, heads=6, seed=1)
    task_vector = random_task_vector(source, lambda key: key.endswith("mlp.c_proj.weight"))
    result = transport(source, target, task_vector, pairs(1), method="zero_pad", progress=False)
    key = "transformer.resblocks.0.mlp.c_proj.weight"
    assert torch.equal(result.task_vector[key][:32, :128], task_vector[key])
    assert result.task_vector[key][32:].abs().sum() == 0


def test_plan_saves_loads_and_applies_to_many_task_vectors(tmp_path):
    source, target = tiny_vit(width=32), tiny_vit(width=48, heads=6, seed=1)
    plan, _ = build_plan(source, target, pairs(2), progress=False)
    plan.save(tmp_path / "plan.safetensors")
    loaded = TransportPlan.load(tmp_path / "plan.safetensors")
    for seed in (2, 3):
        task_vector = random_task_vector(source, lambda key: not key.startswith(NOT_TRANSPORTED), seed=seed)
        direct, _, _ = plan.apply(task_vector)
        again, _, _ = loaded.apply(task_vector)
        assert all(torch.equal(direct[k], again[k]) for k in direct)


def test_alpha_scales_the_update():
    source, target = tiny_vit(width=32), tiny_vit(width=48, heads=6, seed=1)
    task_vector = random_task_vector(source, lambda key: not key.startswith(NOT_TRANSPORTED))
    one = transport(source, target, task_vector, pairs(2), progress=False).task_vector
    half = transport(source, target, task_vector, pairs(2), alpha=0.5, progress=False).task_vector
    assert all(torch.allclose(half[k], 0.5 * one[k], atol=1e-7) for k in one)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="alpha must be a finite number"):
            transport(source, target, task_vector, pairs(2), alpha=bad, progress=False)
        with pytest.raises(ValueError, match="alpha must be a finite number"):
            apply_task_vector(copy.deepcopy(target), one, alpha=bad)


def test_layer_map_interpolation_is_the_paper_rule():
    assert LayerMap.interpolated(3, 6).sources == (
        ((0, 1.0),), ((0, 0.5), (1, 0.5)), ((1, 1.0),), ((1, 0.5), (2, 0.5)), ((2, 1.0),), ((2, 1.0),)
    )
    state = {"blocks.0.w": torch.tensor([0.0]), "blocks.1.w": torch.tensor([2.0]), "head": torch.tensor([5.0])}
    expanded = expand_state_dict(state, "blocks", LayerMap.interpolated(2, 4))
    assert [float(expanded[f"blocks.{i}.w"]) for i in range(4)] == [0.0, 1.0, 2.0, 2.0]
    assert float(expanded["head"]) == 5.0
    # a task vector's missing key is a zero update of that block, not a block left out of the blend
    update = {"blocks.0.w": torch.tensor([2.0])}
    sparse = expand_state_dict(update, "blocks", LayerMap.interpolated(2, 4), reference_keys=state)
    assert [float(sparse[f"blocks.{i}.w"]) for i in range(2)] == [2.0, 1.0] and "blocks.2.w" not in sparse
    # a parameter only the first block has (T5's relative attention bias) stays the first block's
    only_first = {"blocks.0.bias": torch.tensor([4.0]), "blocks.0.w": torch.tensor([0.0]), "blocks.1.w": torch.tensor([2.0])}
    expanded = expand_state_dict(only_first, "blocks", LayerMap.interpolated(2, 4))
    assert float(expanded["blocks.0.bias"]) == 4.0 and not {"blocks.1.bias", "blocks.2.bias", "blocks.3.bias"} & set(expanded)
    # one that some later blocks have is blended over those blocks
    some = {"blocks.0.w": torch.tensor([0.0]), "blocks.1.w": torch.tensor([2.0]), "blocks.1.extra": torch.tensor([6.0]),
            "blocks.2.w": torch.tensor([4.0])}
    assert float(expand_state_dict(some, "blocks", LayerMap((((1, 0.5), (2, 0.5)),)))["blocks.0.extra"]) == 6.0


def test_depth_expansion_transport():
    source, deep = tiny_vit(width=32, layers=2), tiny_vit(width=48, heads=6, layers=4, seed=1)
    task_vector = random_task_vector(source, lambda key: not key.startswith(NOT_TRANSPORTED))
    with pytest.raises(DepthMismatchError, match="layer_map"):
        transport(source, deep, task_vector, pairs(1), progress=False)
    result = transport(source, deep, task_vector, pairs(2), layer_map="interpolate", progress=False)
    state = deep.state_dict()
    assert "transformer.resblocks.3.mlp.c_fc.weight" in result.task_vector
    assert all(result.task_vector[k].shape == state[k].shape for k in result.task_vector)
    # leaving block 1's update out equals giving it an explicit zero update (it used to count double)
    key = "transformer.resblocks.1.mlp.c_proj.weight"
    omitted = {k: v for k, v in task_vector.items() if k != key}
    zeroed = {**task_vector, key: torch.zeros_like(task_vector[key])}
    without = transport(source, deep, omitted, pairs(2), layer_map="interpolate", progress=False).task_vector
    with_zero = transport(source, deep, zeroed, pairs(2), layer_map="interpolate", progress=False).task_vector
    assert all(torch.allclose(with_zero[k], without[k], atol=1e-7) for k in without)


def test_a_shallower_target_needs_a_layer_map_and_reports_the_blocks_it_leaves_out():
    source, shallow = tiny_vit(width=32, layers=4), tiny_vit(width=48, heads=6, layers=2, seed=1)
    task_vector = random_task_vector(source, lambda key: not key.startswith(NOT_TRANSPORTED))
    with pytest.raises(DepthMismatchError, match="expands a shallower source"):
        transport(source, shallow, task_vector, pairs(1), layer_map="interpolate", progress=False)
    averaged = LayerMap((((0, 0.5), (1, 0.5)), ((2, 0.5), (3, 0.5))))
    result = transport(source, shallow, task_vector, pairs(2), layer_map=averaged, progress=False)
    assert not any(".resblocks." in key for key in result.report.skipped)  # every block is used
    every_other = LayerMap((((0, 1.0),), ((2, 1.0),)))
    result = transport(source, shallow, task_vector, pairs(2), layer_map=every_other, progress=False)
    dropped = {key for key in task_vector if key.startswith(("transformer.resblocks.1.", "transformer.resblocks.3."))}
    assert dropped and dropped <= set(result.report.skipped)
    assert all("no target block" in result.report.skipped[key] for key in dropped)


def test_a_first_block_only_parameter_carried_by_a_layer_map_is_not_reported_dropped():
    from theseus_transport.families import GenericLinearAdapter

    class Stack(nn.Module):
        """One Linear per block; block 0 also has `first` (a first-block-only parameter, like T5's position bias)."""

        def __init__(self, width: int, depth: int, seed: int) -> None:
            super().__init__()
            torch.manual_seed(seed)
            self.blocks = nn.ModuleList(nn.ModuleDict({"fc": nn.Linear(width, width)}) for _ in range(depth))
            self.blocks[0]["first"] = nn.Linear(width, width)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.blocks[0]["first"](x)
            for block in self.blocks:
                x = x + torch.tanh(block["fc"](x))
            return x

    source, shallow = Stack(4, 4, 0), Stack(6, 2, 1)
    task_vector = random_task_vector(source, lambda key: True)
    generator = torch.Generator().manual_seed(0)
    calibration = [(torch.randn(8, 5, 4, generator=generator), torch.randn(8, 5, 6, generator=generator)) for _ in range(3)]
    # source block 0 is in no target block, yet its `first` goes to target block 0 (expand_state_dict)
    result = transport(source, shallow, task_vector, calibration, family=GenericLinearAdapter(),
                       layer_map=LayerMap((((1, 1.0),), ((3, 1.0),))), progress=False)
    transported = {key.key for key in result.report.keys}
    assert {"blocks.0.first.weight", "blocks.0.first.bias"} <= transported
    assert not {"blocks.0.first.weight", "blocks.0.first.bias"} & set(result.report.skipped)
    assert all("no target block" in result.report.skipped[key] for key in ("blocks.0.fc.weight", "blocks.2.fc.weight"))


# ---- bad input: named errors, nothing written ------------------------------------------------

def test_family_mismatch():
    with pytest.raises(FamilyMismatchError):
        transport(tiny_vit(), tiny_t5(32, 64, 4, 0), {}, pairs(1), family="openclip", progress=False)


def test_unknown_key_and_wrong_shape():
    source, target = tiny_vit(width=32), tiny_vit(width=48, heads=6, seed=1)
    with pytest.raises(TaskVectorKeyError, match="visual."):
        transport(source, target, {"visual.ln_post.weight": torch.zeros(32)}, pairs(1), progress=False)
    with pytest.raises(ShapeMismatchError, match="ln_post.weight"):
        transport(source, target, {"ln_post.weight": torch.zeros(33)}, pairs(1), progress=False)


def test_empty_and_non_finite_calibration():
    source, target = tiny_vit(width=32), tiny_vit(width=48, heads=6, seed=1)
    task_vector = {"ln_post.weight": torch.ones(32)}
    with pytest.raises(CalibrationError, match="empty"):
        transport(source, target, task_vector, [], progress=False)
    poisoned = pairs(1)
    poisoned[0]["source"][0, 0, 0, 0] = float("nan")
    with pytest.raises(CalibrationError, match="NaN or Inf"):
        transport(source, target, task_vector, poisoned, progress=False)
    unpaired = [{"source": images(4), "target": images(3)}]
    with pytest.raises(CalibrationError, match="same examples"):
        transport(source, target, task_vector, unpaired, progress=False)


def test_corrupt_truncated_and_tampered_files(tmp_path):
    tensors = {"a": torch.randn(4, 4), "b": torch.randn(3)}
    path = save_task_vector(tmp_path / "tv.safetensors", tensors, {"family": "openclip", "task": "x"})
    loaded, info = load_task_vector(path)
    assert torch.equal(loaded["a"], tensors["a"]) and info["num_parameters"] == 19 and info["family"] == "openclip"
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) - 10])
    (tmp_path / "truncated.json").write_text((tmp_path / "tv.json").read_text())
    with pytest.raises(CorruptFileError):
        load_task_vector(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CorruptFileError):
        load_task_vector(garbage)
    tampered = tmp_path / "tampered.safetensors"
    save_file({"a": tensors["a"] + 1, "b": tensors["b"]}, str(tampered))
    (tmp_path / "tampered.json").write_text((tmp_path / "tv.json").read_text())
    with pytest.raises(HashMismatchError):
        load_task_vector(tampered)


def test_existing_output_is_never_overwritten(tmp_path):
    path = save_task_vector(tmp_path / "tv.safetensors", {"a": torch.ones(2)}, {})
    before = path.read_bytes(), (tmp_path / "tv.json").read_text()
    with pytest.raises(OutputExistsError):
        save_task_vector(path, {"a": torch.zeros(2)}, {})
    assert (path.read_bytes(), (tmp_path / "tv.json").read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tv.json", "tv.safetensors"]  # no temporary left
    save_task_vector(path, {"a": torch.zeros(2)}, {}, overwrite=True)
    assert torch.equal(load_task_vector(path)[0]["a"], torch.zeros(2))



def test_outputs_not_named_safetensors_and_non_finite_vectors_are_refused(tmp_path):
    # `run.json` would be overwritten by its own sidecar; `run.rte` and `run.mnli` would share `run.json`
    for name in ("run.json", "run.rte", "run"):
        with pytest.raises(OutputPathError, match="<name>.safetensors"):
            save_task_vector(tmp_path / name, {"a": torch.ones(2)}, {}, overwrite=True)
    with pytest.raises(NonFiniteError, match=r"1 of 2 tensors \(e.g. \['b'\]\)"):
        save_task_vector(tmp_path / "tv.safetensors", {"a": torch.ones(2), "b": torch.tensor([1.0, float("nan")])}, {})
    assert list(tmp_path.iterdir()) == []  # nothing written



def test_written_files_get_the_usual_mode_and_bad_sidecars_are_corrupt_files(tmp_path):
    path = save_task_vector(tmp_path / "tv.safetensors", {"a": torch.ones(2)}, {})
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0o600
    for content in (b"[]", b"\xff\xfe not utf-8"):
        (tmp_path / "tv.json").write_bytes(content)
        with pytest.raises(CorruptFileError, match="sidecar"):
            load_task_vector(path)


def test_staged_writes_move_every_file_into_place_or_none(tmp_path):
    first, second = tmp_path / "a.txt", tmp_path / "sub" / "b.txt"
    first.write_text("old")
    with pytest.raises(RuntimeError):
        with staged_writes(first, second) as stage:
            stage(first).write_text("new")
            raise RuntimeError("the second write failed")
    assert first.read_text() == "old" and not second.exists()
    with staged_writes(first, second) as stage:
        stage(first).write_text("new")
        stage(second).write_text("b")
    assert first.read_text() == "new" and second.read_text() == "b"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.txt", "b.txt", "sub"]  # no staging folder left
    with pytest.raises(OutputPathError, match="is a directory"):
        check_writable(tmp_path / "sub", overwrite=True)
    with pytest.raises(OutputPathError, match="is a file"):
        check_writable(first / "c.txt")


def test_apply_task_vector_checks_keys_and_shapes():
    model = tiny_vit()
    with pytest.raises(TaskVectorKeyError):
        apply_task_vector(copy.deepcopy(model), {"nope": torch.zeros(1)})
    with pytest.raises(ShapeMismatchError):
        apply_task_vector(copy.deepcopy(model), {"ln_post.weight": torch.zeros(5)})


def test_memory_budget_groups_give_identical_statistics(monkeypatch):
    from theseus_transport.transport import build_plans, engine

    source, target = tiny_vit(width=32), tiny_vit(width=48, heads=6, seed=1)
    task_vector = random_task_vector(source, lambda key: not key.startswith(NOT_TRANSPORTED))
    whole = transport(source, target, task_vector, pairs(2), progress=False)
    grouped = transport(source, target, task_vector, pairs(2), memory_budget_bytes=256 * 1024, progress=False)
    assert all(torch.equal(whole.task_vector[k], grouped.task_vector[k]) for k in whole.task_vector)
    assert plan_groups({"a": 10, "b": 10, "c": 10}, 20) == [["a", "b"], ["c"]]
    # several variants (two centerings, a Gram baseline) and a reduce across "ranks": with each group's maps
    # built right after its pass, the maps, ranks and token counts equal those of the single pass
    sizes_seen: list[dict[str, int]] = []
    monkeypatch.setattr(engine, "plan_groups", lambda sizes, budget: sizes_seen.append(dict(sizes)) or plan_groups(sizes, budget))
    variants = [dict(method="theseus"), dict(method="theseus", map_mode="paper", center=True), dict(method="pinv")]
    single, single_context = build_plans(source, target, pairs(2), variants, reduce_fn=lambda t: 2 * t, progress=False)
    split, split_context = build_plans(source, target, pairs(2), variants, reduce_fn=lambda t: 2 * t,
                                       memory_budget_bytes=256 * 1024, progress=False)
    assert len(sizes_seen) == 1 and len(plan_groups(sizes_seen[0], 256 * 1024)) > 2
    for one, other in zip(single, split):
        assert list(one.maps) == list(other.maps) and all(torch.equal(one.maps[s], other.maps[s]) for s in one.maps)
        assert one.metadata == other.metadata
    assert list(single_context["ranks"].items()) == list(split_context["ranks"].items())
    # the budget counts a point's statistics (Grams included) plus its SVD factors U and V^T, once per centering;
    # a derived point (c_proj:out, from c_proj:in) is computed in its input's pass, so it is counted with it
    c_proj_in = CrossStatistics(128, 192, with_grams=True).nbytes() + 2 * 8 * (128 + 192) * 128
    c_proj_out = CrossStatistics(32, 48, with_grams=True).nbytes() + 2 * 8 * (32 + 48) * 32
    assert sizes_seen[0]["transformer.resblocks.0.mlp.c_proj:in"] == c_proj_in + c_proj_out
    assert "transformer.resblocks.0.mlp.c_proj:out" not in sizes_seen[0]


def test_one_calibration_pass_serves_several_methods():
    from theseus_transport.transport import build_plans

    source, target = tiny_vit(width=32), tiny_vit(width=48, heads=6, seed=1)
    task_vector = random_task_vector(source, lambda key: not key.startswith(NOT_TRANSPORTED))
    variants = [dict(method="theseus", map_mode="rank_aware"), dict(method="theseus", map_mode="paper"), dict(method="pinv")]
    plans, _ = build_plans(source, target, pairs(2), variants, progress=False)
    for variant, plan in zip(variants, plans):
        alone, _ = build_plan(source, target, pairs(2), progress=False, **variant)
        assert plan.maps.keys() == alone.maps.keys()
        assert all(torch.equal(plan.maps[s], alone.maps[s]) for s in plan.maps), variant
        assert all(torch.equal(a, b) for a, b in zip(plan.apply(task_vector)[0].values(), alone.apply(task_vector)[0].values()))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("batch_products", ["float64", "float32"])
def test_statistics_reject_non_finite_rows_and_stay_unchanged(bad, batch_products):
    statistics = CrossStatistics(3, 4, batch_products=batch_products)
    statistics.update(torch.ones(5, 3), torch.ones(5, 4))
    before = statistics.cross.clone()
    rows = torch.ones(5, 4)
    rows[2, 1] = bad
    with pytest.raises(CalibrationError, match="NaN or Inf"):
        statistics.update(torch.ones(5, 3), rows)
    assert statistics.count == 5 and torch.equal(statistics.cross, before)


def test_embedding_stage_transport_follows_the_token_grid_and_refuses_other_pixel_spaces():
    source = tiny_vit(width=32, image_size=16, patch_size=4)              # 4 x 4 patches + CLS = 17 tokens
    target = tiny_vit(width=48, heads=6, image_size=20, patch_size=4, seed=1)  # 5 x 5 + CLS = 26
    task_vector = random_task_vector(source, lambda key: True)
    calibration = [{"source": torch.randn(8, 3, 16, 16), "target": torch.randn(8, 3, 20, 20)} for _ in range(2)]
    result = transport(source, target, task_vector, calibration, transport_embeddings=True, progress=False)
    assert result.task_vector["positional_embedding"].shape == (26, 48)
    assert result.task_vector["conv1.weight"].shape == (48, 3, 4, 4)
    assert result.plan.metadata["embeddings"] is True and "ln_pre:in" in result.plan.maps
    # the class-token row of the positional embedding goes through the map untouched by the resampling
    embedding_map = result.plan.maps["ln_pre:in"].to(torch.float64)
    expected_cls = task_vector["positional_embedding"][0].to(torch.float64) @ embedding_map
    assert torch.allclose(result.task_vector["positional_embedding"][0].to(torch.float64), expected_cls, atol=1e-6)
    # other patch size: the pixel spaces differ, so the patch embedding is skipped with the reason
    coarse = tiny_vit(width=48, heads=6, image_size=16, patch_size=8, seed=1)
    calibration = [{"source": images, "target": images} for images in torch.randn(2, 8, 3, 16, 16)]
    result = transport(source, coarse, task_vector, calibration, transport_embeddings=True,
                       token_alignment="mean", progress=False)
    assert "different pixel spaces" in result.report.skipped["conv1.weight"]
    assert result.task_vector["positional_embedding"].shape == (5, 48)


def test_mistyped_openclip_names_are_unknown_names_not_downloads():
    from theseus_transport.families import load_openclip

    with pytest.raises(UnknownNameError, match="did you mean .*ViT-B-16"):
        load_openclip("ViT-B-61")
    assert issubclass(UnknownNameError, KeyError)  # callers catching KeyError keep working


def test_a_task_vector_from_other_source_weights_is_refused(tmp_path):
    from theseus_transport.transport.io import check_task_vector_source

    checkpoint = tmp_path / "source.pt"
    checkpoint.write_bytes(b"weights")
    info = {"model": "ViT-B-16", "pretrained": str(checkpoint)}
    check_task_vector_source(info, "ViT-B-16", str(checkpoint), "tv")
    check_task_vector_source(info, "ViT-B-16", os.path.relpath(checkpoint), "tv")  # the same file, named another way
    check_task_vector_source(info, "ViT-B-16", None, "tv")  # nothing to compare with
    with pytest.raises(FamilyMismatchError, match="fine-tuned from 'ViT-B-16' weights"):
        check_task_vector_source({"model": "ViT-B-16", "pretrained": "laion2b_s34b_b88k"}, "ViT-B-16", "openai", "tv")
    with pytest.raises(FamilyMismatchError, match="was made from 'ViT-B-32'"):
        check_task_vector_source({"model": "ViT-B-32"}, "ViT-B-16", None, "tv")


def test_mean_alignment_averages_real_tokens_only():
    tokens = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    padded = tokens.clone()
    padded[0, 3:] = 500.0  # what a padding embedding may hold: it must not matter
    source, target = align_tokens(padded, padded, "mean", mask)
    assert torch.allclose(source[0], tokens[0, :3].mean(0)) and torch.allclose(target[1], tokens[1].mean(0))
    with pytest.raises(ValueError, match="no real tokens"):
        align_tokens(tokens, tokens, "mean", torch.zeros(2, 5))


def test_generic_adapter_maps_group_norm_channels_on_an_exact_twin():
    from theseus_transport.families import GenericLinearAdapter

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([nn.ModuleDict({"fc1": nn.Linear(6, 8), "gn": nn.GroupNorm(8, 8), "fc2": nn.Linear(8, 6)})])

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # B x N x 6; GroupNorm wants channels second
            block = self.blocks[0]
            hidden = block["gn"](block["fc1"](x).transpose(1, 2)).transpose(1, 2)
            return x + block["fc2"](torch.relu(hidden))

    torch.manual_seed(0)
    source = Net().double()
    with torch.no_grad():
        source.blocks[0]["gn"].weight.copy_(1 + 0.3 * torch.randn(8))
        source.blocks[0]["gn"].bias.copy_(0.3 * torch.randn(8))
    perm = torch.randperm(8)
    twin = copy.deepcopy(source)
    with torch.no_grad():
        for name in ("weight", "bias"):
            getattr(twin.blocks[0]["fc1"], name).copy_(getattr(source.blocks[0]["fc1"], name)[perm])
            getattr(twin.blocks[0]["gn"], name).copy_(getattr(source.blocks[0]["gn"], name)[perm])
        twin.blocks[0]["fc2"].weight.copy_(source.blocks[0]["fc2"].weight[:, perm])
    vector = {key: 0.05 * torch.randn_like(value) for key, value in source.state_dict().items()}
    # 5 tokens, not 8: a capture along the last axis would not even have the channels' width
    calibration = [(batch, batch) for batch in torch.randn(4, 64, 5, 6, dtype=torch.float64)]
    result = transport(source, twin, vector, calibration, family=GenericLinearAdapter(), progress=False)
    for key in ("blocks.0.gn.weight", "blocks.0.gn.bias"):
        torch.testing.assert_close(result.task_vector[key], vector[key][perm], atol=1e-8, rtol=0)


def test_interpolate2d_says_when_it_falls_back_to_1d():
    with pytest.warns(UserWarning, match="falls back to 1-D"):
        resized = interpolate_tokens_2d(torch.randn(1, 1 + 4 * 6, 3), 1 + 16)  # a 4 x 6 grid is not square
    assert resized.shape == (1, 17, 3)


def test_alpha_is_applied_in_float64_before_the_one_cast():
    source, target = tiny_vit(width=32), tiny_vit(width=48, heads=6, seed=1)
    vector = random_task_vector(source, lambda key: not key.startswith(NOT_TRANSPORTED))
    half = {key: value.half() for key, value in vector.items()}
    result = transport(source, target, half, pairs(2), alpha=0.3, progress=False)
    exact, _, _ = result.plan.apply({key: value.double() for key, value in half.items()}, alpha=0.3)
    assert all(result.task_vector[key].dtype == torch.float16 for key in result.task_vector)
    assert all(torch.equal(result.task_vector[key], exact[key].half()) for key in exact)  # rounded once
