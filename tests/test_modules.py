"""Tests of theseus_transport.modules: fine-tuning, linear probes, zero-shot heads, task vectors."""

from __future__ import annotations

import logging
import os
import warnings

# before datasets / huggingface_hub are imported: every hub call must fail fast
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import datasets
import lightning as L
from lightning.pytorch.loggers import Logger
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from theseus_transport.callbacks import StepsToTarget, ValidateAtStart
from theseus_transport.data import ImageClassificationDataModule, TextPairDataModule
from theseus_transport.modules import (
    NearDuplicateClassesWarning,
    closest_classes,
    warn_near_duplicate_classes,
    ImageClassifier,
    LinearProbe,
    TextClassifier,
    snapshot_state,
    warmup_cosine_factor,
)
from theseus_transport.modules.base import ExampleMean
from theseus_transport.transport import apply_task_vector
from theseus_transport.transport.errors import (
    FamilyMismatchError,
    NonFiniteError,
    OfflineError,
    OutputExistsError,
    OutputPathError,
    TaskVectorKeyError,
)
from theseus_transport.transport.io import load_task_vector
# one_torch_thread is an autouse fixture: importing it is what applies it to this module
from tiny_clip import image_split, one_torch_thread, register_tiny_openclip  # noqa: F401
from tiny_tasks import text_data

TINY = "tt-modules-vit"
CLASSNAMES = ["red", "green", "blue"]


@pytest.fixture(scope="module", autouse=True)
def tiny_openclip_config(tmp_path_factory):
    """Register a tiny OpenCLIP config (random weights, offline tokenizer)."""
    register_tiny_openclip(tmp_path_factory.mktemp("openclip_configs"), {TINY: (32, 32)})


def _dominant_channel(rng: np.random.Generator, label: int) -> np.ndarray:
    pixels = rng.integers(0, 90, size=(16, 16, 3))
    pixels[..., label] += 160
    return pixels.astype(np.uint8)


def _colour_split(count: int, seed: int) -> datasets.Dataset:
    """An easy task: the label is the image's dominant colour channel."""
    return image_split(count, seed, CLASSNAMES, _dominant_channel)


@pytest.fixture(scope="module")
def colours() -> datasets.DatasetDict:
    """Train / val / test splits of the colour task."""
    return datasets.DatasetDict({"train": _colour_split(48, 0), "val": _colour_split(12, 1), "test": _colour_split(12, 2)})


def _image_data(raw: datasets.DatasetDict) -> ImageClassificationDataModule:
    return ImageClassificationDataModule.from_datasets(raw, name="colours", model_name=TINY, batch_size=12)


def _trainer(max_steps: int, callbacks=(), validate: bool = False) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1.0 if validate else 0,
        callbacks=list(callbacks),
    )


@torch.no_grad()
def _mean_loss(module: L.LightningModule, loader) -> float:
    was_training = module.training
    module.eval()
    losses = [F.cross_entropy(*module._logits_and_labels(batch), reduction="sum") for batch in loader]
    module.train(was_training)  # Lightning keeps the modes it finds at fit start
    return float(torch.stack(losses).sum()) / len(loader.dataset)


class EncoderModeProbe(L.Callback):
    """Records whether the encoder was in training mode at each training batch."""

    def __init__(self) -> None:
        self.modes: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # every submodule, not just the encoder's root: dropout layers deep inside decide what training means
        modes = {module.training for module in pl_module.encoder.modules()}
        assert len(modes) == 1, "the encoder's submodules are in mixed train / eval modes"
        self.modes.append(modes.pop())


class FakeWarmStart(L.Callback):
    """Stands in for the transport callback: adds a fixed update to the encoder at fit start."""

    def __init__(self) -> None:
        self.delta: dict[str, torch.Tensor] = {}

    def on_fit_start(self, trainer, pl_module) -> None:
        with torch.no_grad():
            for name, param in pl_module.encoder.named_parameters():
                self.delta[name] = torch.full_like(param, 1e-3)
                param.add_(self.delta[name])


# ----- image classifier ----------------------------------------------------------------------------------------


def test_finetune_reduces_loss_and_writes_a_pretrained_relative_task_vector(colours, tmp_path):
    L.seed_everything(0)
    data = _image_data(colours)
    out = tmp_path / "tv" / "colours.safetensors"
    module = ImageClassifier(TINY, None, head="zeroshot", lr=2e-3, weight_decay=0.0, warmup_steps=2, task_vector_out=str(out))
    pretrained = snapshot_state(module.encoder)
    data.setup("fit")
    module.build_head(data.classnames, data.templates)
    head_before = module.zeroshot_head.clone()
    loss_before = _mean_loss(module, data.train_dataloader())
    warm_start = FakeWarmStart()
    modes = EncoderModeProbe()
    module.encoder.eval()  # as loaders hand encoders over; validation at every epoch end must not leave it so either
    trainer = _trainer(24, callbacks=[warm_start, modes], validate=True)
    trainer.fit(module, datamodule=data)
    assert len(modes.modes) == 24 and all(modes.modes)  # fine-tuning runs in training mode

    assert _mean_loss(module, data.train_dataloader()) < 0.7 * loss_before
    assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= set(trainer.callback_metrics)
    # the zero-shot head is a frozen buffer: not trained, not a parameter
    assert torch.equal(module.zeroshot_head, head_before)
    assert not any("zeroshot_head" in name for name, _ in module.named_parameters())
    assert sum(p.numel() for group in trainer.optimizers[0].param_groups for p in group["params"]) == sum(
        p.numel() for p in module.encoder.parameters()
    )

    tensors, sidecar = load_task_vector(out)
    after = module.encoder.state_dict()
    assert set(tensors) == set(pretrained) and "transformer.resblocks.0.attn.in_proj_weight" in tensors
    for key, value in tensors.items():
        # relative to the pretrained weights, so the warm-start update is part of the task vector
        assert torch.equal(value, after[key] - pretrained[key])
    key = "transformer.resblocks.0.mlp.c_fc.weight"
    assert not torch.allclose(tensors[key], after[key] - (pretrained[key] + warm_start.delta[key]))
    assert sidecar["family"] == "openclip" and sidecar["model"] == TINY and sidecar["pretrained"] is None
    assert sidecar["encoder"] == "visual" and sidecar["task"] == "colours"
    assert sidecar["steps"] == 24 and sidecar["seed"] == 0


def test_zeroshot_head_takes_classes_from_the_datamodule_and_evaluates(colours):
    L.seed_everything(1)
    module = ImageClassifier(TINY, None, head="zeroshot")
    trainer = _trainer(1, validate=True)
    trainer.validate(module, datamodule=_image_data(colours), verbose=False)
    assert module.classnames == CLASSNAMES and module.zeroshot_head.shape == (3, 16)
    assert torch.allclose(module.zeroshot_head.norm(dim=-1), torch.ones(3))
    assert "val/acc" in trainer.callback_metrics
    frozen = ImageClassifier(TINY, None, head="zeroshot", classnames=CLASSNAMES, freeze_encoder=True)
    with pytest.raises(ValueError, match="nothing to train"):
        frozen.configure_optimizers()


def test_closest_classes_names_the_most_similar_pair_and_warns_only_when_near_duplicate():
    head = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0]])
    closest = closest_classes(head, ["a", "b", "c", "d"])
    assert (closest.first, closest.second) in {("b", "c"), ("c", "b")} and closest.cosine == pytest.approx(0.8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a well separated head stays silent
        assert warn_near_duplicate_classes(head, ["a", "b", "c", "d"]).cosine == pytest.approx(0.8)
    twins = torch.cat([head, head[1:2] + 1e-4 * head[0:1]])
    with pytest.warns(NearDuplicateClassesWarning, match="'b' and 'e'"):
        warn_near_duplicate_classes(twins, ["a", "b", "c", "d", "e"])
    with pytest.raises(ValueError, match="does not match 3 class names"):
        closest_classes(head, ["a", "b", "c"])
    with pytest.raises(ValueError, match="at least two classes"):
        closest_classes(head[:1], ["a"])


def test_zeroshot_head_warns_when_two_class_names_embed_alike():
    with pytest.warns(NearDuplicateClassesWarning, match="'red' and 'red'"):
        ImageClassifier(TINY, None, head="zeroshot", classnames=["red", "green", "red"])


def test_linear_probe_trains_only_the_head(colours, tmp_path):
    L.seed_everything(2)
    probe = LinearProbe(TINY, None, lr=1e-2)
    probe_data = _image_data(colours)
    probe_data.setup("fit")
    probe.build_head(probe_data.classnames)
    encoder_before = {key: value.clone() for key, value in probe.encoder.state_dict().items()}
    head_before = probe.head.weight.detach().clone()
    modes = EncoderModeProbe()
    trainer = _trainer(6, callbacks=[modes])
    trainer.fit(probe, datamodule=probe_data)

    assert modes.modes and not any(modes.modes)  # the frozen encoder stayed in eval mode
    assert all(torch.equal(value, encoder_before[key]) for key, value in probe.encoder.state_dict().items())
    assert not torch.equal(probe.head.weight, head_before)
    assert all(not param.requires_grad for param in probe.encoder.parameters())

    checkpoint = tmp_path / "probe.ckpt"
    trainer.save_checkpoint(checkpoint)
    restored = LinearProbe.load_from_checkpoint(checkpoint)
    images, _ = next(iter(probe_data.test_dataloader()))
    probe.eval(), restored.eval()
    torch.testing.assert_close(restored(images), probe(images))


def test_offline_pretrained_weights_raise_offline_error():
    with pytest.raises(OfflineError, match="laion2b_s34b_b88k") as caught:
        ImageClassifier("ViT-B-16", "laion2b_s34b_b88k")
    assert "ViT-B-16" in str(caught.value)
    with pytest.raises(OfflineError, match="google-t5/t5-small"):
        TextClassifier("google-t5/t5-small")


def test_warmup_cosine_schedule():
    assert warmup_cosine_factor(0, 10, 110) == pytest.approx(0.1)
    assert warmup_cosine_factor(9, 10, 110) == pytest.approx(1.0)
    assert warmup_cosine_factor(60, 10, 110) == pytest.approx(0.5)
    assert warmup_cosine_factor(110, 10, 110) == pytest.approx(0.0)
    factors = [warmup_cosine_factor(step, 10, 110) for step in range(10, 111)]
    assert all(a >= b for a, b in zip(factors, factors[1:]))


def test_evaluation_losses_are_example_means_that_survive_a_module_wide_cast():
    # what the Trainer does to the whole module under precision="bf16-true": the sum must stay float64
    mean = ExampleMean().to(torch.bfloat16)
    assert mean.total.dtype == torch.float64 and mean.count.dtype == torch.int64
    for value, size in ((0.3, 3), (1.7, 1), (0.1, 300)):  # a bfloat16 sum would round these
        mean.update(torch.tensor(value, dtype=torch.bfloat16), size)
    bf16 = [float(torch.tensor(value, dtype=torch.bfloat16)) for value in (0.3, 1.7, 0.1)]
    assert float(mean.compute()) == pytest.approx((bf16[0] * 3 + bf16[1] + bf16[2] * 300) / 304, rel=1e-6)
    assert int(mean.count) == 304
    mean.reset()
    assert mean.total.dtype == torch.float64
    # built while bf16 is the default dtype (Trainer.init_module under "bf16-true"), or cast to float64
    # ("64-true"): the sum neither rounds to bfloat16 nor narrows a float64 loss to float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        built = ExampleMean()
    finally:
        torch.set_default_dtype(previous)
    assert built.total.dtype == torch.float64
    wide = ExampleMean().to(torch.float64)
    wide.update(torch.tensor(1 / 3, dtype=torch.float64), 3)
    wide.update(torch.tensor(1e-9, dtype=torch.float64), 1)
    assert float(wide.compute()) == (1 / 3 * 3 + 1e-9) / 4
    # a diverged batch shows (MeanMetric would drop it with a warning)
    mean.update(torch.tensor(float("nan")), 2)
    mean.update(torch.tensor(1.0), 2)
    assert torch.isnan(mean.compute())


# ----- text classifier -------------------------------------------------------------------------------------------


def _text_data() -> TextPairDataModule:
    # the shared easy task; its validation split is never read here (the trainers skip validation)
    return text_data(max_length=48)


def test_text_classifier_trains_and_writes_a_t5_task_vector(tmp_path):
    L.seed_everything(3)
    data = _text_data()
    out = tmp_path / "t5.safetensors"
    module = TextClassifier("t5-tiny-offline", lr=3e-3, weight_decay=0.0, warmup_steps=1, task_vector_out=str(out))
    pretrained = snapshot_state(module.encoder)
    module.encoder.eval()  # as transformers' from_pretrained hands it over: dropout off
    modes = EncoderModeProbe()
    trainer = _trainer(12, callbacks=[modes])
    trainer.fit(module, datamodule=data)
    assert module.num_classes == 2
    assert len(modes.modes) == 12 and all(modes.modes)  # fine-tuning with T5's dropout, as transformers' Trainer does

    tensors, sidecar = load_task_vector(out)
    assert sidecar["family"] == "t5" and sidecar["encoder"] == "t5-encoder"
    assert sidecar["model"] == "t5-tiny-offline" and sidecar["task"] == "toy-rte" and sidecar["steps"] == 12
    after = module.encoder.state_dict()
    assert set(tensors) == {key for key, value in after.items() if value.is_floating_point()}
    assert all(torch.equal(value, after[key] - pretrained[key]) for key, value in tensors.items())
    assert tensors["encoder.block.0.layer.0.SelfAttention.q.weight"].abs().sum() > 0
    # T5 ties shared.weight and encoder.embed_tokens.weight: the vector names both, and applying it to
    # the pretrained encoder must add the embedding update once, reproducing the fine-tuned encoder
    assert tensors["shared.weight"].abs().sum() > 0
    assert torch.equal(tensors["shared.weight"], tensors["encoder.embed_tokens.weight"])
    rebuilt = TextClassifier("t5-tiny-offline").encoder
    rebuilt.load_state_dict(pretrained, strict=False)
    apply_task_vector(rebuilt, tensors)
    assert all(torch.allclose(value, after[key], atol=1e-6) for key, value in rebuilt.state_dict().items()
               if value.is_floating_point())
    tensors["shared.weight"] = tensors["shared.weight"] + 1.0
    with pytest.raises(TaskVectorKeyError, match="one tied parameter"):
        apply_task_vector(rebuilt, tensors)
    assert all(torch.allclose(value, after[key], atol=1e-6) for key, value in rebuilt.state_dict().items()
               if value.is_floating_point())  # refused before anything was changed


def test_text_linear_probe_keeps_the_t5_encoder_fixed():
    L.seed_everything(4)
    module = TextClassifier("t5-tiny-offline", num_classes=2, lr=1e-2, freeze_encoder=True, warmup_steps=0)
    encoder_before = {key: value.clone() for key, value in module.encoder.state_dict().items()}
    head_before = module.head.weight.detach().clone()
    _trainer(4).fit(module, datamodule=_text_data())
    assert all(torch.equal(value, encoder_before[key]) for key, value in module.encoder.state_dict().items())
    assert not torch.equal(module.head.weight, head_before)


def test_existing_task_vector_output_is_refused_before_training(tmp_path):
    out = tmp_path / "taken.safetensors"
    out.write_bytes(b"not ours")
    module = TextClassifier("t5-tiny-offline", num_classes=2, warmup_steps=0, task_vector_out=str(out))
    trainer = _trainer(3)
    with pytest.raises(OutputExistsError, match="overwrite"):
        trainer.fit(module, datamodule=_text_data())
    assert trainer.global_step == 0 and out.read_bytes() == b"not ours"
    named_badly = TextClassifier("t5-tiny-offline", num_classes=2, warmup_steps=0, task_vector_out=str(tmp_path / "t5.rte"))
    trainer = _trainer(3)
    with pytest.raises(OutputPathError, match="safetensors"):
        trainer.fit(named_badly, datamodule=_text_data())
    assert trainer.global_step == 0


class Diverge(L.Callback):
    """Puts a NaN into the encoder after the first step, as a diverged fine-tune would have."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with torch.no_grad():
            next(pl_module.encoder.parameters()).view(-1)[0] = float("nan")


def test_a_diverged_fine_tune_writes_no_task_vector(tmp_path):
    out = tmp_path / "t5.safetensors"
    module = TextClassifier("t5-tiny-offline", num_classes=2, warmup_steps=0, task_vector_out=str(out))
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        _trainer(2, callbacks=[Diverge()]).fit(module, datamodule=_text_data())
    assert not out.exists() and not out.with_suffix(".json").exists()


# ----- ValidateAtStart ---------------------------------------------------------------------------------------


class RecordingLogger(Logger):
    """Keeps what was logged, in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.logged.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


def test_validate_at_start_logs_what_the_validation_loop_would_at_step_zero():
    # a text module (dict batches), label smoothing and a batch limit: step 0 must be the loop's own measurement
    L.seed_everything(5)
    module = TextClassifier("t5-tiny-offline", num_classes=2, label_smoothing=0.3)
    data = text_data(max_length=48, batch_size=8)
    expected = _trainer(1, validate=True)
    expected.limit_val_batches = 1
    reference = expected.validate(module, datamodule=data, verbose=False)[0]
    logger = RecordingLogger()
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=logger, limit_val_batches=1, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[ValidateAtStart()])
    trainer.fit(module, datamodule=data)
    step, metrics = next((step, metrics) for step, metrics in logger.logged if "val/loss" in metrics)
    assert step == 0
    assert metrics["val/loss"] == pytest.approx(reference["val/loss"], rel=1e-5)
    assert metrics["val/acc"] == pytest.approx(reference["val/acc"])


def test_step_zero_counts_for_steps_to_target():
    L.seed_everything(5)
    module = TextClassifier("t5-tiny-offline", num_classes=2)
    logger = RecordingLogger()
    reached = StepsToTarget(monitor="val/acc", target=0.0)  # any start reaches it: at step 0
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=logger, limit_val_batches=1, val_check_interval=1,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=[ValidateAtStart(), reached])
    trainer.fit(module, datamodule=text_data(max_length=48, batch_size=8))
    assert reached.reached_at == 0 and reached.optimizer_steps == 0
    assert [step for step, metrics in logger.logged if "steps_to_target/val/acc" in metrics] == [0]


def test_a_fit_that_ends_short_of_its_target_says_so(caplog):
    L.seed_everything(5)
    module = TextClassifier("t5-tiny-offline", num_classes=2)
    unreachable = StepsToTarget(monitor="val/acc", target=1.5)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=RecordingLogger(), limit_val_batches=1, val_check_interval=1,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=[ValidateAtStart(), unreachable])
    with caplog.at_level(logging.INFO):
        trainer.fit(module, datamodule=text_data(max_length=48, batch_size=8))
    assert unreachable.reached_at is None and unreachable.best is not None and 0.0 <= unreachable.best <= 1.0
    assert f"val/acc did not reach 1.5 in 2 steps (best {unreachable.best:.4g})" in caplog.text


def test_a_true_half_precision_fit_writes_only_what_training_changed(tmp_path):
    # bf16-true casts the encoder after the module took its pretrained snapshot; the cast is the
    # start, not part of the update (a fit that learns nothing must write a zero vector)
    L.seed_everything(5)
    out = tmp_path / "bf16.safetensors"
    module = TextClassifier("t5-tiny-offline", num_classes=2, lr=0.0, warmup_steps=0, task_vector_out=str(out))
    trainer = L.Trainer(accelerator="cpu", max_steps=2, precision="bf16-true", logger=RecordingLogger(),
                        limit_val_batches=1, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[ValidateAtStart()])
    trainer.fit(module, datamodule=text_data(max_length=48, batch_size=8))  # step 0 evaluates in bf16 too
    assert next(module.encoder.parameters()).dtype == torch.bfloat16
    vector, _ = load_task_vector(out)
    assert vector and all(not value.any() for value in vector.values())


def test_validate_at_start_evaluates_in_the_run_s_precision(colours):
    # an image module under bf16-true: pixels must be cast like the validation loop casts them
    data = _image_data(colours)
    module = ImageClassifier(TINY, None, head="zeroshot", warmup_steps=0)
    logger = RecordingLogger()
    trainer = L.Trainer(accelerator="cpu", max_steps=1, precision="bf16-true", logger=logger, limit_val_batches=1,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=[ValidateAtStart()])
    trainer.fit(module, datamodule=data)
    assert [step for step, metrics in logger.logged if "val/acc" in metrics] == [0]


def test_predict_returns_each_test_example_s_class_and_probabilities():
    L.seed_everything(6)
    module = TextClassifier("t5-tiny-offline", num_classes=2)
    data = text_data(max_length=48, batch_size=8)
    trainer = _trainer(1)
    batches = trainer.predict(module, datamodule=data)
    data.setup("test")
    test_labels = torch.cat([batch[1] if isinstance(batch, (tuple, list)) else batch["labels"] for batch in data.test_dataloader()])
    labels = torch.cat([batch["label"] for batch in batches])
    assert torch.equal(labels, test_labels)
    probabilities = torch.cat([batch["probabilities"] for batch in batches])
    assert probabilities.shape == (len(test_labels), 2) and torch.allclose(probabilities.sum(-1), torch.ones(len(test_labels)))
    assert torch.equal(torch.cat([batch["prediction"] for batch in batches]), probabilities.argmax(-1))
    accuracy = trainer.test(module, datamodule=data, verbose=False)[0]["test/acc"]
    assert accuracy == pytest.approx(float((probabilities.argmax(-1) == labels).float().mean()))


def test_a_datamodule_preprocessing_for_another_model_is_refused(colours, tmp_path):
    register_tiny_openclip(tmp_path, {"tt-modules-other": (16, 16)})
    other = ImageClassificationDataModule.from_datasets(colours, name="colours", model_name="tt-modules-other", batch_size=12)
    module = ImageClassifier(TINY, None, head="zeroshot", classnames=CLASSNAMES)
    with pytest.raises(FamilyMismatchError, match="preprocesses images for 'tt-modules-other'"):
        _trainer(1, validate=True).validate(module, datamodule=other, verbose=False)
