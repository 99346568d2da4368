"""Write the LightningCLI configs of the paper's experiments (run from anywhere; the YAMLs are committed).

One experiment file per run kind and one task file per dataset; a run composes the two:

    theseus fit  --config configs/paper/width/warmstart.yaml       --config configs/paper/tasks/vision/eurosat.yaml
    theseus test --config configs/paper/width/zeroshot_theseus.yaml --config configs/paper/tasks/vision/eurosat.yaml

The hyperparameters live here, once. After editing this file run it again; `--check` only verifies
that the committed YAMLs match (the test suite does that).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
OUTPUTS = "outputs/paper"

# Fine-tuning recipe of the paper (App. C), which follows Ilharco et al. 2023 (task arithmetic):
# 2000 iterations, batch 128, AdamW, peak lr 1e-5, weight decay 0.1, cosine schedule after 200
# warm-up steps, text tower frozen (our zero-shot head is a frozen buffer). The numbers are missing
# from the paper's text extraction and are taken from Ilharco et al.; gradient clipping at 1.0 is
# what their code does.
FINETUNE = {"max_steps": 2000, "batch_size": 128, "lr": 1.0e-5, "weight_decay": 0.1, "warmup_steps": 200, "gradient_clip_val": 1.0}
# Linear probes (paper Sec. 4.3): the paper gives no recipe; ours is AdamW on the head only.
PROBE = {"max_steps": 2000, "batch_size": 128, "lr": 1.0e-3, "weight_decay": 0.0, "warmup_steps": 0}
# Calibration (paper Sec. 4.1): batches of 32 training examples; the paper sweeps 1 to 50 batches.
VISION_CALIBRATION = {"calibration_batches": 10, "calibration_batch_size": 32}
# Sec. 4.3 / Table 3 (same architecture, after Rinaldi et al.): the "standard k-shot protocol", k labelled
# training examples per class for the maps. The paper's k values are lost from its text extraction;
# 4 is our default, a sweep sets --data.init_args.calibration_shots (e.g. 1 2 4 8 16).
SHOTS_CALIBRATION = {"calibration_protocol": "shots", "calibration_shots": 4, "calibration_batch_size": 32}
TEXT_CALIBRATION = {"calibration_batches": 20, "calibration_batch_size": 32}
# Sec. 4.3: the probes get "the same data budget" as the maps (Table 2 sweeps 20 / 50 / 100 batches of
# 32): each probe trains on as many training examples as the calibration uses. A sweep changes both,
# e.g. --data.init_args.calibration_batches 50 --data.init_args.train_limit 1600.
PROBE_TRAIN_EXAMPLES = TEXT_CALIBRATION["calibration_batches"] * TEXT_CALIBRATION["calibration_batch_size"]
TEXT_MAX_LENGTH = 128

VISION_TASKS = {
    "sun397": ("tanganke/sun397", None),
    "stanford_cars": ("tanganke/stanford_cars", None),
    "resisc45": ("tanganke/resisc45", None),
    "eurosat": ("tanganke/eurosat", None),
    "gtsrb": ("tanganke/gtsrb", None),
    "dtd": ("tanganke/dtd", None),
    "svhn": ("ufldl-stanford/svhn", "cropped_digits"),
    "mnist": ("ylecun/mnist", None),
}
TEXT_TASKS = {
    "mnli": ("nyu-mll/glue", "mnli"),
    "qnli": ("nyu-mll/glue", "qnli"),
    "rte": ("nyu-mll/glue", "rte"),
    "snli": ("stanfordnlp/snli", None),
    "scitail": ("allenai/scitail", "tsv_format"),
}

# (OpenCLIP model, pretrained tag) of source and target; depth mismatch needs an interpolated layer map
VISION_EXPERIMENTS = {
    "width": {
        "title": "Width scaling (Table 1): ViT-B/16 LAION-2B -> ViT-B/16+ LAION-400M",
        "source": ("ViT-B-16", "laion2b_s34b_b88k"),
        "target": ("ViT-B-16-plus-240", "laion400m_e32"),
        "layer_map": None,
    },
    "reverse": {
        "title": "Narrowing: ViT-B/16+ LAION-400M -> ViT-B/16 DataComp-XL",
        "source": ("ViT-B-16-plus-240", "laion400m_e32"),
        "target": ("ViT-B-16", "datacomp_xl_s13b_b90k"),
        "layer_map": None,
    },
    "same_arch": {
        "title": "Same architecture (Sec. 4.3, Table 3): ViT-B/16 DataComp-XL -> ViT-B/16 LAION-2B, k-shot calibration",
        "source": ("ViT-B-16", "datacomp_xl_s13b_b90k"),
        "target": ("ViT-B-16", "laion2b_s34b_b88k"),
        "layer_map": None,
        "calibration": SHOTS_CALIBRATION,
    },
    "depth": {
        "title": "Width and depth (Sec. 4.4): ViT-B/16 DataComp-XL -> ViT-L/14 DataComp-XL, interpolated layers",
        "source": ("ViT-B-16", "datacomp_xl_s13b_b90k"),
        "target": ("ViT-L-14", "datacomp_xl_s13b_b90k"),
        "layer_map": "interpolate",
    },
}
TEXT_EXPERIMENT = {
    "title": "Language (Sec. 4.3, Table 2): T5-3B -> T5-Large, linear probes on the frozen encoder",
    "source": "google-t5/t5-3b",
    "target": "google-t5/t5-large",
}

CALLBACKS = "theseus_transport.callbacks"
CHECKPOINT_EVERY = 500
TENSORBOARD = "lightning.pytorch.loggers.TensorBoardLogger"


def vision_task_vector(model: tuple[str, str]) -> str:
    """Where a fine-tune of `model` writes its task vector (`{task}` is filled in at run time)."""
    return f"task_vectors/{model[0]}/{model[1]}/{{task}}.safetensors"


def _trainer(experiment: str, run: str, fit: bool, recipe: dict[str, Any] | None, callbacks: list[dict]) -> dict[str, Any]:
    trainer: dict[str, Any] = {"accelerator": "auto", "devices": 1}
    if fit:
        trainer.update(
            max_steps=recipe["max_steps"],
            val_check_interval=100,
            check_val_every_n_epoch=None,  # validation counts steps across epochs (small datasets)
            log_every_n_steps=10,
            num_sanity_val_steps=0,
        )
        if "gradient_clip_val" in recipe:
            trainer["gradient_clip_val"] = recipe["gradient_clip_val"]
        # a checkpoint to resume from every CHECKPOINT_EVERY steps, not one per epoch: the probes' and small
        # tasks' epochs are a few steps, and a per-epoch save of a T5-Large or ViT-L would be written hundreds of times
        callbacks = [*callbacks, {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                  "init_args": {"every_n_train_steps": CHECKPOINT_EVERY}}]
    # the task file sets the version, so runs land in outputs/paper/<experiment>/<run>/<task>
    trainer["logger"] = {"class_path": TENSORBOARD, "init_args": {"save_dir": f"{OUTPUTS}/{experiment}", "name": run}}
    if callbacks:
        trainer["callbacks"] = callbacks
    return trainer


def _theseus(task_vector: str, source: tuple[str, str | None], calibration_held_out: int, **extra: Any) -> dict[str, Any]:
    init_args = {"task_vector": task_vector, "source_model": source[0], "source_pretrained": source[1], "alpha": 1.0}
    init_args.update(extra)
    init_args["held_out_batches"] = calibration_held_out
    return {"class_path": f"{CALLBACKS}.TheseusCallback", "init_args": init_args}


def _curves() -> list[dict[str, Any]]:
    return [
        {"class_path": f"{CALLBACKS}.ValidateAtStart"},
        {"class_path": f"{CALLBACKS}.StepsToTarget", "init_args": {"monitor": "val/acc", "target": 0.9}},
    ]


def _image_model(model: tuple[str, str], recipe: dict[str, Any] | None, task_vector_out: str | None) -> dict[str, Any]:
    init_args: dict[str, Any] = {"model_name": model[0], "pretrained": model[1], "head": "zeroshot"}
    if recipe is not None:
        init_args.update(lr=recipe["lr"], weight_decay=recipe["weight_decay"], warmup_steps=recipe["warmup_steps"])
    if task_vector_out is not None:
        init_args["task_vector_out"] = task_vector_out
    return {"class_path": "theseus_transport.modules.ImageClassifier", "init_args": init_args}


def _image_data(
    model: tuple[str, str], batch_size: int, calibration: bool, protocol: dict[str, Any] = VISION_CALIBRATION
) -> dict[str, Any]:
    # no dataset here: it comes from the task file, and LightningCLI refuses to run without one
    init_args: dict[str, Any] = {"model_name": model[0], "pretrained": model[1], "batch_size": batch_size}
    if calibration:
        init_args.update(protocol)
    return {"class_path": "theseus_transport.data.ImageClassificationDataModule", "init_args": init_args}


def vision_experiment(name: str, spec: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """The five runs of one vision experiment: file name -> (usage comment, config)."""
    source, target = spec["source"], spec["target"]
    extra = {"layer_map": spec["layer_map"]} if spec["layer_map"] else {}
    protocol = spec.get("calibration", VISION_CALIBRATION)
    tv_source, tv_target = vision_task_vector(source), vision_task_vector(target)
    theseus_fit = _theseus(tv_source, source, 1, **extra)
    theseus_eval = _theseus(tv_source, source, 1, **extra, apply_on_eval=True)
    return {
        "finetune_source": (
            f"fit: fine-tune the source {source[0]} ({source[1]}); writes {tv_source}",
            {"trainer": _trainer(name, "finetune_source", True, FINETUNE, _curves()),
             "model": _image_model(source, FINETUNE, tv_source), "data": _image_data(source, FINETUNE["batch_size"], False)},
        ),
        "zeroshot_target": (
            f"test/validate: zero-shot accuracy of the target {target[0]} ({target[1]}) alone",
            {"trainer": _trainer(name, "zeroshot_target", False, None, []),
             "model": _image_model(target, None, None), "data": _image_data(target, 256, False)},
        ),
        "zeroshot_theseus": (
            "test/validate: zero-shot accuracy of the target plus the transported source task vector "
            "(TheseusCallback apply_on_eval); run finetune_source first",
            {"trainer": _trainer(name, "zeroshot_theseus", False, None, [theseus_eval]),
             "model": _image_model(target, None, None), "data": _image_data(target, 256, True, protocol)},
        ),
        "warmstart": (
            "fit: fine-tune the target starting from pretrained + transported task vector (paper Fig. 3); "
            "run finetune_source first, compare with baseline via `theseus compare`",
            {"trainer": _trainer(name, "warmstart", True, FINETUNE, [theseus_fit, *_curves()]),
             "model": _image_model(target, FINETUNE, None), "data": _image_data(target, FINETUNE["batch_size"], True, protocol)},
        ),
        "baseline": (
            f"fit: fine-tune the target from its pretrained weights (same recipe); writes {tv_target}",
            {"trainer": _trainer(name, "baseline", True, FINETUNE, _curves()),
             "model": _image_model(target, FINETUNE, tv_target), "data": _image_data(target, FINETUNE["batch_size"], False)},
        ),
    }


def _text_model(model: str, recipe: dict[str, Any], probe: bool, task_vector_out: str | None) -> dict[str, Any]:
    init_args: dict[str, Any] = {"model_name": model, "freeze_encoder": probe}
    init_args.update(lr=recipe["lr"], weight_decay=recipe["weight_decay"], warmup_steps=recipe["warmup_steps"])
    if task_vector_out is not None:
        init_args["task_vector_out"] = task_vector_out
    return {"class_path": "theseus_transport.modules.TextClassifier", "init_args": init_args}


def _text_data(tokenizer: str, batch_size: int, calibration: bool, train_limit: int | None = None) -> dict[str, Any]:
    init_args: dict[str, Any] = {"tokenizer_name": tokenizer, "max_length": TEXT_MAX_LENGTH, "batch_size": batch_size}
    if train_limit is not None:
        init_args["train_limit"] = train_limit
    if calibration:
        init_args.update(TEXT_CALIBRATION)
    return {"class_path": "theseus_transport.data.TextPairDataModule", "init_args": init_args}


def text_experiment() -> dict[str, tuple[str, dict[str, Any]]]:
    """The three runs of the T5 experiment."""
    source, target = TEXT_EXPERIMENT["source"], TEXT_EXPERIMENT["target"]
    tv_source = f"task_vectors/{source}/{{task}}.safetensors"
    return {
        "finetune_source": (
            f"fit: fine-tune the {source} encoder and a linear head (the paper's recipe); writes {tv_source}",
            {"trainer": _trainer("t5", "finetune_source", True, FINETUNE, []),
             "model": _text_model(source, FINETUNE, False, tv_source), "data": _text_data(source, FINETUNE["batch_size"], False)},
        ),
        "probe_target": (
            f"fit: linear probe on the frozen pretrained {target} encoder",
            {"trainer": _trainer("t5", "probe_target", True, PROBE, []),
             "model": _text_model(target, PROBE, True, None),
             "data": _text_data(target, PROBE["batch_size"], False, PROBE_TRAIN_EXAMPLES)},
        ),
        "probe_theseus": (
            f"fit: linear probe on the frozen {target} encoder plus the transported {source} task vector; "
            "run finetune_source first",
            {"trainer": _trainer("t5", "probe_theseus", True, PROBE, [_theseus(tv_source, (source, None), 1)]),
             "model": _text_model(target, PROBE, True, None),
             "data": _text_data(target, PROBE["batch_size"], True, PROBE_TRAIN_EXAMPLES)},
        ),
    }


def task_file(dataset: str, config: str | None, task: str) -> dict[str, Any]:
    """A task file: the dataset, and the logger version so each task's run gets its own folder."""
    init_args: dict[str, Any] = {"dataset": dataset}
    if config is not None:
        init_args["dataset_config"] = config
    return {"trainer": {"logger": {"init_args": {"version": task}}}, "data": {"init_args": init_args}}


def _render(header: list[str], config: dict[str, Any]) -> str:
    lines = ["# Generated by configs/paper/generate.py; edit that file and run it again.", *(f"# {line}" for line in header)]
    return "\n".join(lines) + "\n" + yaml.safe_dump(config, sort_keys=False, width=120)


def render_all() -> dict[Path, str]:
    """Every generated file (path relative to configs/paper) and its contents."""
    files: dict[Path, str] = {}
    for name, spec in VISION_EXPERIMENTS.items():
        for run, (usage, config) in vision_experiment(name, spec).items():
            subcommand = "test" if usage.startswith("test") else "fit"
            header = [spec["title"], usage, f"  theseus {subcommand} --config configs/paper/{name}/{run}.yaml "
                      "--config configs/paper/tasks/vision/<task>.yaml"]
            files[Path(name) / f"{run}.yaml"] = _render(header, {"seed_everything": 0, **config})
    for run, (usage, config) in text_experiment().items():
        header = [TEXT_EXPERIMENT["title"], usage, f"  theseus fit --config configs/paper/t5/{run}.yaml "
                  "--config configs/paper/tasks/text/<task>.yaml"]
        files[Path("t5") / f"{run}.yaml"] = _render(header, {"seed_everything": 0, **config})
    for kind, tasks in (("vision", VISION_TASKS), ("text", TEXT_TASKS)):
        for task, (dataset, config) in tasks.items():
            header = [f"Task file ({kind}): compose with an experiment file, e.g. --config configs/paper/"
                      f"{'width/warmstart' if kind == 'vision' else 't5/probe_theseus'}.yaml --config <this file>"]
            files[Path("tasks") / kind / f"{task}.yaml"] = _render(header, task_file(dataset, config, task))
    return files


def main(argv: list[str] | None = None) -> int:
    """Write the configs, or with --check report any that differ from what would be written."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if a file is missing or differs")
    options = parser.parse_args(argv)
    files = render_all()
    stale = [path for path, text in files.items() if not (HERE / path).is_file() or (HERE / path).read_text() != text]
    if options.check:
        for path in stale:
            print(f"out of date: configs/paper/{path}", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        (HERE / path).parent.mkdir(parents=True, exist_ok=True)
        (HERE / path).write_text(files[path])
    print(f"{len(files)} configs, {len(stale)} written")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
