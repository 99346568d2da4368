"""TheseusCallback: transport a source task vector onto the module being fit, once, at fit start."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from theseus_transport.families import load_base_encoder
from theseus_transport.transport import (
    FamilyMismatchError,
    apply_task_vector,
    load_task_vector,
    transport,
)
from theseus_transport.transport.errors import CalibrationError

log = logging.getLogger(__name__)


class TheseusCallback(Callback):
    """Adds the Theseus-transported task vector of a source model to the target encoder before training.

    The transport runs in `setup(stage="fit")`, before Lightning restores a checkpoint and before the
    strategy wraps the model, so a resumed fit (`ckpt_path`) keeps the checkpoint's weights and the
    callback's restored state says what was applied. Under DDP each rank computes statistics on its
    shard of the calibration batches; they are summed across ranks before the SVDs, so every rank
    derives the same maps and ends with the same weights. Files on disk are only read.
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
        token_alignment: str | None = None,
        layer_map: str | None = None,
        held_out_batches: int = 0,
        seed: int = 0,
        report_path: str | None = None,
    ) -> None:
        super().__init__()
        self.task_vector_path = task_vector
        self.source_model = source_model
        self.source_pretrained = source_pretrained
        self.method = method
        self.map_mode = map_mode
        self.alpha = alpha
        self.center = center
        self.token_alignment = token_alignment
        self.layer_map = layer_map
        self.held_out_batches = held_out_batches
        self.seed = seed
        self.report_path = report_path
        self.state: dict[str, Any] = {"applied": False}
        self.report: Any = None
        self.transported: dict[str, torch.Tensor] | None = None

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

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Transport and apply the task vector once, before checkpoint restore and device placement."""
        if stage != "fit" or self.state.get("applied"):
            return
        if trainer.ckpt_path is not None:
            # resuming: the checkpoint's weights already contain the update; its state is restored next
            log.info("TheseusCallback: resuming from %s, not transporting again", trainer.ckpt_path)
            return
        self._transport_and_apply(trainer, pl_module)

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

    def _transport_and_apply(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        family = getattr(pl_module, "family", None)
        task_vector, info = load_task_vector(self.task_vector_path)
        if info.get("family") not in (None, family):
            raise FamilyMismatchError(
                f"{self.task_vector_path} is a {info.get('family')!r} task vector; the module is {family!r}"
            )
        if info.get("model") not in (None, self.source_model):
            raise FamilyMismatchError(
                f"{self.task_vector_path} was made from {info.get('model')!r}, but source_model is {self.source_model!r}"
            )
        world_size, rank = trainer.world_size, trainer.global_rank
        device = trainer.strategy.root_device
        source = load_base_encoder(family, self.source_model, self.source_pretrained, device="cpu").to(device)
        target = pl_module.encoder
        original_device = next(target.parameters()).device
        target.to(device)
        reduce_fn = (lambda tensor: trainer.strategy.reduce(tensor, reduce_op="sum")) if world_size > 1 else None
        calibration = self._calibration(trainer, rank, world_size)
        if len(calibration) == 0:
            raise CalibrationError(
                f"rank {rank} got no calibration batches: use at least {world_size} calibration batches under DDP"
            )
        result = transport(
            source, target, task_vector, calibration, family=family, method=self.method, map_mode=self.map_mode,
            alpha=self.alpha, center=self.center, token_alignment=self.token_alignment, layer_map=self.layer_map,
            held_out=self._held_out(trainer) if rank == 0 else None, seed=self.seed, reduce_fn=reduce_fn,
            progress=rank == 0,
        )
        apply_task_vector(target, result.task_vector, alpha=1.0)  # the result is already scaled by alpha
        target.to(original_device)
        del source
        self.transported = result.task_vector
        self.report = result.report
        tokens = result.plan.metadata["calibration_tokens"]
        self.state = {
            "applied": True,
            "task_vector": str(self.task_vector_path),
            "task_vector_sha256": info.get("sha256"),
            "source_model": self.source_model,
            "source_pretrained": self.source_pretrained,
            "method": self.method,
            "map_mode": self.map_mode,
            "alpha": self.alpha,
            "calibration_batches_per_rank": len(calibration),
            "world_size": world_size,
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
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=0)
            logger.log_hyperparams({"theseus": {k: v for k, v in self.state.items() if k != "applied"}})
        if trainer.is_global_zero:
            path = self.report_path
            if path is None and trainer.log_dir is not None:
                path = str(Path(trainer.log_dir) / "theseus_report.json")
            if path is not None:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                Path(path).write_text(json.dumps(report.to_dict(), indent=2, default=str))
        log.info("TheseusCallback applied %s\n%s", self.state, report.summary())
