"""TheseusCallback: transport a source task vector onto the module being fit, once, at fit start."""

from __future__ import annotations

import json
import logging
import math
import weakref
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from theseus_transport.families import load_base_encoder
from theseus_transport.transport import (
    FamilyMismatchError,
    apply_task_vector,
    load_task_vector,
    transport,
)
from theseus_transport.transport.errors import CalibrationError
from theseus_transport.transport.io import check_task_vector_source, read_sidecar

log = logging.getLogger(__name__)

TASK_PLACEHOLDER = "{task}"
EVAL_FNS = (TrainerFn.VALIDATING, TrainerFn.TESTING, TrainerFn.PREDICTING)


class TheseusCallback(Callback):
    """Adds the Theseus-transported task vector of a source model to the target encoder before training.

    Fit: the transport runs in ``on_fit_start``, after Lightning restored a checkpoint (``ckpt_path``)
    and before the sanity check and the first step. A resumed fit finds the callback's restored state
    (task-vector hash, method, alpha, batches) and applies nothing: the checkpoint's weights already
    hold the update. (``setup`` would run before the restore, and Lightning only reveals ``ckpt_path``
    after it, so a resume could not be told from a fresh start there.) Strategies that shard
    parameters in their own setup (FSDP, DeepSpeed) get the transport in ``setup`` instead, while the
    parameters are still whole; a resume then recomputes it and the restore overwrites it.

    Evaluation: with ``apply_on_eval=True`` ``validate`` / ``test`` / ``predict`` apply it too (zero-shot
    evaluation of target + transported update), unless this callback already applied it to this module.
    An encoder that no longer equals its pretrained snapshot (a trained model, e.g. from
    ``load_from_checkpoint``) gets nothing, with a warning: the maps and the update belong to the
    pretrained target. One callback may serve several fits: each new module gets the update.

    Under DDP each rank computes statistics on its shard of the calibration batches; they are summed
    across ranks before the SVDs, so every rank derives the same maps and ends with the same weights.
    Files on disk are only read. ``task_vector`` may contain ``{task}``, replaced by the datamodule's
    task name, so one config serves every task.
    """

    def __init__(
        self,
        task_vector: str,
        source_model: str,
        source_pretrained: str | None = None,
        method: str = "theseus",
        map_mode: str = "rank_aware",
        alpha: float = 1.0,
        center: bool = False,
        transport_embeddings: bool = False,
        attention_maps: str = "per_point",
        token_alignment: str | None = None,
        layer_map: str | None = None,
        held_out_batches: int = 0,
        seed: int = 0,
        report_path: str | None = None,
        apply_on_eval: bool = False,
        memory_budget_mb: float | None = None,
    ) -> None:
        super().__init__()
        if memory_budget_mb is not None and not memory_budget_mb > 0:
            raise ValueError(f"memory_budget_mb must be above 0 (or None for one pass), got {memory_budget_mb}")
        # caps the statistics held at once (one calibration pass per group of layers; same result):
        # T5-3B's rank-aware statistics are about 12 GB in a single pass
        self.memory_budget_mb = memory_budget_mb
        self.task_vector_path = task_vector
        self.source_model = source_model
        self.source_pretrained = source_pretrained
        self.method = method
        self.map_mode = map_mode
        self.alpha = alpha
        self.center = center
        self.transport_embeddings = transport_embeddings
        self.attention_maps = attention_maps
        self.token_alignment = token_alignment
        self.layer_map = layer_map
        self.held_out_batches = held_out_batches
        self.seed = seed
        self.report_path = report_path
        self.apply_on_eval = apply_on_eval
        self.state: dict[str, Any] = {"applied": False}
        self.report: Any = None
        self.transported: dict[str, torch.Tensor] | None = None
        # which module holds the update: one restored from a checkpoint with this state, or the one it was
        # applied to in this process (a callback reused for another module must apply it again)
        self._restored = False
        self._applied_to: weakref.ReferenceType | None = None

    @property
    def state_key(self) -> str:
        """One state entry per task vector and method (two callbacks may coexist)."""
        return f"TheseusCallback[{Path(self.task_vector_path).name},{self.method},{self.map_mode}]"

    def state_dict(self) -> dict[str, Any]:
        """What was applied: task-vector hash, method, alpha, calibration batches."""
        return dict(self.state)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what was applied, so a resumed fit does not apply it again."""
        self.state = dict(state_dict)
        self._restored = bool(self.state.get("applied"))

    def _holds_update(self, pl_module: L.LightningModule) -> bool:
        """Whether `pl_module` already has the update: restored with this state, or applied to it here."""
        if not self.state.get("applied"):
            return False
        if self._restored or (self._applied_to is not None and self._applied_to() is pl_module):
            if self._restored:
                self._warn_if_settings_changed()
            self._restored, self._applied_to = False, weakref.ref(pl_module)
            return True
        # the state is from an earlier fit of another module (a callback reused across runs): start afresh
        log.info("TheseusCallback: applied to another module before; transporting for this one")
        self.state = {"applied": False}
        return False

    def _warn_if_settings_changed(self) -> None:
        """A restored run keeps the update it was made with; say so when the settings now ask for another."""
        wanted = {"source_model": self.source_model, "method": self.method, "map_mode": self.map_mode,
                  "alpha": self.alpha, "transport_embeddings": self.transport_embeddings,
                  "attention_maps": self.attention_maps}
        changed = {key: (self.state.get(key), value) for key, value in wanted.items()
                   if key in self.state and self.state[key] != value}
        if changed:
            described = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changed.items())
            rank_zero_warn(
                f"TheseusCallback: the checkpoint holds the update made with other settings ({described}); it is "
                "kept as it is, not transported again (start a new run to use the new settings)"
            )

    def _pretrained_encoder(self, pl_module: L.LightningModule) -> bool:
        """False (with a warning) when the encoder is no longer its pretrained snapshot: a trained model."""
        base = getattr(pl_module, "base_state", None)
        if not base:
            return True  # a module without a pretrained snapshot: nothing to compare with
        current = pl_module.encoder.state_dict()
        # compared in the module's own precision: a "16-true" / "bf16-true" run has cast its weights already
        if all(torch.equal(current[key].detach(), value.to(current[key].device, current[key].dtype))
               for key, value in base.items() if key in current):
            return True
        rank_zero_warn(
            f"TheseusCallback: the encoder differs from its pretrained weights (a trained or loaded checkpoint?); "
            f"the transported update of {self.task_vector_path} is not applied on top of it"
        )
        return False

    # ----- when ---------------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Sharding strategies only: transport now, while the parameters are still whole."""
        if (stage == "fit" and trainer.strategy.restore_checkpoint_after_setup and not self._holds_update(pl_module)
                and self._pretrained_encoder(pl_module)):
            rank_zero_warn(
                f"TheseusCallback: {type(trainer.strategy).__name__} restores checkpoints after setup, so the "
                "transport runs in setup; a resumed fit recomputes it and the checkpoint's weights replace it"
            )
            self._transport_and_apply(trainer, pl_module)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Transport and apply once; a resumed fit (restored state) applies nothing."""
        if self._holds_update(pl_module):
            log.info("TheseusCallback: already applied (%s); not transporting again", self.state.get("task_vector"))
            return
        if trainer.ckpt_path is not None:
            # the checkpoint has no state of this callback: it was not made with this transport
            rank_zero_warn(
                f"TheseusCallback: resuming from {trainer.ckpt_path}, which holds no state for {self.state_key}; "
                "the transported update is not applied to a partly trained model"
            )
            return
        if self._pretrained_encoder(pl_module):
            self._transport_and_apply(trainer, pl_module)

    def _on_eval_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (self.apply_on_eval and trainer.state.fn in EVAL_FNS and not self._holds_update(pl_module)
                and self._pretrained_encoder(pl_module)):
            # evaluation loops run under inference mode; parameters must stay normal tensors
            with torch.inference_mode(False):
                self._transport_and_apply(trainer, pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """``validate`` with apply_on_eval: zero-shot evaluation of the transported target."""
        self._on_eval_start(trainer, pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """``test`` with apply_on_eval: zero-shot evaluation of the transported target."""
        self._on_eval_start(trainer, pl_module)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """``predict`` with apply_on_eval."""
        self._on_eval_start(trainer, pl_module)

    # ----- what ---------------------------------------------------------------------------------------------
    def resolved_task_vector(self, trainer: L.Trainer) -> Path:
        """The task-vector path with ``{task}`` replaced by the datamodule's task name."""
        return self.task_vector_for(trainer.datamodule)

    def task_vector_for(self, datamodule: Any) -> Path:
        """The task-vector path with ``{task}`` replaced by this datamodule's task name."""
        path = str(self.task_vector_path)
        if TASK_PLACEHOLDER in path:
            task = getattr(datamodule, "task_name", None)
            if not task:
                raise CalibrationError(f"task_vector {path!r} names {TASK_PLACEHOLDER} but the datamodule has no task_name")
            path = path.replace(TASK_PLACEHOLDER, task)
        return Path(path)

    def _calibration(self, trainer: L.Trainer, rank: int, world_size: int) -> Any:
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "calibration_dataloader"):
            raise CalibrationError("TheseusCallback needs a datamodule with calibration_dataloader()")
        return datamodule.calibration_dataloader(
            source_model_name=self.source_model, source_pretrained=self.source_pretrained, rank=rank, world_size=world_size
        )

    def _held_out(self, trainer: L.Trainer) -> Any:
        datamodule = trainer.datamodule
        if self.held_out_batches <= 0 or not hasattr(datamodule, "held_out_dataloader"):
            return None
        return datamodule.held_out_dataloader(
            source_model_name=self.source_model, source_pretrained=self.source_pretrained, batches=self.held_out_batches
        )

    def _check_sidecar(self, info: dict[str, Any], path: Path, family: str | None) -> None:
        if info.get("family") not in (None, family):
            raise FamilyMismatchError(f"{path} is a {info.get('family')!r} task vector; the module is {family!r}")
        check_task_vector_source(info, self.source_model, self.source_pretrained, path)

    def preflight(self, module: L.LightningModule, datamodule: Any, stage: str, resuming: bool = False) -> None:
        """Check, before a run writes anything, that the task vector it will transport exists and suits this source.

        The CLI calls this before Lightning saves the run's config, so a missing or mismatched task vector
        does not leave a log folder behind that refuses the corrected rerun.
        """
        if resuming or (stage != "fit" and not self.apply_on_eval):
            # nothing will be transported, or a checkpoint decides at run time (a resumed fit, or a trained
            # encoder, applies nothing; the callback checks the task vector itself if it does transport)
            return
        path = self.task_vector_for(datamodule)
        if not path.is_file():
            raise FileNotFoundError(f"no task vector to transport at {path}: fine-tune the source {self.source_model} "
                                    "first (it writes its task_vector_out there), or point task_vector at one")
        self._check_sidecar(read_sidecar(path), path, getattr(module, "family", None))

    def _transport_and_apply(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        family = getattr(pl_module, "family", None)
        path = self.resolved_task_vector(trainer)
        task_vector, info = load_task_vector(path)
        self._check_sidecar(info, path, family)
        world_size, rank = trainer.world_size, trainer.global_rank
        device = trainer.strategy.root_device
        source = load_base_encoder(family, self.source_model, self.source_pretrained, device="cpu").to(device)
        target = pl_module.encoder
        original_device = next(target.parameters()).device
        target.to(device)
        reduce_fn = (lambda tensor: trainer.strategy.reduce(tensor, reduce_op="sum")) if world_size > 1 else None
        calibration = self._calibration(trainer, rank, world_size)
        fewest = len(calibration)
        if world_size > 1:
            # every rank must learn that one got nothing, or the others wait for it in the first reduction
            fewest = int(trainer.strategy.reduce(torch.tensor(float(fewest), device=device), reduce_op="min"))
        if fewest == 0:
            raise CalibrationError(
                f"a rank got no calibration batches: use at least {world_size} calibration batches under DDP"
            )
        result = transport(
            source, target, task_vector, calibration, family=family, method=self.method, map_mode=self.map_mode,
            alpha=self.alpha, center=self.center, transport_embeddings=self.transport_embeddings,
            attention_maps=self.attention_maps, token_alignment=self.token_alignment, layer_map=self.layer_map,
            held_out=self._held_out(trainer) if rank == 0 else None, seed=self.seed, reduce_fn=reduce_fn,
            progress=rank == 0,
            memory_budget_bytes=None if self.memory_budget_mb is None else int(self.memory_budget_mb * 2**20),
        )
        apply_task_vector(target, result.task_vector, alpha=1.0)  # the result is already scaled by alpha
        target.to(original_device)
        del source
        self.transported = result.task_vector
        self.report = result.report
        self._restored, self._applied_to = False, weakref.ref(pl_module)
        tokens = result.plan.metadata["calibration_tokens"]
        self.state = {
            "applied": True,
            "task_vector": str(path),
            "task_vector_sha256": info.get("sha256"),
            "source_model": self.source_model,
            "source_pretrained": self.source_pretrained,
            "method": self.method,
            "map_mode": self.map_mode,
            "transport_embeddings": self.transport_embeddings,
            "attention_maps": self.attention_maps,
            "alpha": self.alpha,
            "calibration_batches_per_rank": len(calibration),
            "world_size": world_size,
            # summed over ranks by the reduction, so the same on every rank
            "calibration_tokens": max(tokens.values()) if tokens else 0,
        }
        self._log_report(trainer)

    def _log_report(self, trainer: L.Trainer) -> None:
        report = self.report
        ratios = [key.norm_ratio for key in report.keys if key.source_norm > 0]
        metrics = {
            "theseus/norm_ratio_mean": sum(ratios) / max(len(ratios), 1),
            "theseus/skipped_keys": float(len(report.skipped)),
        }
        if report.alignment:
            metrics["theseus/cosine_before"] = sum(v["before"] for v in report.alignment.values()) / len(report.alignment)
            metrics["theseus/cosine_after"] = sum(v["after"] for v in report.alignment.values()) / len(report.alignment)
        moved = [v["cosine"] for v in report.update_alignment.values() if not math.isnan(v["cosine"])]
        if moved:
            metrics["theseus/update_cosine"] = sum(moved) / len(moved)
        # flat keys with plain values: every logger (TensorBoard hparams, CSV yaml, W&B) takes them as they are
        hyperparameters = {f"theseus/{k}": (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in self.state.items() if k != "applied"}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.log_hyperparams(hyperparameters)
        # trainer.log_dir broadcasts from rank 0: every rank must ask, or DDP deadlocks
        log_dir = trainer.log_dir if trainer.loggers else None
        path = self.report_path
        if path is None and log_dir is not None:
            path = str(Path(log_dir) / "theseus_report.json")
        if trainer.is_global_zero and path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(json.dumps(report.to_dict(), indent=2, default=str))
        log.info("TheseusCallback applied %s\n%s", self.state, report.summary())
        # one line on the console (Lightning prints rank_zero_info); the whole report is in theseus_report.json
        rank_zero_info(
            f"TheseusCallback: applied {self.state['task_vector']} ({self.method}, {self.map_mode}, alpha "
            f"{self.alpha}): mean norm ratio {metrics['theseus/norm_ratio_mean']:.3f}, "
            f"{len(report.skipped)} keys not transported" + (f"; report: {path}" if path is not None else "")
        )
