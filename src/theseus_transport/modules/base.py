"""Shared Lightning logic of the encoder + head classifiers: optimiser, metrics, freezing, task vectors."""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

from ..transport.errors import TheseusError
from ..transport.io import check_tensor_path, check_writable, sidecar_path
from .schedule import warmup_cosine_scheduler
from .task_vector import snapshot_state, task_vector_from, write_task_vector


class ExampleMean(Metric):
    """The mean over examples of a value given per batch as (batch mean, batch size), kept as a sum and a count.

    Under DDP evaluation ranks hold different numbers of examples (TaskDataModule.evaluation_sampler). Lightning's
    ``self.log(..., sync_dist=True)`` mean then floors the summed batch size it averages across ranks, an integer
    (lightning.pytorch.trainer.connectors.logger_connector.result._ResultMetric.compute, Lightning-AI/pytorch-lightning
    issue 21859), and torchmetrics' MeanMetric either drops NaN values or, with nan_strategy="disable", its weights.
    Sums synced with dist_reduce_fx="sum" are exact for any split, and a NaN stays NaN. Dtype policy: the sum is
    float64 (float32 on MPS, which has no float64) whatever the module is cast to, so a bf16 or float64 run's losses
    are neither rounded by the sum nor narrowed to float32.
    """

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _apply(self, fn: Callable, exclude_state: Sequence[str] = "") -> nn.Module:
        # MPS has no float64: a sum bound there goes as float32 (cast before the move, which would fail)
        dtype = torch.float32 if fn(torch.zeros(1, device=self.total.device)).device.type == "mps" else torch.float64
        self.total, self._defaults["total"] = self.total.to(dtype), self._defaults["total"].to(dtype)
        this = super()._apply(fn, exclude_state)
        # torchmetrics guards its states' dtype against .half() / .double() but not against .to(dtype), which a
        # "-true" precision applies to the whole module
        this.total, this._defaults["total"] = this.total.to(dtype), this._defaults["total"].to(dtype)
        return this

    def update(self, mean: torch.Tensor, size: int) -> None:
        """Add a batch: its mean value and its number of examples."""
        self.total += mean.detach().to(self.total.dtype) * size
        self.count += size

    def compute(self) -> torch.Tensor:
        """The mean over every example seen (on every rank)."""
        return self.total / self.count


class EncoderClassifier(L.LightningModule):
    """Encoder + head classifier whose encoder update can be written out as a task vector.

    Subclasses set ``self.encoder`` (the module whose state_dict keys task vectors use) and call
    ``_encoder_ready()`` right after loading pretrained weights, then implement ``_logits_and_labels``
    and ``_build_head``. ``family``, ``encoder_kind``, ``model_name`` and ``pretrained`` describe the
    encoder for callbacks and sidecars.
    """

    family: str = ""
    encoder_kind: str = ""

    def __init__(
        self,
        lr: float = 1e-5,
        weight_decay: float = 0.1,
        warmup_steps: int = 500,
        max_steps: int | None = None,
        label_smoothing: float = 0.0,
        task_vector_out: str | None = None,
        task_name: str | None = None,
        overwrite: bool = False,
        freeze_encoder: bool = False,
    ) -> None:
        super().__init__()
        self.lr, self.weight_decay = lr, weight_decay
        self.warmup_steps, self.max_steps = warmup_steps, max_steps
        self.label_smoothing = label_smoothing
        self.task_vector_out, self.task_name, self.overwrite = task_vector_out, task_name, overwrite
        self.freeze_encoder = freeze_encoder
        self.encoder: nn.Module
        self.base_state: dict[str, torch.Tensor] = {}
        self.num_classes: int | None = None
        self.task_vector_path: Path | None = None
        # evaluation losses as metrics, not sync_dist means: exact when DDP ranks hold different counts
        self.val_loss, self.test_loss = ExampleMean(), ExampleMean()

    # ----- construction ------------------------------------------------------------------------------
    def _save_own_hyperparameters(self) -> None:
        # save only the arguments of the most specific class's __init__ (LinearProbe has no `head`),
        # so load_from_checkpoint can call that __init__ with them
        own = set(inspect.signature(type(self).__init__).parameters) - {"self"}
        caller = inspect.currentframe().f_back
        self.save_hyperparameters(frame=caller)
        # LightningCLI's own entries (`_class_path`, `_instantiator`) stay: it reads them back for --ckpt_path
        for key in [key for key in self.hparams if key not in own and not key.startswith("_")]:
            del self.hparams[key]

    def _encoder_ready(self) -> None:
        # snapshot now, before any callback (e.g. a transported warm start) edits the encoder: task
        # vectors are always relative to the pretrained weights named by model_name / pretrained
        self.base_state = snapshot_state(self.encoder)
        if self.freeze_encoder:
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    def _build_head(self, num_classes: int) -> None:
        """Create the head for ``num_classes`` classes (subclasses)."""
        raise NotImplementedError

    def _set_num_classes(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def _datamodule(self) -> Any | None:
        trainer = self._trainer
        return getattr(trainer, "datamodule", None) if trainer is not None else None

    def train(self, mode: bool = True) -> "EncoderClassifier":
        """Set train/eval mode, keeping a frozen encoder in eval mode (no dropout, fixed norms)."""
        super().train(mode)
        if self.freeze_encoder and hasattr(self, "encoder"):
            self.encoder.eval()
        return self

    # ----- steps -----------------------------------------------------------------------------------------
    def _logits_and_labels(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (logits, labels) of a batch (subclasses)."""
        raise NotImplementedError

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)

    def evaluate_batch(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean loss (the training objective) and the per-example correctness of one batch."""
        logits, labels = self._logits_and_labels(batch)
        return self._loss(logits, labels), logits.argmax(-1) == labels

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Cross-entropy step; logs train/loss and train/acc every step."""
        logits, labels = self._logits_and_labels(batch)
        loss = self._loss(logits, labels)
        self.train_acc(logits.detach(), labels)
        size = labels.shape[0]
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=size)
        self.log("train/acc", self.train_acc, on_step=True, on_epoch=False, batch_size=size)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Logs val/loss and val/acc per epoch."""
        logits, labels = self._logits_and_labels(batch)
        self.val_acc.update(logits, labels)
        size = labels.shape[0]
        self.val_loss.update(self._loss(logits, labels), size)
        self.log("val/loss", self.val_loss, on_step=False, on_epoch=True, batch_size=size)
        self.log("val/acc", self.val_acc, on_step=False, on_epoch=True, prog_bar=True, batch_size=size)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Logs test/loss and test/acc per epoch."""
        logits, labels = self._logits_and_labels(batch)
        self.test_acc.update(logits, labels)
        size = labels.shape[0]
        self.test_loss.update(self._loss(logits, labels), size)
        self.log("test/loss", self.test_loss, on_step=False, on_epoch=True, batch_size=size)
        self.log("test/acc", self.test_acc, on_step=False, on_epoch=True, batch_size=size)

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        """Predicted class, class probabilities and the true label of every example of a batch."""
        logits, labels = self._logits_and_labels(batch)
        probabilities = logits.float().softmax(dim=-1)
        return {"prediction": probabilities.argmax(dim=-1), "probabilities": probabilities, "label": labels}

    # ----- optimisation ------------------------------------------------------------------------------------
    def total_steps(self) -> int:
        """Steps of the cosine schedule: max_steps, else the trainer's estimate."""
        if self.max_steps is not None:
            return int(self.max_steps)
        estimate = self.trainer.estimated_stepping_batches
        if not math.isfinite(estimate):
            raise ValueError("cannot size the cosine schedule: set max_steps on the module or the Trainer")
        return int(estimate)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW on the trainable parameters, linear warm-up then cosine decay, stepped every step."""
        params = [param for param in self.parameters() if param.requires_grad]
        if not params:
            raise ValueError(
                "nothing to train: the encoder is frozen and the head has no parameters "
                "(a frozen zero-shot head); use trainer.validate / trainer.test to evaluate it"
            )
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        scheduler = warmup_cosine_scheduler(optimizer, self.warmup_steps, self.total_steps())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----- task vectors ------------------------------------------------------------------------------------
    def task_vector(self) -> dict[str, torch.Tensor]:
        """Current encoder minus the pretrained encoder snapshot taken at construction."""
        return task_vector_from(self.encoder, self.base_state)

    def resolved_task_name(self, datamodule: Any | None = None) -> str:
        """Task name for sidecars: the argument, else the datamodule's (the trainer's by default), else "unknown"."""
        if self.task_name:
            return self.task_name
        datamodule = datamodule if datamodule is not None else self._datamodule()
        return getattr(datamodule, "task_name", None) or "unknown"

    def task_vector_metadata(self) -> dict[str, Any]:
        """Sidecar metadata: family, model, pretrained, task, encoder, seed, steps and the recipe."""
        seed = os.environ.get("PL_GLOBAL_SEED")
        trainer = self._trainer
        return {
            "family": self.family,
            "model": self.model_name,
            "pretrained": self.pretrained,
            "task": self.resolved_task_name(),
            "encoder": self.encoder_kind,
            "seed": int(seed) if seed is not None else None,
            "steps": int(trainer.global_step) if trainer is not None else 0,
            "base": "pretrained",
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "freeze_encoder": self.freeze_encoder,
        }

    def resolved_task_vector_out(self, datamodule: Any | None = None) -> Path | None:
        """task_vector_out with ``{task}`` replaced by the task name (one config serves every task)."""
        if self.task_vector_out is None:
            return None
        return Path(str(self.task_vector_out).replace("{task}", self.resolved_task_name(datamodule)))

    def preflight(self, datamodule: Any, stage: str) -> None:
        """Refuse, before a run writes anything, a fit whose task vector output is taken or cannot be a file."""
        path = self.resolved_task_vector_out(datamodule) if stage == "fit" else None
        if path is not None:
            check_writable(check_tensor_path(path), sidecar_path(path), overwrite=self.overwrite,
                           how="overwrite=True (theseus fit: --model.init_args.overwrite true)")

    def on_fit_start(self) -> None:
        """Put the model in training mode and refuse an existing task_vector_out before training."""
        # encoders load in eval mode (transformers' from_pretrained, the zoo's loader) and Lightning keeps the
        # modes it finds, so without this a fine-tune would run with T5's dropout off; a frozen encoder stays in eval
        self.train()
        if self.task_vector_out is None:
            return
        refusal: Exception | None = None
        if self.trainer.is_global_zero:
            try:
                self.preflight(self._datamodule(), "fit")
            except TheseusError as error:
                refusal = error
        # every rank must stop, or the others would wait for rank 0 in their first collective
        refusal = self.trainer.strategy.broadcast(refusal)
        if refusal is not None:
            raise refusal

    def on_fit_end(self) -> None:
        """Write the encoder task vector (rank zero only) when task_vector_out is set."""
        path = self.resolved_task_vector_out()
        if path is None or not self.trainer.is_global_zero:
            return
        self.task_vector_path = write_task_vector(
            path, self.encoder, self.base_state, self.task_vector_metadata(), overwrite=self.overwrite
        )
        rank_zero_info(f"task vector written to {self.task_vector_path}")
