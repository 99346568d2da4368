"""The `theseus` console script: fit / validate / test (LightningCLI), transport, compare, demo."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def named_cause(error: BaseException) -> BaseException | None:
    """The first TheseusError in an exception's cause / context chain (None if there is none)."""
    from .transport.errors import TheseusError

    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, TheseusError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def lightning_main(args: list[str] | None = None, run: bool = True) -> Any:
    """Run LightningCLI with any LightningModule / LightningDataModule given by class path in YAML.

    ``args`` None reads the command line (LightningCLI warns when given both); ``run=False`` only builds
    the model, data and trainer (no subcommand in ``args`` then) and returns the CLI object.
    """
    import lightning as L
    from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

    from .transport.errors import OutputExistsError

    # importing registers the project's classes for short class_path names in configs
    import theseus_transport.callbacks  # noqa: F401
    import theseus_transport.data  # noqa: F401
    import theseus_transport.modules  # noqa: F401

    class TheseusCLI(LightningCLI):
        """LightningCLI that lets a named error raised while building the model or data through."""

        def add_arguments_to_parser(self, parser: Any) -> None:
            # images are preprocessed for the model they feed: one setting, not two that can only disagree
            # (ImageClassifier refuses any other). Text keeps its own tokenizer_name: a local T5 checkpoint
            # may take its tokenizer from a hub id. A link whose target the data class lacks is skipped.
            parser.link_arguments("model.init_args.model_name", "data.init_args.model_name")
            parser.link_arguments("model.init_args.pretrained", "data.init_args.pretrained")

        def instantiate_classes(self) -> None:
            try:
                super().instantiate_classes()
            except Exception as error:
                # jsonargparse reports a constructor's error as "does not validate against any of the
                # Union subtypes"; the OfflineError naming the missing weights is what the user needs
                cause = named_cause(error)
                if cause is None:
                    raise
                raise cause from error

        def _preflight(self, stage: str) -> None:
            # checks that need no model run, made before Lightning saves the run's config.yaml: a run
            # refused here leaves no log folder behind that would refuse the corrected rerun
            from theseus_transport.callbacks import TheseusCallback
            from theseus_transport.modules.base import EncoderClassifier

            self._refuse_a_taken_log_folder()
            ckpt_path = self.config.get(self.subcommand, {}).get("ckpt_path")
            # only this suite's own checks: a user's callback or module may have a `preflight` of its own
            # that expects other arguments (subclasses inherit ours, and their overrides keep its signature)
            for callback in self.trainer.callbacks:
                if isinstance(callback, TheseusCallback):
                    callback.preflight(self.model, self.datamodule, stage, resuming=ckpt_path is not None)
            if isinstance(self.model, EncoderClassifier):
                self.model.preflight(self.datamodule, stage)

        def _refuse_a_taken_log_folder(self) -> None:
            # LightningCLI's SaveConfigCallback refuses a log folder that already has a config.yaml (a pinned
            # logger version run twice, as every paper task file pins one) with a traceback, and its remedy
            # (save_config_kwargs) is not reachable from this CLI: said here, as one line, before any work
            saver = next((c for c in self.trainer.callbacks if isinstance(c, SaveConfigCallback)), None)
            if saver is None or saver.overwrite or not saver.save_to_log_dir or self.trainer.log_dir is None:
                return
            config = Path(self.trainer.log_dir) / saver.config_filename
            if config.is_file():
                raise OutputExistsError(
                    f"{config} exists: the run's log folder {config.parent} holds an earlier run (its logger version "
                    "is pinned); give this run another version (--trainer.logger.init_args.version NAME) or move that "
                    "folder away")

        def before_fit(self) -> None:
            self._preflight("fit")

        def before_validate(self) -> None:
            self._preflight("validate")

        def before_test(self) -> None:
            self._preflight("test")

        def before_predict(self) -> None:
            self._preflight("predict")

    return TheseusCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        args=args,
        auto_configure_optimizers=False,
        run=run,
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def _transport_parser(parser: argparse.ArgumentParser) -> None:
    models = parser.add_argument_group("models")
    models.add_argument("--family", default="openclip", choices=["openclip", "t5"])
    models.add_argument("--source-model", required=True, help="OpenCLIP model name or HF id of the source")
    models.add_argument("--source-pretrained", default=None, help="pretrained tag or checkpoint path of the source")
    models.add_argument("--target-model", required=True)
    models.add_argument("--target-pretrained", default=None)
    models.add_argument("--task-vector", required=True, help="source task vector (.safetensors with sidecar)")
    data = parser.add_argument_group("calibration data")
    data.add_argument("--dataset", required=True, help="hub id, zoo:<task> (offline world) or a save_to_disk folder")
    data.add_argument("--dataset-config", default=None)
    data.add_argument("--calibration-batches", type=_positive_int, default=None, help="batches protocol: k batches (default 1)")
    data.add_argument("--calibration-batch-size", type=_positive_int, default=32)
    data.add_argument("--calibration-protocol", default="batches", choices=["batches", "shots"])
    data.add_argument("--calibration-shots", type=_positive_int, default=None, help="shots protocol: k examples per class (default 4)")
    data.add_argument("--calibration-seed", type=int, default=0)
    data.add_argument("--held-out-batches", type=_non_negative_int, default=1, help="validation batches for the cosine report (0: skip)")
    method = parser.add_argument_group("method")
    method.add_argument("--method", default="theseus")
    method.add_argument("--map-mode", default="rank_aware", choices=["rank_aware", "paper"])
    method.add_argument("--alpha", type=_finite_float, default=1.0)
    method.add_argument("--center", action="store_true", help="centered cross-covariance (default: uncentered)")
    method.add_argument("--capture-linear-outputs", action="store_true",
                        help="accumulate linear outputs' statistics from activations instead of deriving them "
                             "from their inputs' (slower; equal up to float rounding)")
    method.add_argument("--transport-embeddings", action="store_true",
                        help="also transport the embedding stage (OpenCLIP patch/positional embedding, class token; T5 token "
                             "embedding, one shared vocabulary); "
                             "beyond the paper, off by default")
    method.add_argument("--attention-maps", default="per_point", choices=["per_point", "heads"],
                        help="heads: q/k and v/context share maps that rotate matched heads onto each other, "
                             "preserving attention logits (beyond the paper); per_point: a map per capture point")
    method.add_argument("--token-alignment", default=None, choices=["none", "mean", "interpolate", "interpolate2d"])
    method.add_argument("--layer-map", default=None, choices=["interpolate"], help="depth mismatch: paper Sec. 4.4")
    method.add_argument("--memory-budget-mb", type=_positive_float, default=None, help="cap on statistics memory per pass")
    method.add_argument("--seed", type=int, default=0)
    method.add_argument("--device", default="cpu")
    out = parser.add_argument_group("output")
    out.add_argument("--output", required=True, help="target task vector (.safetensors); sidecar and report beside it")
    out.add_argument("--plan-out", default=None, help="also save the transport plan (maps) here")
    out.add_argument("--overwrite", action="store_true")
    out.add_argument("--no-progress", action="store_true")


def transport_main(options: argparse.Namespace) -> int:
    """Transport a task vector between two base models and write vector, sidecar and report JSON."""
    from .families import load_base_encoder
    from .transport import get_method, load_task_vector, save_task_vector, transport
    from .data.base import inactive_calibration_size
    from .transport.errors import CalibrationError, OutputPathError
    from .transport.io import (
        check_task_vector_source,
        check_tensor_path,
        check_writable,
        sidecar_path,
        staged_writes,
        write_json,
    )

    # refuse before any work is done: names that are not *.safetensors, outputs that would overwrite one
    # another, and existing files (unless --overwrite)
    output = check_tensor_path(options.output)
    report_path = output.with_suffix(".report.json")
    outputs = [output, sidecar_path(output), report_path]
    if options.plan_out:
        plan_out = check_tensor_path(options.plan_out)
        outputs += [plan_out, sidecar_path(plan_out)]
    clashing = sorted({str(path) for path in outputs if [p.resolve() for p in outputs].count(path.resolve()) > 1})
    if clashing:
        raise OutputPathError(f"--output and --plan-out would write the same file(s) {clashing}; choose other names")
    inputs = {Path(options.task_vector).resolve(), sidecar_path(options.task_vector).resolve()}
    if any(path.resolve() in inputs for path in outputs):
        raise OutputPathError(f"--output {output} would replace the input task vector {options.task_vector} or its sidecar")
    check_writable(*outputs, overwrite=options.overwrite)
    get_method(options.method)  # an unknown name is refused before any model is loaded
    inactive = inactive_calibration_size(options.calibration_protocol, options.calibration_batches, options.calibration_shots)
    if inactive is not None:  # an explicit flag, so even a default value is refused
        flag = "--" + inactive[0].replace("_", "-")
        raise CalibrationError(f"{flag} does not apply to --calibration-protocol {options.calibration_protocol}")
    task_vector, info = load_task_vector(options.task_vector)
    check_task_vector_source(info, options.source_model, options.source_pretrained, options.task_vector)
    source = load_base_encoder(options.family, options.source_model, options.source_pretrained, options.device)
    target = load_base_encoder(options.family, options.target_model, options.target_pretrained, options.device)
    datamodule = _calibration_datamodule(options)
    calibration = datamodule.calibration_dataloader()
    held_out = None
    if options.held_out_batches > 0 and hasattr(datamodule, "held_out_dataloader"):
        held_out = datamodule.held_out_dataloader(batches=options.held_out_batches)
    budget = None if options.memory_budget_mb is None else int(options.memory_budget_mb * 2**20)
    result = transport(
        source, target, task_vector, calibration, family=options.family, method=options.method,
        map_mode=options.map_mode, alpha=options.alpha, center=options.center,
        transport_embeddings=options.transport_embeddings, attention_maps=options.attention_maps,
        derive_linear_outputs=not options.capture_linear_outputs,
        token_alignment=options.token_alignment, layer_map=options.layer_map, held_out=held_out,
        seed=options.seed, memory_budget_bytes=budget, progress=not options.no_progress,
    )
    print(result.report.summary())
    metadata = {
        "family": options.family, "model": options.target_model, "pretrained": options.target_pretrained,
        "task": info.get("task"), "encoder": info.get("encoder"),
        "transported_from": {"model": options.source_model, "pretrained": options.source_pretrained,
                             "task_vector": str(options.task_vector), "sha256": info.get("sha256")},
        "method": options.method, "map_mode": options.map_mode, "alpha": options.alpha,
        "transport_embeddings": options.transport_embeddings, "attention_maps": options.attention_maps,
        "calibration": {"dataset": options.dataset, "protocol": options.calibration_protocol,
                        **({"shots": datamodule.calibration_shots} if options.calibration_protocol == "shots"
                           else {"batches": datamodule.calibration_batches}),
                        "batch_size": options.calibration_batch_size, "seed": options.calibration_seed},
    }
    # all files or none: written under temporary names, moved into place together, so a failure leaves
    # whatever was there before (also the files --overwrite would have replaced)
    with staged_writes(*outputs) as stage:
        save_task_vector(stage(output), result.task_vector, metadata)
        write_json(stage(report_path), result.report.to_dict())
        if options.plan_out:
            result.plan.save(stage(plan_out))
    print(f"wrote {output}, {sidecar_path(output).name}, {report_path.name}"
          + (f", {plan_out} and {sidecar_path(plan_out).name}" if options.plan_out else ""))
    return 0


def _calibration_datamodule(options: argparse.Namespace):
    from .data import ImageClassificationDataModule, TextPairDataModule

    common = dict(
        dataset_config=options.dataset_config, calibration_protocol=options.calibration_protocol,
        calibration_batches=options.calibration_batches, calibration_batch_size=options.calibration_batch_size,
        calibration_shots=options.calibration_shots, calibration_seed=options.calibration_seed,
    )
    if options.family == "t5":
        return TextPairDataModule(
            options.dataset, tokenizer_name=options.target_model, source_tokenizer_name=options.source_model, **common
        )
    return ImageClassificationDataModule(
        options.dataset, model_name=options.target_model, pretrained=options.target_pretrained,
        source_model_name=options.source_model, source_pretrained=options.source_pretrained, **common,
    )


def compare_main(options: argparse.Namespace) -> int:
    """Draw loss and accuracy curves of several runs in one PNG with steps-to-target in the legend."""
    from .compare import compare_groups, compare_runs

    common = {"monitor": options.monitor, "target": options.target, "loss_tag": options.loss_tag,
              "overwrite": options.overwrite, "mode": options.mode}
    if bool(options.runs) == bool(options.group):
        print("theseus compare: give either run directories or --group LABEL RUN [RUN ...], not both or neither",
              file=sys.stderr)
        return 2
    if options.group:
        groups: dict[str, list[str]] = {}
        for label, *runs in options.group:
            if not runs or label in groups:
                print(f"theseus compare: --group {label!r} needs a label not used before and at least one run",
                      file=sys.stderr)
                return 2
            groups[label] = runs
        summary = compare_groups(groups, options.out, **common)
    else:
        summary = compare_runs(options.runs, options.out, **common)
    print(json.dumps(summary, indent=2))
    return 0


def demo_main(options: argparse.Namespace) -> int:
    """Run the offline end-to-end demo (zoo family, 8 tasks, transport, warm start)."""
    from dataclasses import replace

    from .zoo.demo import DemoSettings, run_demo

    settings = DemoSettings.quick() if options.quick else DemoSettings.full()
    changes: dict[str, Any] = {}
    if options.workers is not None:
        changes["workers"] = options.workers
    if options.warm_start_seeds is not None:
        changes["warm_start_seeds"] = tuple(options.warm_start_seeds)
    try:
        settings = replace(settings, **changes)
    except ValueError as error:  # the settings check their own values
        print(f"theseus demo: {error}", file=sys.stderr)
        return 2
    run_demo(output_dir=options.output_dir, overwrite=options.overwrite, cache_dir=options.cache_dir, settings=settings)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `theseus` console script."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    from .console import configure_console_logging

    configure_console_logging()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if argv and argv[0] in LIGHTNING_SUBCOMMANDS:
        from .transport.errors import TheseusError

        try:
            lightning_main(None if from_command_line else argv)
        except (TheseusError, FileNotFoundError) as error:
            # a named failure (offline weights, bad task vector, ...) reads better as one line than a traceback
            print(f"theseus {argv[0]}: {type(error).__name__}: {error}", file=sys.stderr)
            return 1
        return 0
    parser = argparse.ArgumentParser(prog="theseus", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="{fit,validate,test,predict,transport,compare,demo}")
    for name in LIGHTNING_SUBCOMMANDS:
        sub.add_parser(name, help=f"LightningCLI {name} (see `theseus {name} --help`)", add_help=False)
    _transport_parser(sub.add_parser("transport", help="transport a task vector to another model"))
    compare = sub.add_parser("compare", help="plot several runs' curves from their TensorBoard logs")
    compare.add_argument("runs", nargs="*", help="run directories (searched for TensorBoard event files)")
    compare.add_argument("--group", nargs="+", action="append", metavar="LABEL RUN",
                         help="one curve averaged over these runs, e.g. the same recipe over several tasks (repeatable)")
    compare.add_argument("--out", required=True, help="image to write, format from its suffix (none: .png is appended)")
    compare.add_argument("--monitor", default="val/acc")
    compare.add_argument("--mode", choices=("max", "min"), default=None,
                         help="whether --monitor should rise to the target or fall to it (default: min if it names a loss, else max)")
    compare.add_argument("--target", type=float, default=None,
                         help="steps-to-target threshold (default: 0.9 * highest final for max, 1.1 * lowest final for min)")
    compare.add_argument("--loss-tag", default="train/loss")
    compare.add_argument("--overwrite", action="store_true")
    demo = sub.add_parser("demo", help="offline end-to-end demo on the project's own model family")
    demo.add_argument("--quick", action="store_true", help="fewer tasks, steps and batches (a few minutes)")
    demo.add_argument("--output-dir", default="outputs/demo")
    demo.add_argument("--cache-dir", default=None)
    demo.add_argument("--overwrite", action="store_true")
    demo.add_argument("--workers", type=int, default=None,
                      help="processes for the target fine-tunes (default: one per core for the full demo, 1 for --quick)")
    demo.add_argument("--warm-start-seeds", type=int, nargs="+", default=None, metavar="SEED",
                      help="fine-tuning seeds of the target: the upper bound, the warm start and its baseline "
                           "(default: 0 1 2; --quick: 0); other seeds replicate them")
    options = parser.parse_args(argv)
    if options.command is None:
        parser.print_help()
        return 2
    handlers = {"transport": transport_main, "compare": compare_main, "demo": demo_main}
    from .transport.errors import TheseusError

    try:
        return handlers[options.command](options)
    except (TheseusError, FileNotFoundError) as error:
        print(f"theseus {options.command}: {type(error).__name__}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
