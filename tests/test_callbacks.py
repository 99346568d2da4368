"""Tests of TheseusCallback in real fits: exact warm start, resume, DDP, eval mode, held-out batches."""

from __future__ import annotations

import os

# before datasets / huggingface_hub are imported: every hub call must fail fast
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import csv
import re
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import datasets
import lightning as L
import numpy as np
import open_clip
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy
from PIL import Image
from torch import nn

import theseus_transport.callbacks.theseus as theseus_module
from theseus_transport.callbacks import TheseusCallback, ValidateAtStart
from theseus_transport.data import ImageClassificationDataModule, TextPairDataModule
from theseus_transport.families import load_base_encoder, load_t5_encoder
from theseus_transport.modules import ImageClassifier, TextClassifier, snapshot_state
from theseus_transport.transport import load_task_vector, save_task_vector, transport
from tiny_clip import register_tiny_openclip
from tiny_tasks import T5_SOURCE, T5_TARGET, t5_task_vector, text_data
from twins import random_task_vector

# tiny models: one thread avoids contention on the loaded CI machine (spawned DDP workers import this too)
torch.set_num_threads(1)

CLIP_SOURCE, CLIP_TARGET = "tt-callbacks-source", "tt-callbacks-target"
CLASSNAMES = ["red", "green", "blue"]


# ----- tiny data and task vectors ------------------------------------------------------------------------------------


def _no_dropout(module: nn.Module) -> nn.Module:
    # Lightning checkpoints do not hold the global RNG, so dropout masks differ after a restart;
    # without dropout a resumed fit must match an uninterrupted one exactly
    for child in module.modules():
        if isinstance(child, nn.Dropout):
            child.p = 0.0
        elif isinstance(getattr(child, "dropout", None), float):
            child.dropout = 0.0  # T5Attention applies functional dropout with this rate
    return module


def _text_module(lr: float = 1e-3) -> TextClassifier:
    L.seed_everything(0)  # the head is initialised from the global RNG: same seed, same head
    return _no_dropout(TextClassifier(T5_TARGET, num_classes=2, lr=lr, weight_decay=0.0, warmup_steps=0))


def _trainer(tmp_path, callbacks=(), **kwargs) -> L.Trainer:
    settings = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(tmp_path),
        callbacks=list(callbacks),
    )
    settings.update(kwargs)
    return L.Trainer(**settings)


class FirstStepProbe(L.Callback):
    """Records the encoder weights when training starts and just before the first optimizer step."""

    def __init__(self) -> None:
        self.at_train_start: dict[str, torch.Tensor] | None = None
        self.before_first_step: dict[str, torch.Tensor] | None = None
        self.theseus_state: dict | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.at_train_start = snapshot_state(pl_module.encoder)
        theseus = [cb for cb in trainer.callbacks if isinstance(cb, TheseusCallback)]
        self.theseus_state = dict(theseus[0].state) if theseus else None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.before_first_step is None and trainer.global_step == 0:
            self.before_first_step = snapshot_state(pl_module.encoder)


def _assert_close_states(actual: dict, expected: dict, atol: float = 1e-6) -> None:
    assert set(actual) == set(expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=atol, rtol=0, msg=lambda m, key=key: f"{key}: {m}")


def _moved(after: dict, before: dict) -> float:
    return max(float((after[key] - before[key]).abs().max()) for key in before)


# ----- 1. exact warm start -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("attention_maps", ["per_point", "heads"])
def test_fit_adds_alpha_times_the_engine_transport_before_the_first_step(tmp_path, attention_maps):
    vector_path = t5_task_vector(tmp_path)
    file_bytes = open(vector_path, "rb").read()
    module = _text_module()
    base = snapshot_state(module.encoder)
    theseus = TheseusCallback(vector_path, source_model=T5_SOURCE, alpha=0.7, held_out_batches=1, attention_maps=attention_maps)
    probe = FirstStepProbe()
    trainer = _trainer(tmp_path, callbacks=[theseus, probe], max_steps=2)
    trainer.fit(module, datamodule=text_data(calibration_batches=2))

    # the engine, called directly on the same calibration batches
    reference = text_data(calibration_batches=2)
    reference.setup("fit")
    calibration = list(reference.calibration_dataloader(source_model_name=T5_SOURCE))
    assert len(calibration) == 2
    vector, sidecar = load_task_vector(vector_path)
    direct = transport(
        load_base_encoder("t5", T5_SOURCE), load_t5_encoder(T5_TARGET), vector, calibration, family="t5", progress=False,
        attention_maps=attention_maps,
    )
    expected = {key: base[key] + 0.7 * direct.task_vector.get(key, torch.zeros_like(base[key])) for key in base}
    _assert_close_states(probe.before_first_step, expected)
    assert _moved(probe.before_first_step, base) > 1e-3  # the update is far above the tolerance
    assert _moved(snapshot_state(module.encoder), probe.before_first_step) > 0  # and training went on from there

    assert theseus.state["applied"] and theseus.state["alpha"] == 0.7 and theseus.state["attention_maps"] == attention_maps
    assert theseus.state["task_vector_sha256"] == sidecar["sha256"]
    assert theseus.state["calibration_batches_per_rank"] == 2 and theseus.state["world_size"] == 1
    assert theseus.report.alignment  # the held-out batch fed the activation-cosine report
    assert set(theseus.report.update_alignment) == set(theseus.report.alignment)  # and the update fidelity
    assert open(vector_path, "rb").read() == file_bytes  # files are only read


def test_a_memory_budget_gives_the_same_warm_start(tmp_path, monkeypatch):
    vector_path = t5_task_vector(tmp_path)
    budgets = []

    def spy(*args, **kwargs):
        budgets.append(kwargs.get("memory_budget_bytes"))
        return transport(*args, **kwargs)

    monkeypatch.setattr(theseus_module, "transport", spy)
    starts = []
    for budget in (None, 0.05):  # 50 KiB: one pass per few layers
        module = _text_module()
        probe = FirstStepProbe()
        theseus = TheseusCallback(vector_path, source_model=T5_SOURCE, memory_budget_mb=budget)
        _trainer(tmp_path, callbacks=[theseus, probe], max_steps=1).fit(module, datamodule=text_data(calibration_batches=2))
        starts.append(probe.before_first_step)
    _assert_close_states(starts[1], starts[0], atol=1e-6)
    assert budgets == [None, int(0.05 * 2**20)]
    with pytest.raises(ValueError, match="memory_budget_mb"):
        TheseusCallback(vector_path, source_model=T5_SOURCE, memory_budget_mb=0)


def test_task_placeholder_and_mismatched_source_are_handled(tmp_path):
    vector_path = t5_task_vector(tmp_path)
    templated = tmp_path / "{task}.safetensors"
    os.rename(vector_path, tmp_path / "toy-rte.safetensors")
    os.rename(vector_path.replace(".safetensors", ".json"), tmp_path / "toy-rte.json")
    module = _text_module()
    theseus = TheseusCallback(str(templated), source_model=T5_SOURCE)
    _trainer(tmp_path, callbacks=[theseus], max_steps=1).fit(module, datamodule=text_data())
    assert theseus.state["task_vector"] == str(tmp_path / "toy-rte.safetensors")

    wrong = TheseusCallback(str(templated), source_model="t5-tiny-offline-wide")
    with pytest.raises(theseus_module.FamilyMismatchError, match="t5-tiny-offline"):
        _trainer(tmp_path, callbacks=[wrong], max_steps=1).fit(_text_module(), datamodule=text_data())


# ----- 2. resume ------------------------------------------------------------------------------------------------


def test_resume_keeps_the_checkpoint_and_never_transports_again(tmp_path, monkeypatch):
    vector_path = t5_task_vector(tmp_path)
    calls: list[int] = []
    engine_transport = theseus_module.transport

    def counting_transport(*args, **kwargs):
        calls.append(1)
        return engine_transport(*args, **kwargs)

    monkeypatch.setattr(theseus_module, "transport", counting_transport)

    # uninterrupted: 2 epochs of 4 steps, a checkpoint after every epoch
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1, save_last=True)
    full_module = _text_module()
    theseus = TheseusCallback(vector_path, source_model=T5_SOURCE, alpha=0.5)
    _trainer(tmp_path, callbacks=[theseus, checkpoints], max_epochs=2, enable_checkpointing=True).fit(
        full_module, datamodule=text_data(calibration_batches=2)
    )
    assert calls == [1]
    first_epoch = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"
    assert first_epoch.is_file() and (tmp_path / "ckpt" / "last.ckpt").is_file()

    # resumed from the end of epoch 0 with a fresh module and callback
    resumed_module = _text_module()
    resumed_theseus = TheseusCallback(vector_path, source_model=T5_SOURCE, alpha=0.5)
    probe = FirstStepProbe()
    trainer = _trainer(tmp_path, callbacks=[resumed_theseus, probe], max_epochs=2)
    trainer.fit(resumed_module, datamodule=text_data(calibration_batches=2), ckpt_path=str(first_epoch))

    assert calls == [1]  # no transport on resume
    checkpoint = torch.load(first_epoch, map_location="cpu", weights_only=False)
    saved = {key[len("encoder.") :]: value for key, value in checkpoint["state_dict"].items() if key.startswith("encoder.")}
    assert all(torch.equal(probe.at_train_start[key], saved[key]) for key in probe.at_train_start)
    sha = load_task_vector(vector_path)[1]["sha256"]
    assert probe.theseus_state == checkpoint["callbacks"][resumed_theseus.state_key]
    assert probe.theseus_state["applied"] and probe.theseus_state["task_vector_sha256"] == sha
    assert probe.theseus_state["method"] == "theseus" and probe.theseus_state["alpha"] == 0.5
    assert probe.theseus_state["calibration_batches_per_rank"] == 2
    assert trainer.global_step == 8
    # resumed with another alpha: the checkpoint's update stays, and the run says so
    other_alpha = TheseusCallback(vector_path, source_model=T5_SOURCE, alpha=0.7)
    with pytest.warns(UserWarning, match="alpha 0.5 -> 0.7"):
        _trainer(tmp_path, callbacks=[other_alpha], max_epochs=2).fit(
            _text_module(), datamodule=text_data(calibration_batches=2), ckpt_path=str(first_epoch))
    assert calls == [1] and other_alpha.state["alpha"] == 0.5
    _assert_close_states(snapshot_state(resumed_module.encoder), snapshot_state(full_module.encoder), atol=1e-7)
    torch.testing.assert_close(resumed_module.head.weight, full_module.head.weight, atol=1e-7, rtol=0)


def test_resume_from_a_checkpoint_without_theseus_state_applies_nothing(tmp_path):
    plain = _text_module()
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.fit(plain, datamodule=text_data())
    checkpoint = tmp_path / "plain.ckpt"
    trainer.save_checkpoint(checkpoint)
    module = _text_module()
    theseus = TheseusCallback(t5_task_vector(tmp_path), source_model=T5_SOURCE)
    probe = FirstStepProbe()
    with pytest.warns(UserWarning, match="holds no state"):
        _trainer(tmp_path, callbacks=[theseus, probe], max_steps=3).fit(module, datamodule=text_data(), ckpt_path=str(checkpoint))
    assert not theseus.state["applied"]
    _assert_close_states(probe.at_train_start, snapshot_state(plain.encoder), atol=0)


def test_one_callback_serves_several_fits_and_never_updates_a_trained_model_twice(tmp_path):
    theseus = TheseusCallback(t5_task_vector(tmp_path), source_model=T5_SOURCE, apply_on_eval=True)
    moved = []
    for _ in range(2):  # e.g. a loop over seeds sharing one callbacks list
        module = _text_module(lr=0.0)
        base = snapshot_state(module.encoder)
        _trainer(tmp_path, callbacks=[theseus], max_steps=1).fit(module, datamodule=text_data())
        moved.append(_moved(snapshot_state(module.encoder), base))
    assert moved[0] > 1e-3 and moved[1] == pytest.approx(moved[0])  # the second module got it too
    # evaluating that module again: it holds the update already, nothing more is added
    warm = snapshot_state(module.encoder)
    _trainer(tmp_path, callbacks=[theseus], limit_val_batches=1).validate(module, datamodule=text_data(), verbose=False)
    _assert_close_states(snapshot_state(module.encoder), warm, atol=0)
    # a trained model handed to a fresh callback (as after load_from_checkpoint): warned, left as it is
    fresh = TheseusCallback(theseus.task_vector_path, source_model=T5_SOURCE, apply_on_eval=True)
    with pytest.warns(UserWarning, match="differs from its pretrained weights"):
        _trainer(tmp_path, callbacks=[fresh]).test(module, datamodule=text_data(), verbose=False)
    _assert_close_states(snapshot_state(module.encoder), warm, atol=0)
    assert not fresh.state["applied"]


# ----- 3. DDP ---------------------------------------------------------------------------------------------------


class RankRecorder(L.Callback):
    """Writes each rank's encoder weights and TheseusCallback state once fitting starts."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_fit_start(self, trainer, pl_module) -> None:
        theseus = next(cb for cb in trainer.callbacks if isinstance(cb, TheseusCallback))
        payload = {"state": theseus.state, "encoder": snapshot_state(pl_module.encoder)}
        torch.save(payload, os.path.join(self.folder, f"rank{trainer.global_rank}.pt"))


def test_ddp_ranks_agree_with_one_process_on_the_same_calibration_data(tmp_path):
    vector_path = t5_task_vector(tmp_path)
    # one process: both calibration batches
    single = _text_module(lr=0.0)
    base = snapshot_state(single.encoder)
    single_theseus = TheseusCallback(vector_path, source_model=T5_SOURCE)
    _trainer(tmp_path, callbacks=[single_theseus], max_steps=1).fit(single, datamodule=text_data(calibration_batches=2))

    # two processes: one calibration batch each, statistics summed across ranks
    folder = tmp_path / "ranks"
    folder.mkdir()
    spread = _text_module(lr=0.0)
    trainer = _trainer(
        tmp_path,
        callbacks=[TheseusCallback(vector_path, source_model=T5_SOURCE), RankRecorder(str(folder))],
        max_steps=1,
        # ddp_spawn with a short collective timeout, so a rank waiting on the other fails instead of hanging
        strategy=DDPStrategy(start_method="spawn", timeout=timedelta(seconds=90)),
        devices=2,
        # a logger makes the callback ask for trainer.log_dir, a collective call: it must not hang
        logger=TensorBoardLogger(str(tmp_path / "logs"), name="ddp", version=0),
    )
    trainer.fit(spread, datamodule=text_data(calibration_batches=2))
    assert (tmp_path / "logs" / "ddp" / "version_0" / "theseus_report.json").is_file()

    ranks = [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    assert ranks[0]["state"] == ranks[1]["state"]
    assert ranks[0]["state"]["world_size"] == 2 and ranks[0]["state"]["calibration_batches_per_rank"] == 1
    # summed over ranks: as many calibration tokens as the single process saw
    assert ranks[0]["state"]["calibration_tokens"] == single_theseus.state["calibration_tokens"]
    _assert_close_states(ranks[1]["encoder"], ranks[0]["encoder"], atol=0)
    expected = snapshot_state(single.encoder)
    assert _moved(expected, base) > 1e-3
    _assert_close_states(ranks[0]["encoder"], expected)
    # lr = 0: the main process got rank 0's (unchanged) weights back from the spawned workers
    _assert_close_states(snapshot_state(spread.encoder), expected)


def test_ddp_refusals_stop_every_rank(tmp_path):
    # one calibration batch for two ranks, and a task_vector_out that exists: each must end the run on
    # both ranks with its own message. (Under ddp_spawn a dead rank also ends the others; under a
    # launcher such as torchrun the other ranks would wait in their first collective until the timeout.)
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"not ours")
    vector_path = t5_task_vector(tmp_path)
    for module, data, message in (
        (_text_module(lr=0.0), text_data(calibration_batches=1), "a rank got no calibration batches"),
        (_no_dropout(TextClassifier(T5_TARGET, num_classes=2, task_vector_out=str(taken))), text_data(calibration_batches=2),
         "exists"),
    ):
        trainer = _trainer(
            tmp_path, callbacks=[TheseusCallback(vector_path, source_model=T5_SOURCE)],
            max_steps=1, strategy=DDPStrategy(start_method="spawn", timeout=timedelta(seconds=60)), devices=2,
        )
        with pytest.raises(Exception, match=message):
            trainer.fit(module, datamodule=data)
    assert taken.read_bytes() == b"not ours"


def _uneven_text_data() -> TextPairDataModule:
    # 9 validation and 5 test examples in batches of 2 on two ranks: rank 0 gets one example and one batch more
    # than rank 1, and a padding DistributedSampler would evaluate example 0 twice
    return text_data(eval_batch_size=2, val_limit=9, test_limit=5)


def _buffered_text_module() -> TextClassifier:
    module = _text_module(lr=0.0)  # lr = 0: a fit leaves the weights the reference was measured on
    # a buffer makes DDP broadcast buffers at the first evaluation forward, as the image classifiers' heads do:
    # the rank with fewer batches must still get there and not hang
    module.register_buffer("probe", torch.ones(1))
    return module


@torch.no_grad()
def _correct(module: TextClassifier, loader) -> torch.Tensor:
    module.eval()
    return torch.cat([module.evaluate_batch(batch)[1] for batch in loader])


def test_ddp_evaluation_counts_every_example_once(tmp_path):
    # one process: the reference figures
    single = _buffered_text_module()
    reference = {}
    reference.update(_trainer(tmp_path, limit_val_batches=1.0).validate(single, datamodule=_uneven_text_data(), verbose=False)[0])
    reference.update(_trainer(tmp_path).test(single, datamodule=_uneven_text_data(), verbose=False)[0])
    data = _uneven_text_data()
    data.setup("test")
    for split, loader in (("val", data.val_dataloader()), ("test", data.test_dataloader())):
        right = _correct(single, loader)
        assert reference[f"{split}/acc"] == pytest.approx(float(right.float().mean()))
        # the test can tell: counting example 0 twice (the padded DistributedSampler's figure) gives another value
        assert float((right.sum() + right[0]) / (len(right) + 1)) != pytest.approx(reference[f"{split}/acc"])

    def ddp() -> dict[str, Any]:  # a strategy object serves one trainer
        return dict(strategy=DDPStrategy(start_method="spawn", timeout=timedelta(seconds=90)), devices=2)

    # test: each rank evaluates its unpadded share, the metrics sum the shares
    tested = _trainer(tmp_path, **ddp()).test(_buffered_text_module(), datamodule=_uneven_text_data(), verbose=False)[0]
    assert tested["test/acc"] == pytest.approx(reference["test/acc"])
    assert tested["test/loss"] == pytest.approx(reference["test/loss"], rel=1e-5)

    # fit: ValidateAtStart at step 0 and the validation loop after step 1 (through the DDP wrapper), uneven batches
    logger = CSVLogger(str(tmp_path / "logs"), name="ddp-eval", version=0)
    trainer = _trainer(tmp_path, callbacks=[ValidateAtStart()], max_steps=1, limit_val_batches=1.0, val_check_interval=1,
                       logger=logger, **ddp())
    trainer.fit(_buffered_text_module(), datamodule=_uneven_text_data())
    with open(tmp_path / "logs" / "ddp-eval" / "version_0" / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("val/acc")]
    assert len(rows) == 2  # step 0, then the validation loop
    for row in rows:
        assert float(row["val/acc"]) == pytest.approx(reference["val/acc"])
        assert float(row["val/loss"]) == pytest.approx(reference["val/loss"], rel=1e-5)


# ----- image classifier, eval mode -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_pair(tmp_path_factory):
    """Register two tiny OpenCLIP configs and save a 'pretrained' checkpoint of the source."""
    folder = tmp_path_factory.mktemp("callback_clip")
    register_tiny_openclip(folder, {CLIP_SOURCE: (32, 32), CLIP_TARGET: (40, 48)})
    torch.manual_seed(11)
    checkpoint = folder / "source.pt"
    source = open_clip.create_model(CLIP_SOURCE)
    torch.save(source.state_dict(), checkpoint)
    vector = random_task_vector(source.visual, lambda key: True, scale=0.05, seed=3)
    vector_path = folder / "source-colours.safetensors"
    save_task_vector(vector_path, vector, {"family": "openclip", "model": CLIP_SOURCE, "pretrained": str(checkpoint)})
    return str(checkpoint), str(vector_path)


def _colour_data(**calibration: Any) -> ImageClassificationDataModule:
    rng = np.random.default_rng(0)

    def split(count: int) -> datasets.Dataset:
        images, labels = [], []
        for index in range(count):
            pixels = rng.integers(0, 90, size=(16, 16, 3))
            pixels[..., index % 3] += 160
            images.append(Image.fromarray(pixels.astype(np.uint8)))
            labels.append(index % 3)
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSNAMES)})
        return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)

    raw = datasets.DatasetDict({"train": split(24), "val": split(12), "test": split(6)})
    return ImageClassificationDataModule.from_datasets(
        raw, name="colours", model_name=CLIP_TARGET, batch_size=6, **{"calibration_batch_size": 6, **calibration}
    )


def _clip_target(**kwargs) -> ImageClassifier:
    torch.manual_seed(5)  # the target is randomly initialised: the same seed gives the same base
    return ImageClassifier(CLIP_TARGET, None, **kwargs)


def test_image_classifier_fit_and_zero_shot_eval_get_the_transported_update(clip_pair, tmp_path):
    checkpoint, vector_path = clip_pair
    reference = _colour_data()
    reference.setup("fit")
    calibration = list(reference.calibration_dataloader(source_model_name=CLIP_SOURCE, source_pretrained=checkpoint))
    vector, _ = load_task_vector(vector_path)
    target_base = _clip_target().encoder
    direct = transport(load_base_encoder("openclip", CLIP_SOURCE, checkpoint), target_base, vector, calibration, family="openclip", progress=False)

    def expected(base: dict) -> dict:
        return {key: base[key] + direct.task_vector.get(key, torch.zeros_like(base[key])) for key in base}

    # fit: warm start before the first step
    module = _clip_target(lr=1e-3, warmup_steps=0)
    base = snapshot_state(module.encoder)
    probe = FirstStepProbe()
    theseus = TheseusCallback(vector_path, source_model=CLIP_SOURCE, source_pretrained=checkpoint)
    _trainer(tmp_path, callbacks=[theseus, probe], max_steps=1).fit(module, datamodule=_colour_data())
    _assert_close_states(probe.before_first_step, expected(base))
    assert _moved(probe.before_first_step, base) > 1e-3

    # validate / test: only with apply_on_eval, and only once
    plain = _clip_target()
    plain_base = snapshot_state(plain.encoder)
    _trainer(tmp_path, callbacks=[TheseusCallback(vector_path, CLIP_SOURCE, checkpoint)], limit_val_batches=1).validate(
        plain, datamodule=_colour_data(), verbose=False
    )
    _assert_close_states(snapshot_state(plain.encoder), plain_base, atol=0)
    zero_shot = _clip_target()
    zero_shot_base = snapshot_state(zero_shot.encoder)
    eval_theseus = TheseusCallback(vector_path, CLIP_SOURCE, checkpoint, apply_on_eval=True)
    trainer = _trainer(tmp_path, callbacks=[eval_theseus], limit_val_batches=1, limit_test_batches=1)
    trainer.validate(zero_shot, datamodule=_colour_data(), verbose=False)
    _assert_close_states(snapshot_state(zero_shot.encoder), expected(zero_shot_base))
    assert "val/acc" in trainer.callback_metrics and eval_theseus.state["applied"]
    trainer.test(zero_shot, datamodule=_colour_data(), verbose=False)  # already applied: not added twice
    _assert_close_states(snapshot_state(zero_shot.encoder), expected(zero_shot_base))


def test_k_shot_calibration_reaches_the_callback(clip_pair, tmp_path):
    """The paper's Table 3 protocol (k examples per class) is what the callback transports with."""
    checkpoint, vector_path = clip_pair
    shots = {"calibration_protocol": "shots", "calibration_shots": 2, "calibration_batch_size": 3}
    reference = _colour_data(**shots)
    reference.setup("fit")
    calibration = list(reference.calibration_dataloader(source_model_name=CLIP_SOURCE, source_pretrained=checkpoint))
    # 3 classes x 2 shots, one example of every class per batch
    assert [sorted(batch["label"].tolist()) for batch in calibration] == [[0, 1, 2], [0, 1, 2]]
    vector, _ = load_task_vector(vector_path)
    direct = transport(load_base_encoder("openclip", CLIP_SOURCE, checkpoint), _clip_target().encoder, vector,
                       calibration, family="openclip", progress=False)
    module = _clip_target()
    base = snapshot_state(module.encoder)
    theseus = TheseusCallback(vector_path, CLIP_SOURCE, checkpoint, apply_on_eval=True)
    _trainer(tmp_path, callbacks=[theseus], limit_val_batches=1).validate(module, datamodule=_colour_data(**shots), verbose=False)
    assert theseus.state["calibration_batches_per_rank"] == 2
    _assert_close_states(snapshot_state(module.encoder),
                         {key: base[key] + direct.task_vector.get(key, torch.zeros_like(base[key])) for key in base})


# ----- 8. held-out batches -------------------------------------------------------------------------------------------


def _case_numbers(module: TextPairDataModule, batches) -> list[int]:
    numbers = []
    for batch in batches:
        for side in ("source", "target"):
            texts = module.tokenizer().batch_decode(batch[side]["input_ids"], skip_special_tokens=True)
            numbers.append([int(re.search(r"case (\d+)", text).group(1)) for text in texts])
        assert numbers[-1] == numbers[-2]  # paired: the same examples for both models
    return sorted(sum(numbers[::2], []))


def test_held_out_batches_are_paired_seeded_and_disjoint_from_calibration():
    module = text_data(calibration_batches=3)
    module.setup("fit")
    calibration = _case_numbers(module, module.calibration_dataloader(source_model_name=T5_SOURCE))
    held_out = _case_numbers(module, module.held_out_dataloader(source_model_name=T5_SOURCE, batches=2))
    assert len(calibration) == 12 and len(held_out) == 8 and len(set(held_out)) == 8
    assert not set(calibration) & set(held_out)
    assert all(100 <= number < 116 for number in held_out)  # the validation split
    again = _case_numbers(module, module.held_out_dataloader(batches=2))
    assert again == held_out
    shards = [_case_numbers(module, module.held_out_dataloader(batches=2, rank=rank, world_size=2)) for rank in (0, 1)]
    assert sorted(shards[0] + shards[1]) == held_out and not set(shards[0]) & set(shards[1])
    with pytest.warns(UserWarning, match="using all 16"):
        assert len(_case_numbers(module, module.held_out_dataloader(batches=5))) == 16


def test_image_held_out_batches_come_from_validation(clip_pair):
    checkpoint, _ = clip_pair
    module = _colour_data()
    module.setup("fit")
    loader = module.held_out_dataloader(source_model_name=CLIP_SOURCE, source_pretrained=checkpoint, batches=1)
    batch = next(iter(loader))
    assert batch["source"].shape == (6, 3, 32, 32) and batch["target"].shape == (6, 3, 40, 40)
    val_labels = module.splits["val"]["label"]
    indices = module.held_out_batches_for(1)[0]
    assert batch["label"].tolist() == [val_labels[index] for index in indices]


def test_training_order_is_a_function_of_the_epoch_for_exact_resume():
    module = text_data()
    module.setup("fit")
    loader = module.train_dataloader()

    def labels_of_epoch(epoch: int) -> list[int]:
        loader.sampler.set_epoch(epoch)
        return torch.cat([batch["labels"] for batch in loader]).tolist()

    first, second = labels_of_epoch(0), labels_of_epoch(1)
    assert labels_of_epoch(1) == second and labels_of_epoch(0) == first
    orders = [[int(i) for i in loader.sampler] for _ in range(2)]
    assert orders[0] != orders[1]  # plain loops without set_epoch still reshuffle


def test_validate_at_start_builds_no_loader_when_validation_is_off():
    # limit_val_batches=0: Lightning builds no val loader, and under DDP a split smaller than the ranks would be
    # refused by the datamodule's evaluation sampler; the step-0 row has nothing to be part of
    class NoValidation:
        def val_dataloader(self) -> None:
            raise AssertionError("ValidateAtStart built a val loader with validation off")

    trainer = SimpleNamespace(global_step=0, datamodule=NoValidation(), limit_val_batches=0, world_size=2)
    ValidateAtStart().on_train_start(trainer, torch.nn.Linear(1, 1))
