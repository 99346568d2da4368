"""Tests of configs/: every YAML parses, the real-id configs fail offline with OfflineError, the offline ones run."""

from __future__ import annotations

import os

# before datasets / huggingface_hub are imported: every hub call must fail fast
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import contextlib
import importlib.util
import io
import json
import time
from pathlib import Path

import datasets
import huggingface_hub
import lightning as L
import open_clip
import pytest
import yaml

from theseus_transport.cli import lightning_main, main
from theseus_transport.compare import read_scalars
from theseus_transport.transport.errors import OfflineError
from theseus_transport.transport.io import load_task_vector

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
PAPER = CONFIGS / "paper"
VISION_TASKS = sorted((PAPER / "tasks" / "vision").glob("*.yaml"))
TEXT_TASKS = sorted((PAPER / "tasks" / "text").glob("*.yaml"))
EXPERIMENTS = sorted(path for path in PAPER.glob("*/*.yaml") if path.parent.name != "tasks")
OFFLINE = sorted((CONFIGS / "offline").glob("*.yaml"))
TINY_VIT = "tt-configs-vit"


def _subcommand(config: Path) -> str:
    return "test" if "zeroshot" in config.stem else "fit"


def _task_for(experiment: Path, index: int) -> Path:
    """A task file of the right kind, rotating so that every task file is used by some experiment."""
    tasks = TEXT_TASKS if experiment.parent.name == "t5" else VISION_TASKS
    return tasks[index % len(tasks)]


def _print_config(*args: str) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as stop:
        main([*args, "--print_config"])
    assert stop.value.code in (0, None)
    return yaml.safe_load(out.getvalue())


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Nothing cached anywhere, as on a fresh offline machine, whatever this machine has downloaded."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # open_clip's ~/.cache/clip for release URLs


def test_generated_paper_configs_are_committed_and_up_to_date():
    spec = importlib.util.spec_from_file_location("paper_generate", PAPER / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    assert generate.main(["--check"]) == 0
    assert len(EXPERIMENTS) == 4 * 5 + 3 and len(VISION_TASKS) == 8 and len(TEXT_TASKS) == 5


@pytest.mark.parametrize("config", OFFLINE, ids=lambda path: path.stem)
def test_offline_configs_parse(config):
    printed = _print_config(_subcommand(config), "--config", str(config))
    model, data = printed["model"]["init_args"], printed["data"]["init_args"]
    assert model["model_name"].startswith(("theseus-tiny-", "t5-tiny-offline"))
    assert data["dataset"].startswith(("zoo:", "toy:"))
    # image data's model name is linked to the model's: not a second setting (text keeps its tokenizer_name)
    assert not {"model_name", "pretrained"} & set(data)
    for callback in printed["trainer"].get("callbacks") or []:
        if callback["class_path"].endswith("TheseusCallback"):
            assert "{task}" in callback["init_args"]["task_vector"]
            assert callback["init_args"]["apply_on_eval"] == (_subcommand(config) == "test")


def _check_composed(experiment: Path, task: Path) -> None:
    printed = _print_config(_subcommand(experiment), "--config", str(experiment), "--config", str(task))
    task_spec = yaml.safe_load(task.read_text())
    data, model = printed["data"]["init_args"], printed["model"]["init_args"]
    assert data["dataset"] == task_spec["data"]["init_args"]["dataset"]
    assert data["dataset_config"] == task_spec["data"]["init_args"].get("dataset_config")
    assert printed["trainer"]["logger"]["init_args"]["version"] == task.stem
    assert printed["trainer"]["logger"]["init_args"]["name"] == experiment.stem
    assert not {"model_name", "pretrained"} & set(data)  # linked to the model's
    if experiment.parent.name == "t5":
        assert data["tokenizer_name"] == model["model_name"]
        assert model["freeze_encoder"] == experiment.stem.startswith("probe")
    if _subcommand(experiment) == "fit":
        # resumable every 500 steps, not saved once per (few-step) epoch
        checkpoints = [c for c in printed["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
        assert len(checkpoints) == 1 and checkpoints[0]["init_args"]["every_n_train_steps"] == 500
    if experiment.stem in ("finetune_source", "baseline", "warmstart"):
        # the paper's recipe (App. C, after Ilharco et al.)
        assert model["lr"] == 1e-5 and model["weight_decay"] == 0.1 and model["warmup_steps"] == 200
        assert printed["trainer"]["max_steps"] == 2000 and data["batch_size"] == 128


@pytest.mark.parametrize("index", range(len(EXPERIMENTS)), ids=lambda i: f"{EXPERIMENTS[i].parent.name}/{EXPERIMENTS[i].stem}")
def test_paper_experiment_files_parse(index):
    _check_composed(EXPERIMENTS[index], _task_for(EXPERIMENTS[index], index))


@pytest.mark.parametrize("task", VISION_TASKS + TEXT_TASKS, ids=lambda path: path.stem)
def test_paper_task_files_parse(task):
    experiment = PAPER / ("t5/probe_theseus.yaml" if task.parent.name == "text" else "width/warmstart.yaml")
    _check_composed(experiment, task)


def test_paper_experiments_chain_their_task_vectors():
    def load(name: str) -> dict:
        return yaml.safe_load((PAPER / name).read_text())

    def theseus(config: dict) -> dict:
        return next(c["init_args"] for c in config["trainer"]["callbacks"] if c["class_path"].endswith("TheseusCallback"))

    for experiment in ("width", "reverse", "same_arch", "depth"):
        source = load(f"{experiment}/finetune_source.yaml")["model"]["init_args"]
        for run in ("warmstart", "zeroshot_theseus"):
            callback = theseus(load(f"{experiment}/{run}.yaml"))
            assert callback["task_vector"] == source["task_vector_out"]
            assert (callback["source_model"], callback["source_pretrained"]) == (source["model_name"], source["pretrained"])
            assert callback.get("layer_map") == ("interpolate" if experiment == "depth" else None)
    # the target fine-tune of one experiment is the source fine-tune of the next
    assert load("width/baseline.yaml")["model"] == load("reverse/finetune_source.yaml")["model"]
    assert load("reverse/baseline.yaml")["model"] == load("depth/finetune_source.yaml")["model"]
    width = load("width/warmstart.yaml")["model"]["init_args"]
    assert (width["model_name"], width["pretrained"]) == ("ViT-B-16-plus-240", "laion400m_e32")
    assert load("depth/baseline.yaml")["model"]["init_args"]["model_name"] == "ViT-L-14"
    # same architecture (Table 3): DataComp-XL -> LAION-2B ViT-B/16, calibrated with k shots per class, and
    # its runs chain with the others (the source fine-tune is depth's, the target fine-tune is width's)
    assert load("same_arch/finetune_source.yaml")["model"] == load("depth/finetune_source.yaml")["model"]
    assert load("same_arch/baseline.yaml")["model"] == load("width/finetune_source.yaml")["model"]
    for run in ("warmstart", "zeroshot_theseus"):
        data = load(f"same_arch/{run}.yaml")["data"]["init_args"]
        assert (data["calibration_protocol"], data["calibration_shots"]) == ("shots", 4)
        assert "calibration_protocol" not in load(f"width/{run}.yaml")["data"]["init_args"]
    t5 = theseus(load("t5/probe_theseus.yaml"))
    assert t5["source_model"] == "google-t5/t5-3b"
    assert t5["task_vector"] == load("t5/finetune_source.yaml")["model"]["init_args"]["task_vector_out"]


@pytest.mark.parametrize("index", range(len(EXPERIMENTS)), ids=lambda i: f"{EXPERIMENTS[i].parent.name}/{EXPERIMENTS[i].stem}")
def test_real_id_configs_fail_fast_with_offline_error(index, empty_caches):
    experiment = EXPERIMENTS[index]
    task = _task_for(experiment, index)
    model = yaml.safe_load(experiment.read_text())["model"]["init_args"]
    args = [_subcommand(experiment), "--config", str(experiment), "--config", str(task)]
    if args[0] == "fit":
        args += ["--trainer.max_steps", "1"]
    started = time.perf_counter()
    with pytest.raises(OfflineError, match=model["model_name"]) as caught:
        lightning_main(args)
    assert time.perf_counter() - started < 30
    if model.get("pretrained"):
        assert model["pretrained"] in str(caught.value)


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    """A tiny OpenCLIP config with random weights, to get past the model to the dataset."""
    folder = tmp_path_factory.mktemp("openclip_configs")
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
    }
    (folder / f"{TINY_VIT}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)
    return TINY_VIT


def test_a_fit_resumes_and_a_checkpoint_evaluates_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = ["--config", str(CONFIGS / "offline/t5_finetune_source.yaml"), "--model.init_args.task_vector_out", "null",
              "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
              "--trainer.enable_checkpointing", "true", "--trainer.val_check_interval", "1", "--trainer.limit_val_batches", "1"]
    assert main(["fit", *config, "--trainer.max_steps", "2"]) == 0
    checkpoint = next((tmp_path / "outputs/offline/t5_finetune_source/version_0/checkpoints").glob("*.ckpt"))
    # LightningCLI reads the checkpoint's hyperparameters back (its own `_class_path` among them)
    assert main(["fit", *config, "--trainer.max_steps", "3", "--ckpt_path", str(checkpoint)]) == 0
    assert main(["validate", *config[:2], "--trainer.limit_val_batches", "1", "--ckpt_path", str(checkpoint)]) == 0


class CallbackWithItsOwnPreflight(L.Callback):
    """A user's callback whose `preflight` means something else (and takes no arguments)."""

    def preflight(self) -> None:
        raise AssertionError("the CLI called a user's own preflight with the suite's arguments")


def test_the_cli_runs_only_the_suites_own_preflight_checks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(CONFIGS / "offline/t5_finetune_source.yaml"), "--model.init_args.task_vector_out", "null",
            "--trainer.max_steps", "1", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.callbacks+=test_configs.CallbackWithItsOwnPreflight"]
    cli = lightning_main(args)
    assert any(isinstance(callback, CallbackWithItsOwnPreflight) for callback in cli.trainer.callbacks)
    assert cli.trainer.global_step == 1


def test_reruns_into_taken_outputs_are_refused_as_one_line_naming_the_remedy(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = ["--config", str(CONFIGS / "offline/t5_finetune_source.yaml"), "--trainer.enable_progress_bar", "false"]
    pinned = ["validate", *config, "--trainer.limit_val_batches", "1", "--trainer.logger.init_args.version", "pinned"]
    assert main(pinned) == 0
    saved = tmp_path / "outputs/offline/t5_finetune_source/pinned/config.yaml"
    before = saved.read_text()
    # a pinned logger version run twice (every paper task file pins one): LightningCLI's own refusal is a
    # traceback whose remedy this CLI does not offer
    assert main(pinned) == 1
    error = capsys.readouterr().err
    assert "OutputExistsError" in error and "outputs/offline/t5_finetune_source/pinned/config.yaml exists" in error and "--trainer.logger.init_args.version" in error
    assert "Traceback" not in error and saved.read_text() == before
    # a taken task vector: the remedy named is the one `theseus fit` accepts (it has no --overwrite flag)
    vector = tmp_path / "task_vectors/t5-tiny-offline/objects.safetensors"
    vector.parent.mkdir(parents=True)
    vector.write_bytes(b"the user's file")
    assert main(["fit", *config, "--trainer.max_steps", "1"]) == 1
    assert "pass overwrite=True (theseus fit: --model.init_args.overwrite true)" in capsys.readouterr().err
    assert vector.read_bytes() == b"the user's file"


def test_the_data_follows_the_model_it_feeds(tiny_vit):
    # overriding the model's name is enough: the datamodule preprocesses (or tokenises) for it
    cli = lightning_main(["--config", str(CONFIGS / "offline/zeroshot_target.yaml"), "--model.init_args.model_name", tiny_vit,
                          "--model.init_args.pretrained", "null"], run=False)
    assert (cli.datamodule.model_name, cli.datamodule.pretrained) == (tiny_vit, None) == (cli.model.model_name, cli.model.pretrained)
    # text keeps its own tokenizer: a local checkpoint may take it from a hub id
    cli = lightning_main(["--config", str(CONFIGS / "offline/t5_linear_probe.yaml"),
                          "--model.init_args.model_name", "t5-tiny-offline", "--data.init_args.tokenizer_name", "byt5-offline"],
                         run=False)
    assert (cli.model.model_name, cli.datamodule.tokenizer_name) == ("t5-tiny-offline", "byt5-offline")


def test_real_datasets_fail_with_offline_error_naming_them(empty_caches, tiny_vit, capsys):
    tiny_model = ["--model.init_args.pretrained", "null"]
    args = ["test", "--config", str(PAPER / "width/zeroshot_target.yaml"), "--config", str(PAPER / "tasks/vision/svhn.yaml"),
            "--model.init_args.model_name", tiny_vit, *tiny_model,
            "--trainer.logger", "false"]
    with pytest.raises(OfflineError, match="ufldl-stanford/svhn"):
        lightning_main(args)
    args = ["fit", "--config", str(PAPER / "t5/probe_target.yaml"), "--config", str(PAPER / "tasks/text/scitail.yaml"),
            "--model.init_args.model_name", "t5-tiny-offline-wide", "--data.init_args.tokenizer_name", "byt5-offline",
            "--trainer.max_steps", "1", "--trainer.logger", "false"]
    with pytest.raises(OfflineError, match="allenai/scitail"):
        lightning_main(args)
    # the console script turns it into one line and exit status 1
    assert main(args) == 1
    assert "OfflineError" in capsys.readouterr().err


def test_offline_t5_configs_run_source_finetune_then_transported_linear_probe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the configs write task_vectors/ and outputs/ relative to the working directory
    quick = ["--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    probe = ["--data.init_args.calibration_batches", "1", "--trainer.enable_checkpointing", "false"]
    # the probe before its task vector exists: refused before Lightning writes the run's folder, so the
    # rerun below gets version_0 (with a pinned version, as in the paper configs, it would be refused)
    assert main(["fit", "--config", str(CONFIGS / "offline/t5_linear_probe.yaml"), *quick, *probe]) == 1
    assert not (tmp_path / "outputs/offline/t5_linear_probe").exists()
    assert main(["fit", "--config", str(CONFIGS / "offline/t5_finetune_source.yaml"), *quick]) == 0
    vector, sidecar = load_task_vector(tmp_path / "task_vectors/t5-tiny-offline/objects.safetensors")
    assert sidecar["model"] == "t5-tiny-offline" and sidecar["task"] == "objects" and sidecar["steps"] == 2
    assert any(float(value.abs().max()) > 0 for value in vector.values())
    # a second fine-tune would replace that task vector: refused, again before any folder is made
    assert main(["fit", "--config", str(CONFIGS / "offline/t5_finetune_source.yaml"), *quick]) == 1
    assert sorted(path.name for path in (tmp_path / "outputs/offline/t5_finetune_source").iterdir()) == ["version_0"]

    assert main(["fit", "--config", str(CONFIGS / "offline/t5_linear_probe.yaml"), *quick, *probe]) == 0
    run = tmp_path / "outputs/offline/t5_linear_probe/version_0"
    report = json.loads((run / "theseus_report.json").read_text())
    assert report["keys"] and report["alignment"]  # transported, with the held-out cosine report
    assert "theseus/norm_ratio_mean" in read_scalars(run)
