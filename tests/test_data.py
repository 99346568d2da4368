"""Tests of theseus_transport.data: calibration protocols, datamodules, registry, offline errors."""

from __future__ import annotations

import os

# before datasets / huggingface_hub are imported: every hub call must fail fast
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import time
from collections import Counter
from types import SimpleNamespace

import datasets
import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler

from theseus_transport.data import (
    TASK_TEMPLATES,
    TEXT_TASKS,
    VISION_TASKS,
    ImageClassificationDataModule,
    TextPairDataModule,
    find_text_task,
    find_vision_task,
    image_size_of,
    load_dataset_dict,
    load_tokenizer,
    openclip_preprocess_cfg,
    sample_k_batches,
    sample_k_shots,
)
from theseus_transport.arguments import init_arguments
from theseus_transport.transport.errors import OfflineError
# one_torch_thread is an autouse fixture: importing it is what applies it to this module
from tiny_clip import image_split, one_torch_thread, register_tiny_openclip  # noqa: F401

SOURCE, TARGET = "tt-data-source", "tt-data-target"
CLASSNAMES = ["red thing", "green thing", "blue thing"]


@pytest.fixture(scope="module", autouse=True)
def tiny_openclip_configs(tmp_path_factory):
    """Register two tiny OpenCLIP configs of different width and image size (no weights needed)."""
    register_tiny_openclip(tmp_path_factory.mktemp("openclip_configs"), {SOURCE: (32, 32), TARGET: (40, 48)})


def _flat_colour(rng: np.random.Generator, label: int) -> np.ndarray:
    return np.broadcast_to(rng.integers(0, 256, size=3).astype(np.uint8), (24, 24, 3)).copy()


def _image_split(count: int, seed: int) -> datasets.Dataset:
    """Each image is one flat colour, unique per example, so its pixel mean identifies it."""
    return image_split(count, seed, CLASSNAMES, _flat_colour, image_column="img", label_column="fine_label")


@pytest.fixture(scope="module")
def image_dict() -> datasets.DatasetDict:
    """A train/test dataset with non-standard column names and no validation split."""
    return datasets.DatasetDict({"train": _image_split(60, 0), "test": _image_split(12, 1)})


def _image_module(raw: datasets.DatasetDict, **kwargs) -> ImageClassificationDataModule:
    settings = dict(model_name=TARGET, source_model_name=SOURCE, batch_size=8, calibration_batch_size=4)
    settings.update(kwargs)
    module = ImageClassificationDataModule.from_datasets(raw, name="colours", **settings)
    module.setup("fit")
    return module


# ----- calibration protocols ----------------------------------------------------------------------------------


def test_k_batches_is_seeded_distinct_and_sized():
    first = sample_k_batches(100, 3, 8, seed=0)
    assert first == sample_k_batches(100, 3, 8, seed=0)
    assert first != sample_k_batches(100, 3, 8, seed=1)
    assert len(first) == 24 and len(set(first)) == 24 and all(0 <= index < 100 for index in first)
    # one more batch keeps the first ones: the draw is a prefix of one seeded permutation
    assert sample_k_batches(100, 4, 8, seed=0)[:24] == first


def test_k_batches_refuses_more_than_the_split():
    with pytest.raises(ValueError, match="only 10"):
        sample_k_batches(10, 2, 8, seed=0)


def test_k_shots_is_balanced_seeded_and_interleaved():
    labels = [index % 4 for index in range(40)] + [0] * 10
    chosen = sample_k_shots(labels, 3, seed=5)
    assert chosen == sample_k_shots(labels, 3, seed=5)
    assert chosen != sample_k_shots(labels, 3, seed=6)
    assert len(set(chosen)) == 12
    assert Counter(labels[index] for index in chosen) == {0: 3, 1: 3, 2: 3, 3: 3}
    # round robin: every prefix of one shot per class holds each class once
    assert sorted(labels[index] for index in chosen[:4]) == [0, 1, 2, 3]


def test_k_shots_warns_on_small_classes():
    with pytest.warns(UserWarning, match="fewer than 3"):
        chosen = sample_k_shots([0, 0, 0, 1], 3, seed=0)
    assert Counter([0, 0, 0, 1][index] for index in chosen) == {0: 3, 1: 1}


# ----- image datamodule ------------------------------------------------------------------------------------------


def test_image_datamodule_splits_columns_and_batches(image_dict):
    module = _image_module(image_dict)
    assert (module.image_column, module.label_column) == ("img", "fine_label")
    assert module.classnames == CLASSNAMES and module.num_classes == 3
    # no validation split: 10 % of train, seeded, disjoint from what is left of train
    assert len(module.splits["val"]) == 6 and len(module.splits["train"]) == 54
    images, labels = next(iter(module.train_dataloader()))
    assert images.shape == (8, 3, 40, 40) and labels.dtype == torch.long
    images, _ = next(iter(module.test_dataloader()))
    assert images.shape[-2:] == (40, 40)
    assert module.templates and all("{}" in template for template in module.templates)


def _pixel_means(images: torch.Tensor, model_name: str) -> torch.Tensor:
    cfg = openclip_preprocess_cfg(model_name)
    mean, std = torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    return (images * std + mean).mean(dim=(2, 3))


def test_paired_calibration_batches_hold_the_same_examples(image_dict):
    module = _image_module(image_dict, calibration_batches=3)
    batches = list(module.calibration_dataloader())
    assert len(batches) == 3
    indices = module.calibration_indices()
    source_split = module.calibration_split()
    for number, batch in enumerate(batches):
        assert set(batch) == {"source", "target", "label"}
        assert batch["source"].shape == (4, 3, 32, 32) and batch["target"].shape == (4, 3, 40, 40)
        # flat-colour images: both preprocessings recover the same colour per example
        torch.testing.assert_close(
            _pixel_means(batch["source"], SOURCE), _pixel_means(batch["target"], TARGET), atol=2e-3, rtol=0
        )
        expected = [source_split[index]["fine_label"] for index in indices[number * 4 : number * 4 + 4]]
        assert batch["label"].tolist() == expected
    again = list(module.calibration_dataloader())
    assert all(torch.equal(a["source"], b["source"]) for a, b in zip(batches, again))


def test_calibration_prefers_the_calibration_split_and_shards(image_dict):
    raw = datasets.DatasetDict({**image_dict, "calibration": _image_split(9, 2)})
    module = _image_module(raw, calibration_protocol="shots", calibration_shots=2, calibration_batch_size=2)
    indices = module.calibration_indices()
    assert len(module.calibration_split()) == 9 and len(indices) == 6
    labels = [module.calibration_split()[index]["fine_label"] for index in indices]
    assert Counter(labels) == {0: 2, 1: 2, 2: 2}
    shards = [module.calibration_batches_for(rank, 2) for rank in (0, 1)]
    assert sorted(sum(shards[0] + shards[1], [])) == sorted(indices)
    batch = next(iter(module.calibration_dataloader(source_model_name=SOURCE, rank=1, world_size=2)))
    assert batch["label"].tolist() == labels[2:4]


def test_under_ddp_each_evaluation_example_goes_to_exactly_one_rank(image_dict):
    # 6 validation and 12 test examples on 5 ranks: uneven shares, where Lightning's own DistributedSampler
    # would pad by repeating examples
    module = _image_module(image_dict, eval_batch_size=2)
    loaders = ("val_dataloader", "test_dataloader", "predict_dataloader")
    everything = {name: torch.cat([labels for _, labels in getattr(module, name)()]) for name in loaders}
    shares: dict[str, list[list[int]]] = {name: [] for name in loaders}
    for rank in range(5):
        module.trainer = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 5, "rank": rank})
        for name in loaders:
            loader = getattr(module, name)()
            # a DistributedSampler already: Lightning's _requires_distributed_sampler leaves it in place
            assert isinstance(loader.sampler, DistributedSampler)
            shares[name].append(list(loader.sampler))
            assert len(torch.cat([labels for _, labels in loader])) == len(shares[name][-1])
    for name in loaders:
        indices = sorted(index for share in shares[name] for index in share)
        assert indices == list(range(len(everything[name])))  # every example once, none repeated
        assert max(map(len, shares[name])) - min(map(len, shares[name])) == 1
    module.trainer = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 7, "rank": 0})
    with pytest.raises(ValueError, match="6 examples cannot give each of 7 ranks one"):
        module.val_dataloader()
    # a fractional limit that leaves the smaller shares no batch (Lightning would refuse on those ranks alone,
    # with the others waiting): refused on every rank, rank 0 included, whose share would have a batch
    module.trainer = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 5, "rank": 0},
                                     limit_val_batches=0.5, limit_test_batches=1)
    with pytest.raises(ValueError, match="fractional batch limit of 0.5 leaves no batch of 2 examples"):
        module.val_dataloader()
    assert len(list(module.test_dataloader().sampler)) == 3  # a whole number of batches is a cap, fine on any share
    module.trainer = SimpleNamespace(distributed_sampler_kwargs=None)  # one process: the plain order
    assert not isinstance(module.test_dataloader().sampler, DistributedSampler)


def test_calibration_needs_a_source_model(image_dict):
    module = _image_module(image_dict, source_model_name=None)
    with pytest.raises(ValueError, match="source_model_name"):
        module.calibration_dataloader()


def test_save_to_disk_path_matches_in_memory(image_dict, tmp_path):
    image_dict.save_to_disk(str(tmp_path / "colours"))
    from_disk = ImageClassificationDataModule(
        str(tmp_path / "colours"), model_name=TARGET, source_model_name=SOURCE, calibration_batch_size=4
    )
    from_disk.setup("fit")
    in_memory = _image_module(image_dict)
    assert from_disk.task_name == "colours" and from_disk.classnames == in_memory.classnames
    assert from_disk.calibration_indices() == in_memory.calibration_indices()
    assert from_disk.splits["val"]["fine_label"] == in_memory.splits["val"]["fine_label"]


def test_preprocessing_follows_open_clip_without_building_models():
    assert image_size_of("ViT-B-16", "laion2b_s34b_b88k") == (224, 224)
    assert image_size_of("ViT-B-16-plus-240", "laion400m_e32") == (240, 240)
    assert image_size_of(TARGET) == (40, 40)
    _, _, reference = open_clip.create_model_and_transforms(TARGET, pretrained=None)
    ours = ImageClassificationDataModule("unused", model_name=TARGET).target_transform()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    torch.testing.assert_close(ours(image), reference(image))


# ----- text datamodule -----------------------------------------------------------------------------------------


def _text_dict(string_labels: bool = False) -> datasets.DatasetDict:
    def split(count: int, offset: int) -> datasets.Dataset:
        premises = [f"premise number {offset + index} about cats" for index in range(count)]
        hypotheses = [f"hypothesis {index % 3}" for index in range(count)]
        if string_labels:
            labels = ["entails" if index % 2 else "neutral" for index in range(count)]
            return datasets.Dataset.from_dict({"premise": premises, "hypothesis": hypotheses, "label": labels})
        labels = [-1 if index % 7 == 6 else index % 3 for index in range(count)]
        features = datasets.Features(
            {
                "premise": datasets.Value("string"),
                "hypothesis": datasets.Value("string"),
                "label": datasets.ClassLabel(names=["entailment", "neutral", "contradiction"]),
            }
        )
        return datasets.Dataset.from_dict({"premise": premises, "hypothesis": hypotheses, "label": labels}, features=features)

    return datasets.DatasetDict({"train": split(42, 0), "validation": split(14, 100), "test": split(14, 200)})


def test_text_datamodule_drops_unlabelled_and_pads_to_fixed_length():
    module = TextPairDataModule.from_datasets(
        _text_dict(), name="toy-nli", tokenizer_name="byt5-offline", max_length=48, batch_size=8, calibration_batch_size=4
    )
    module.setup("fit")
    assert module.classnames == ["entailment", "neutral", "contradiction"]
    assert len(module.splits["train"]) == 36 and len(module.splits["val"]) == 12  # the -1 rows are gone
    batch = next(iter(module.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (8, 48) and batch["attention_mask"].shape == (8, 48)
    assert batch["labels"].min() >= 0
    calibration = next(iter(module.calibration_dataloader(source_tokenizer_name="byt5-offline")))
    assert calibration["source"]["input_ids"].shape == calibration["target"]["input_ids"].shape == (4, 48)
    assert torch.equal(calibration["source"]["attention_mask"], calibration["target"]["attention_mask"])
    assert calibration["label"].shape == (4,)


def test_text_datamodule_maps_string_labels_like_scitail():
    module = TextPairDataModule.from_datasets(_text_dict(string_labels=True), name="toy", max_length=32, batch_size=4)
    module.setup("fit")
    assert module.classnames == ["entails", "neutral"]
    labels = torch.cat([batch["labels"] for batch in module.val_dataloader()])
    assert set(labels.tolist()) == {0, 1}


# ----- argument forwarding ---------------------------------------------------------------------------------------


def test_init_arguments_forwards_by_name_and_refuses_missing_ones():
    class Base:
        def __init__(self, a: int, b: int = 2) -> None:
            self.a, self.b = a, b

    assert init_arguments(Base, {"a": 1, "b": 5, "self": None, "other": 9}) == {"a": 1, "b": 5}
    assert init_arguments(Base, {"a": 1}, b=7) == {"a": 1, "b": 7}
    with pytest.raises(TypeError, match=r"\['b'\] to Base"):
        init_arguments(Base, {"a": 1})


# ----- registry ------------------------------------------------------------------------------------------------


def test_registry_knows_the_papers_datasets():
    assert set(VISION_TASKS) == set(TASK_TEMPLATES) and len(VISION_TASKS) == 8
    assert find_vision_task("ufldl-stanford/svhn").config == "cropped_digits"
    assert find_vision_task("eurosat").hub_id == "tanganke/eurosat"
    assert find_text_task("nyu-mll/glue", "rte").first_column == "sentence1"
    assert find_text_task("mnli").test_split == "validation_matched"
    assert find_text_task("allenai/scitail").config == "tsv_format"
    assert set(TEXT_TASKS) == {"mnli", "qnli", "rte", "snli", "scitail"}
    assert all("{}" in template for templates in TASK_TEMPLATES.values() for template in templates)
    assert ImageClassificationDataModule("svhn").dataset_config == "cropped_digits"


# ----- offline ---------------------------------------------------------------------------------------------------


def test_offline_hub_dataset_raises_offline_error_quickly():
    start = time.perf_counter()
    with pytest.raises(OfflineError, match="tanganke/eurosat") as caught:
        load_dataset_dict("tanganke/eurosat")
    assert "load_dataset" in str(caught.value) and "HF_DATASETS_CACHE" in str(caught.value)
    module = ImageClassificationDataModule("ufldl-stanford/svhn", dataset_config="cropped_digits", model_name=TARGET)
    with pytest.raises(OfflineError, match="ufldl-stanford/svhn"):
        module.setup("fit")
    assert time.perf_counter() - start < 15


def test_offline_tokenizer_raises_offline_error():
    with pytest.raises(OfflineError, match="google-t5/t5-small"):
        load_tokenizer("google-t5/t5-small")


def test_a_test_split_named_validation_is_never_also_the_validation_split():
    from theseus_transport.data.splits import standard_splits

    def split(name: str, count: int) -> datasets.Dataset:
        return datasets.Dataset.from_dict({"text": [f"{name}{i}" for i in range(count)], "label": [i % 2 for i in range(count)]})

    # GLUE (qnli, rte): the public "validation" split is the test set; validation is carved from train
    raw = datasets.DatasetDict({"train": split("tr", 40), "validation": split("va", 10), "test": split("te", 10)})
    splits = standard_splits(raw, test_split="validation")
    assert splits["test"]["text"] == raw["validation"]["text"]
    assert not set(splits["val"]["text"]) & set(splits["test"]["text"])
    assert set(splits["val"]["text"]) <= set(raw["train"]["text"]) and len(splits["train"]) + len(splits["val"]) == 40
    with pytest.raises(KeyError, match="both 'validation'"):
        standard_splits(raw, val_split="validation", test_split="validation")


def test_the_other_protocol_s_size_is_refused_not_ignored():
    from theseus_transport.data import TextPairDataModule

    with pytest.raises(ValueError, match="calibration_shots=8 does not apply to calibration_protocol 'batches'"):
        TextPairDataModule("toy:objects", calibration_shots=8)
    with pytest.raises(ValueError, match="calibration_batches=50 does not apply to calibration_protocol 'shots'"):
        TextPairDataModule("toy:objects", calibration_protocol="shots", calibration_batches=50)
    shots = TextPairDataModule("toy:objects", calibration_protocol="shots", calibration_shots=8)
    assert (shots.calibration_shots, TextPairDataModule("toy:objects").calibration_batches) == (8, 1)
    # a config.yaml saved before the sizes defaulted to None lists both, the inactive one at its default
    saved = TextPairDataModule("toy:objects", calibration_batches=10, calibration_shots=4)
    assert (saved.calibration_protocol, saved.calibration_batches) == ("batches", 10)


def test_the_training_seed_leaves_the_carved_validation_split_and_the_limits_alone():
    from theseus_transport.data import TextPairDataModule

    rows = 60
    raw = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"premise": [f"p{i}" for i in range(rows)], "hypothesis": ["h"] * rows,
                                             "label": [i % 2 for i in range(rows)]}),
        "test": datasets.Dataset.from_dict({"premise": ["t"] * 4, "hypothesis": ["h"] * 4, "label": [0, 1, 0, 1]}),
    })

    def split_texts(**seeds) -> tuple[list[str], list[str]]:
        module = TextPairDataModule.from_datasets(raw, name="seeded", train_limit=20, val_fraction=0.2, **seeds)
        return list(module.splits["val"]["premise"]), list(module.splits["train"]["premise"])

    # seed is the training order; a seed sweep must be evaluated on one validation set
    assert split_texts(seed=0) == split_texts(seed=1)
    assert split_texts(split_seed=0) != split_texts(split_seed=1)


def test_a_long_premise_is_cut_so_the_hypothesis_stays_whole():
    from theseus_transport.data.text import PairTokenizer
    from theseus_transport.data.tokenizers import load_tokenizer

    tokenizer = load_tokenizer("byt5-offline")
    pair = PairTokenizer(tokenizer, 96, "premise: {premise} hypothesis: {hypothesis}")
    premise = " ".join(["the committee approved the new rights last spring"] * 6)
    encoded = pair.encode([{"premise": premise, "hypothesis": "the rights are new"}])
    ids = encoded["input_ids"][0][encoded["attention_mask"][0].bool()]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert len(encoded["input_ids"][0]) == 96 and text.endswith("hypothesis: the rights are new")
    assert text.startswith("premise: the committee approved")
    short = pair.encode([{"premise": "a cat", "hypothesis": "an animal"}])  # fits: unchanged
    assert tokenizer.decode(short["input_ids"][0], skip_special_tokens=True) == "premise: a cat hypothesis: an animal"
    body = text[len("premise: "):-len(" hypothesis: the rights are new")]
    assert body and premise.startswith(body) and premise[len(body)] == " "  # ends at a whole word
    # a premise without spaces (Japanese here) keeps what fits, not nothing
    unspaced = "猫がマットの上に座っている間に委員会は新しい権利を承認した。" * 4
    encoded = pair.encode([{"premise": unspaced, "hypothesis": "a cat sits"}])
    text = tokenizer.decode(encoded["input_ids"][0][encoded["attention_mask"][0].bool()], skip_special_tokens=True)
    assert text.endswith("hypothesis: a cat sits")
    kept = text[len("premise: "):-len(" hypothesis: a cat sits")]
    assert len(kept) >= 5 and unspaced.startswith(kept)
    # mixed text: an early space is not a reason to throw away the unspaced rest that fits
    mixed = "2019年 " + "中" * 200
    encoded = pair.encode([{"premise": mixed, "hypothesis": "a cat sits"}])
    text = tokenizer.decode(encoded["input_ids"][0][encoded["attention_mask"][0].bool()], skip_special_tokens=True)
    assert len(text[len("premise: "):-len(" hypothesis: a cat sits")]) > len("2019年 ") + 5


def test_class_lists_come_from_every_split_before_limits_and_string_image_labels_work(tmp_path):
    from theseus_transport.data import TextPairDataModule

    def text_split(labels: list[str]) -> datasets.Dataset:
        return datasets.Dataset.from_dict({"premise": ["p"] * len(labels), "hypothesis": ["h"] * len(labels), "label": labels})

    # "contradiction" is rare: a train_limit may leave it out of train, yet test holds it
    raw = datasets.DatasetDict({"train": text_split(["entailment", "neutral"] * 6 + ["contradiction"]),
                                "validation": text_split(["neutral", "entailment"]), "test": text_split(["contradiction", "neutral"])})
    limited = TextPairDataModule.from_datasets(raw, name="rare", train_limit=3, batch_size=2)
    assert limited.classnames == ["contradiction", "entailment", "neutral"]
    assert [int(batch["labels"][0]) for batch in limited.test_dataloader()] == [0]

    register_tiny_openclip(tmp_path, {"tt-data-strings": (16, 16)})
    images = [Image.fromarray(np.full((16, 16, 3), value, dtype=np.uint8)) for value in (10, 200, 10, 200)]
    image_raw = datasets.DatasetDict({name: datasets.Dataset.from_dict({"image": images, "label": ["cat", "dog", "cat", "dog"]},
                                                                       features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")}))
                                      for name in ("train", "validation", "test")})
    data = ImageClassificationDataModule.from_datasets(image_raw, name="pets", model_name="tt-data-strings", batch_size=4,
                                                       classnames=["dog", "cat"])
    _, labels = next(iter(data.train_dataloader()))
    assert data.classnames == ["dog", "cat"] and sorted(labels.tolist()) == [0, 0, 1, 1]


def test_sixteen_bit_and_float_images_are_rescaled_not_clipped():
    from theseus_transport.data.image import to_rgb_image

    ramp = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    converted = np.asarray(to_rgb_image(Image.fromarray(ramp)))
    assert converted[..., 0].min() == 0 and converted[..., 0].max() == 255 and len(np.unique(converted[..., 0])) > 32
    floats = np.asarray(to_rgb_image(np.full((4, 4, 3), 0.5, dtype=np.float32)))
    assert (floats == 128).all()


def test_the_label_column_is_the_class_label_named_like_labels():
    from theseus_transport.data.sources import find_label_column

    features = datasets.Features({"image": datasets.Image(), "domain": datasets.ClassLabel(names=["a", "b"]),
                                  "label": datasets.ClassLabel(names=["cat", "dog", "bird"])})
    assert find_label_column(features) == "label"
    cifar = datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(num_classes=100),
                               "coarse_label": datasets.ClassLabel(num_classes=20)})
    assert find_label_column(cifar) == "fine_label"
