"""T5 encoder classifier: mean-pooled encoder states and a linear head (fine-tune or linear probe)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..arguments import init_arguments
from .base import EncoderClassifier


def load_t5(model_name: str) -> nn.Module:
    """Return a transformers T5EncoderModel: a hub id, a local folder, or ``t5-tiny-offline[-wide]``."""
    from ..families.t5 import load_t5_encoder  # lazy: keeps this module importable on its own

    return load_t5_encoder(model_name, device="cpu")


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the hidden states over non-padding tokens: (batch, seq, dim) -> (batch, dim)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


class TextClassifier(EncoderClassifier):
    """T5 encoder + mean pooling + linear head for premise/hypothesis classification.

    ``freeze_encoder=True`` gives the paper's language protocol (linear probe on a frozen encoder).
    ``num_classes`` defaults to the datamodule's at ``setup``.
    """

    family = "t5"
    encoder_kind = "t5-encoder"

    def __init__(
        self,
        model_name: str = "t5-tiny-offline",
        num_classes: int | None = None,
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
        # the signature above stays explicit because LightningCLI reads it; the base's share goes on by name
        super().__init__(**init_arguments(EncoderClassifier, locals()))
        self._save_own_hyperparameters()
        self.model_name, self.pretrained = model_name, None  # T5 weights are named by model_name alone
        self.encoder = load_t5(model_name)
        self.hidden_size = int(self.encoder.config.d_model)
        self.head: nn.Linear | None = None
        self._encoder_ready()
        if num_classes is not None:
            self._build_head(num_classes)

    def _build_head(self, num_classes: int) -> None:
        self.head = nn.Linear(self.hidden_size, num_classes)
        self.hparams["num_classes"] = num_classes
        self._set_num_classes(num_classes)

    def setup(self, stage: str) -> None:
        """Create the head from the datamodule's number of classes when not given."""
        if self.head is None:
            num_classes = getattr(self._datamodule(), "num_classes", None)
            if num_classes is None:
                raise ValueError("TextClassifier needs num_classes: pass it or use a datamodule with .num_classes")
            self._build_head(int(num_classes))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Create the head with the checkpoint's shape so its state dict loads."""
        weight = checkpoint.get("state_dict", {}).get("head.weight")
        if self.head is None and weight is not None:
            self._build_head(weight.shape[0])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Class logits for tokenised inputs."""
        if self.head is None:
            raise RuntimeError("the head is not built yet: pass num_classes or run through a Trainer")
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(mean_pool(hidden, attention_mask))

    def _logits_and_labels(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self(batch["input_ids"], batch["attention_mask"]), batch["labels"]
