"""Tests of the offline zoo: the procedural world, its tasks, and the tiny OpenCLIP family."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import load_file

from theseus_transport.zoo import family, world
from theseus_transport.families.openclip import load_openclip
from theseus_transport.zoo.family import FAMILY_MEMBERS, build_family, load_member, register_family_configs
from theseus_transport.zoo.world import TASKS, build_world, load_pretraining_pairs, load_task

TINY_SIZES = {"pretrain": 48, "train": 12, "val": 6, "test": 10, "calibration": 8}


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory):
    """A cache root holding a tiny world (seed 0)."""
    cache = tmp_path_factory.mktemp("zoo_cache")
    build_world(cache, seed=0, sizes=TINY_SIZES)
    return cache


def _png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# --- world ---------------------------------------------------------------------------------------


def test_same_seed_renders_identical_pairs_and_other_seed_differs():
    first = world.render_pretraining_pairs(12, seed=3)
    again = world.render_pretraining_pairs(12, seed=3)
    other = world.render_pretraining_pairs(12, seed=4)
    assert [_png_bytes(im) for im in first["image"]] == [_png_bytes(im) for im in again["image"]]
    assert first["caption"] == again["caption"]
    assert [_png_bytes(im) for im in first["image"]] != [_png_bytes(im) for im in other["image"]]
    assert first["caption"] != other["caption"]


def test_task_splits_are_deterministic_and_seed_dependent():
    task = TASKS["counting"]
    first = world.render_task_split(task, "test", 10, seed=0)
    again = world.render_task_split(task, "test", 10, seed=0)
    other = world.render_task_split(task, "test", 10, seed=1)
    assert [_png_bytes(im) for im in first["image"]] == [_png_bytes(im) for im in again["image"]]
    assert first["label"] == again["label"]
    assert [_png_bytes(im) for im in first["image"]] != [_png_bytes(im) for im in other["image"]]


def test_splits_of_one_task_are_different_draws():
    task = TASKS["shapes"]
    train = world.render_task_split(task, "train", 6, seed=0)
    calibration = world.render_task_split(task, "calibration", 6, seed=0)
    assert [_png_bytes(im) for im in train["image"]] != [_png_bytes(im) for im in calibration["image"]]


def test_eight_tasks_with_natural_classnames_and_prompt_templates():
    assert len(TASKS) == 8
    for name, task in TASKS.items():
        assert task.name == name
        assert len(task.classnames) >= 3
        assert len(set(task.classnames)) == len(task.classnames)
        assert all(c and c == c.strip() for c in task.classnames)
        assert task.templates and all(t.count("{}") == 1 for t in task.templates)
        assert task.description


def test_scene_labels_match_the_attribute_drawn():
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = world.sample_scene(rng, {"count": (1,)})
        assert scene.position in world.POSITIONS
        x, y = scene.centers[0]
        assert scene.position.startswith("top") == (y < world.IMAGE_SIZE / 2)
        assert scene.background != scene.color
    crowded = world.sample_scene(np.random.default_rng(1), {"count": (4,)})
    assert len(crowded.centers) == 4 and crowded.glyph is None


def test_captions_only_name_true_attributes():
    rng = np.random.default_rng(0)
    other_colors = set(world.COLORS)
    for _ in range(100):
        scene = world.sample_scene(rng)
        caption = world.caption_scene(scene, rng)
        mentioned = {c for c in other_colors if f" {c} " in f" {caption[:-1]} "}
        assert mentioned <= {scene.color, scene.background}, caption
        assert caption.endswith(".")


def test_built_world_has_every_split_with_labels_in_range(tiny_cache):
    for name, task in TASKS.items():
        splits = load_task(name, tiny_cache)
        assert set(splits) == set(world.SPLITS)
        for split, data in splits.items():
            assert len(data) == TINY_SIZES[split]
            assert data.features["label"].names == list(task.classnames)
            assert all(0 <= label < task.num_classes for label in data["label"])
            image = data[0]["image"]
            assert image.size == (world.IMAGE_SIZE, world.IMAGE_SIZE) and image.mode == "RGB"


def test_pretraining_pairs_have_images_and_captions(tiny_cache):
    pairs = load_pretraining_pairs(tiny_cache)
    assert len(pairs) == TINY_SIZES["pretrain"]
    assert {"image", "caption"} <= set(pairs.column_names)
    assert all(isinstance(c, str) and c for c in pairs["caption"])


def test_build_world_is_idempotent_and_rebuilds_on_new_seed(tmp_path):
    sizes = {"pretrain": 4, "train": 2, "val": 2, "test": 2, "calibration": 2}
    path = build_world(tmp_path, seed=0, sizes=sizes)
    manifest = path / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    assert build_world(tmp_path, seed=0, sizes=sizes) == path
    assert manifest.stat().st_mtime_ns == stamp
    build_world(tmp_path, seed=5, sizes=sizes)
    assert json.loads(manifest.read_text())["seed"] == 5


def test_a_world_built_with_other_sizes_is_used_with_a_warning(tmp_path, caplog):
    sizes = {"pretrain": 4, "train": 2, "val": 3, "test": 2, "calibration": 2}
    build_world(tmp_path, seed=0, sizes=sizes)
    with caplog.at_level(logging.WARNING, logger="theseus_transport.zoo.world"):
        first = load_task("sizes", tmp_path)
        load_task("colors", tmp_path)
    assert first["val"].num_rows == 3  # used as it is, not rebuilt
    warnings = [record.getMessage() for record in caplog.records if "differs from the default world" in record.getMessage()]
    assert len(warnings) == 1 and "sizes" in warnings[0] and "'val': 3" in warnings[0]  # once, naming the cause


def test_unknown_task_and_size_keys_are_rejected(tiny_cache):
    with pytest.raises(KeyError, match="known tasks"):
        load_task("imagenet", tiny_cache)
    with pytest.raises(ValueError, match="unknown world size"):
        build_world(tiny_cache, sizes={"trian": 3})


# --- family --------------------------------------------------------------------------------------

EXPECTED_VISION = {  # width, layers, tokens (grid^2 + CLS)
    "theseus-tiny-s": (64, 4, 17),
    "theseus-tiny-w": (96, 4, 17),
    "theseus-tiny-deep": (96, 6, 17),
}


def test_configs_register_idempotently_and_instantiate_as_vit_clip():
    register_family_configs()
    register_family_configs()
    assert set(FAMILY_MEMBERS) == set(EXPECTED_VISION)
    for name, (width, layers, tokens) in EXPECTED_VISION.items():
        assert name in open_clip.list_models()
        model, _, preprocess = open_clip.create_model_and_transforms(name)
        visual = model.visual
        assert type(visual).__name__ == "VisionTransformer"
        assert visual.transformer.width == width and len(visual.transformer.resblocks) == layers
        assert visual.positional_embedding.shape == (tokens, width)
        assert family.vision_token_count(name) == tokens
        block = visual.transformer.resblocks[0]
        assert isinstance(block.attn, torch.nn.MultiheadAttention)
        assert block.mlp.c_fc.in_features == width and block.mlp.c_proj.out_features == width
        assert visual.proj.shape == (width, family.FAMILY_CONFIGS[name]["embed_dim"])
        image = world.render_scene(world.sample_scene(np.random.default_rng(0)))
        pixels = preprocess(image).unsqueeze(0)
        size = family.FAMILY_CONFIGS[name]["vision_cfg"]["image_size"]
        assert pixels.shape == (1, 3, size, size)
        with torch.no_grad():
            assert model.encode_image(pixels).shape == (1, family.FAMILY_CONFIGS[name]["embed_dim"])


def test_tokenizer_is_openclip_bpe_with_short_context():
    register_family_configs()
    tokens = open_clip.get_tokenizer("theseus-tiny-s")(["a photo of two red circles on a blue background."])
    assert tokens.shape == (1, family.CONTEXT_LENGTH)
    assert tokens[0, 0] == 49406 and 49407 in tokens[0]


def test_build_family_writes_a_loadable_checkpoint_and_manifest(tiny_cache, monkeypatch, caplog):
    name = "theseus-tiny-s"
    paths = build_family(tiny_cache, seed=0, steps=2, members=(name,), progress=False)
    path = paths[name]
    assert path == tiny_cache / "family" / f"{name}.safetensors" and path.is_file()
    record = family.read_family_manifest(tiny_cache)["members"][name]
    assert record["steps"] == 2 and record["seed"] == 0 and np.isfinite(record["final_loss"])

    model, preprocess, tokenizer = load_member(name, tiny_cache)
    saved = load_file(str(path))
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    fresh, _, _ = open_clip.create_model_and_transforms(name)
    assert not torch.equal(fresh.visual.proj, model.visual.proj)  # weights really came from the file
    # the suite's loader gives the member with both transforms, and no OpenCLIP warning that a model
    # was "initialized randomly" (it once built a second, weightless model just for its transforms)
    monkeypatch.setenv("THESEUS_CACHE", str(tiny_cache))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        loaded, preprocess_train, _, _ = load_openclip(name)
    assert not [record for record in caplog.records if "initialized randomly" in record.getMessage()]
    assert torch.equal(loaded.visual.proj, model.visual.proj) and "RandomResizedCrop" in repr(preprocess_train)

    # cached: a second call does not retrain; force does
    stamp = path.stat().st_mtime_ns
    build_family(tiny_cache, seed=0, steps=2, members=(name,), progress=False)
    assert path.stat().st_mtime_ns == stamp
    build_family(tiny_cache, seed=0, steps=2, members=(name,), force=True, progress=False)
    assert path.stat().st_mtime_ns != stamp

    accuracy = family.zero_shot_accuracy(model, preprocess, tokenizer, "shapes", split="test", cache_dir=tiny_cache)
    assert 0.0 <= accuracy <= 1.0


def test_parallel_build_equals_serial_build_and_variant_has_its_own_folder(tiny_cache, tmp_path, monkeypatch):
    members = ("theseus-tiny-s", "theseus-tiny-w")
    serial = build_family(tiny_cache, seed=0, steps=2, members=members, progress=False, workers=1, force=True)
    serial_states = {m: load_file(str(serial[m])) for m in members}
    monkeypatch.setenv(family.FAMILY_VARIANT_ENV, "test")
    parallel = build_family(tiny_cache, seed=0, steps=2, members=members, progress=False, workers=2)
    for name in members:
        assert parallel[name] == tiny_cache / "family-test" / f"{name}.safetensors"
        assert parallel[name] != serial[name]
        state = load_file(str(parallel[name]))
        assert state.keys() == serial_states[name].keys()
        for key, value in state.items():
            assert torch.equal(value, serial_states[name][key]), (name, key)
    manifest = family.read_family_manifest(tiny_cache)
    assert set(manifest["members"]) == set(members)
    assert all(record["steps"] == 2 for record in manifest["members"].values())


def test_zero_shot_classifier_is_one_unit_vector_per_class():
    register_family_configs()
    model, _, _ = open_clip.create_model_and_transforms("theseus-tiny-w")
    tokenizer = open_clip.get_tokenizer("theseus-tiny-w")
    task = TASKS["glyphs"]
    head = family.zero_shot_classifier(model, tokenizer, task.classnames, task.templates)
    assert head.shape == (task.num_classes, 96)
    assert torch.allclose(head.norm(dim=-1), torch.ones(task.num_classes), atol=1e-5)


def test_unknown_member_is_rejected(tiny_cache):
    with pytest.raises(KeyError, match="known"):
        load_member("theseus-huge", tiny_cache)
    with pytest.raises(KeyError, match="known"):
        build_family(tiny_cache, members=("theseus-huge",))


def test_a_foreign_world_folder_is_never_deleted_and_an_incomplete_one_is_rebuilt(tmp_path):
    from theseus_transport.transport.errors import OutputExistsError

    foreign = tmp_path / "world"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("the user's")
    with pytest.raises(OutputExistsError, match="not a theseus world"):
        build_world(tmp_path, seed=0, sizes=TINY_SIZES)
    assert (foreign / "thesis.tex").read_text() == "the user's"

    cache = tmp_path / "cache"
    world_dir = build_world(cache, seed=0, sizes=TINY_SIZES)
    shutil.rmtree(world_dir / "pretrain")  # what a raced or interrupted build could leave: a manifest, no data
    assert build_world(cache, seed=0, sizes=TINY_SIZES) == world_dir and (world_dir / "pretrain").is_dir()
    assert sorted(path.name for path in cache.iterdir()) == ["world"]  # no staging folder left behind


def test_a_member_is_retrained_when_the_world_it_learnt_from_changed(tmp_path):
    name = "theseus-tiny-s"
    build_world(tmp_path, seed=0, sizes=TINY_SIZES)
    path = build_family(tmp_path, seed=0, steps=2, members=(name,), progress=False)[name]
    record = family.read_family_manifest(tmp_path)["members"][name]
    assert record["world"]["seed"] == 0 and record["world"]["sizes"]["pretrain"] == TINY_SIZES["pretrain"]
    stamp = path.stat().st_mtime_ns
    build_family(tmp_path, seed=0, steps=2, members=(name,), progress=False)
    assert path.stat().st_mtime_ns == stamp  # same world: cached
    build_world(tmp_path, seed=1, sizes=TINY_SIZES)
    build_family(tmp_path, seed=0, steps=2, members=(name,), progress=False)
    assert path.stat().st_mtime_ns != stamp
    assert family.read_family_manifest(tmp_path)["members"][name]["world"]["seed"] == 1


def test_a_truncated_member_checkpoint_is_rebuilt_not_loaded(tmp_path):
    name = "theseus-tiny-s"
    build_world(tmp_path, seed=0, sizes=TINY_SIZES)
    path = build_family(tmp_path, seed=0, steps=2, members=(name,), progress=False)[name]
    # copies: safetensors may map the file, and it is about to be cut short in place
    whole, tensors = path.read_bytes(), {key: value.clone() for key, value in load_file(str(path)).items()}
    assert family.checkpoint_intact(path)
    path.write_bytes(whole[: len(whole) // 2])  # an interrupted copy, a full disk
    assert not family.checkpoint_intact(path)
    build_family(tmp_path, seed=0, steps=2, members=(name,), progress=False)
    assert family.checkpoint_intact(path)
    rebuilt = load_file(str(path))  # same seed: the same member again, bit for bit
    assert rebuilt.keys() == tensors.keys() and all(torch.equal(rebuilt[key], tensors[key]) for key in tensors)
    model, _, _ = load_member(name, tmp_path)  # and it loads
    assert torch.equal(model.visual.proj, rebuilt["visual.proj"])
