"""OpenCLIP image classifiers: zero-shot-head fine-tuning (task-vectors protocol) and linear probes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..arguments import init_arguments
from ..data.templates import GENERIC_TEMPLATES
from ..transport.errors import FamilyMismatchError
from .base import EncoderClassifier
from .heads import warn_near_duplicate_classes, zeroshot_logits, zeroshot_weights

HEADS = ("zeroshot", "linear")


def load_openclip_model(model_name: str, pretrained: str | None) -> tuple[nn.Module, Callable]:
    """Return (CLIP model, tokenizer) through the families adapter (zoo names, OfflineError offline)."""
    from ..families.openclip import load_openclip  # lazy: keeps this module importable on its own

    model, _, _, tokenizer = load_openclip(model_name, pretrained, device="cpu")
    return model, tokenizer


def _embed_dim(clip_model: nn.Module) -> int:
    output_dim = getattr(clip_model.visual, "output_dim", None)
    if output_dim is not None:
        return int(output_dim)
    return int(clip_model.text_projection.shape[-1])


class ImageClassifier(EncoderClassifier):
    """OpenCLIP image encoder (``model.visual``) with a frozen zero-shot head or a linear head.

    ``head="zeroshot"``: class embeddings from ``classnames`` x ``templates`` through the model's own
    text tower, kept as a frozen buffer; logits = logit_scale * cos(image feature, class). Only the
    image encoder trains. ``head="linear"``: a new nn.Linear on the (unnormalised) image features.
    ``classnames``/``templates`` default to the datamodule's at ``setup``.
    """

    family = "openclip"
    encoder_kind = "visual"

    def __init__(
        self,
        model_name: str = "ViT-B-16",
        pretrained: str | None = None,
        head: str = "zeroshot",
        classnames: list[str] | None = None,
        templates: list[str] | None = None,
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
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        # the signature above stays explicit because LightningCLI reads it; the base's share goes on by name
        super().__init__(**init_arguments(EncoderClassifier, locals()))
        self._save_own_hyperparameters()
        self.model_name, self.pretrained, self.head_kind = model_name, pretrained, head
        clip_model, tokenizer = load_openclip_model(model_name, pretrained)
        self.encoder = clip_model.visual
        self.embed_dim = _embed_dim(clip_model)
        self.register_buffer("logit_scale", clip_model.logit_scale.detach().exp().clone().float())
        # the text tower is only needed to build the zero-shot head; a tuple keeps it out of the module
        # tree (no parameters, optimiser or checkpoint entries) and lets it be dropped afterwards
        self._text_source: tuple[nn.Module, Callable] | None = (clip_model, tokenizer) if head == "zeroshot" else None
        self.head: nn.Linear | None = None
        self.classnames = list(classnames) if classnames is not None else None
        self.templates = list(templates) if templates is not None else None
        self._encoder_ready()
        if self.classnames is not None:
            self.build_head(self.classnames, self.templates)

    # ----- head ------------------------------------------------------------------------------------------------
    def build_head(
        self,
        classnames: list[str] | None = None,
        templates: list[str] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Build the head for these classes (zero-shot: through the pretrained text tower; linear: new layer)."""
        self.classnames = list(classnames if classnames is not None else self.classnames or [])
        if not self.classnames:
            raise ValueError("no class names: pass classnames=[...] or use a datamodule that provides them")
        if templates is not None:
            self.templates = list(templates)
        if self.templates is None:
            self.templates = list(GENERIC_TEMPLATES)
        # record what the head was built from, so load_from_checkpoint rebuilds the same shapes
        for key, value in (("classnames", self.classnames), ("templates", self.templates)):
            if key in self.hparams:
                self.hparams[key] = value
        if self.head_kind == "zeroshot":
            if self._text_source is None:
                raise RuntimeError("the text tower was released; the zero-shot head can no longer be rebuilt")
            clip_model, tokenizer = self._text_source
            weights = zeroshot_weights(clip_model, tokenizer, self.classnames, self.templates, device=device)
            if len(self.classnames) > 1:
                warn_near_duplicate_classes(weights, self.classnames)
            self._set_zeroshot_buffer(weights.cpu())
            self._text_source = None  # release the text tower
        else:
            self._build_head(len(self.classnames))

    def _set_zeroshot_buffer(self, weights: torch.Tensor) -> None:
        self.register_buffer("zeroshot_head", weights.detach().clone())
        self._set_num_classes(weights.shape[0])

    def _build_head(self, num_classes: int) -> None:
        if self.head_kind == "zeroshot":
            self._set_zeroshot_buffer(torch.zeros(num_classes, self.embed_dim))
        else:
            self.head = nn.Linear(self.embed_dim, num_classes)
            self._set_num_classes(num_classes)

    @property
    def head_ready(self) -> bool:
        """Whether the head exists."""
        return self.num_classes is not None

    def setup(self, stage: str) -> None:
        """Check the datamodule preprocesses for this model; build the head from its class names when not given."""
        datamodule = self._datamodule()
        self._check_preprocessing(datamodule)
        if self.head_ready:
            return
        classnames = self.classnames or getattr(datamodule, "classnames", None)
        templates = self.templates or getattr(datamodule, "templates", None)
        if not classnames:
            raise ValueError("ImageClassifier needs classnames: pass them or use a datamodule with .classnames")
        root = self.trainer.strategy.root_device
        # encoding thousands of prompts is much faster on the accelerator the run will use anyway
        device = root if root.type != "cpu" else None
        if device is not None and self._text_source is not None:
            self._text_source[0].to(device)
        self.build_head(list(classnames), list(templates) if templates else None, device=device)

    def _check_preprocessing(self, datamodule: Any) -> None:
        """Refuse a datamodule that resizes and normalises images for another model (a config that overrode one side)."""
        data_model = getattr(datamodule, "model_name", None)
        data_pretrained = getattr(datamodule, "pretrained", None)
        if data_model is not None and data_model != self.model_name:
            raise FamilyMismatchError(
                f"the datamodule preprocesses images for {data_model!r}, the model is {self.model_name!r}: set the "
                "datamodule's model_name to the model's (the theseus CLI links the two)"
            )
        if data_pretrained and self.pretrained and data_pretrained != self.pretrained:
            raise FamilyMismatchError(
                f"the datamodule preprocesses images for {self.model_name!r} weights {data_pretrained!r}, the model "
                f"loads {self.pretrained!r}: set the datamodule's pretrained to the model's"
            )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Create the head with the checkpoint's shape so its state dict loads."""
        if self.head_ready:
            return
        state = checkpoint.get("state_dict", {})
        if "zeroshot_head" in state:
            self._set_zeroshot_buffer(torch.zeros_like(state["zeroshot_head"]))
            self._text_source = None
        elif "head.weight" in state:
            self._build_head(state["head.weight"].shape[0])

    # ----- forward ---------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits for a batch of preprocessed images."""
        if not self.head_ready:
            raise RuntimeError("the head is not built yet: call build_head(classnames) or run through a Trainer")
        features = self.encoder(images)
        if self.head_kind == "zeroshot":
            return zeroshot_logits(features, self.zeroshot_head, self.logit_scale)
        return self.head(features)

    def _logits_and_labels(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = batch
        return self(images), labels


class LinearProbe(ImageClassifier):
    """A linear head trained on a frozen OpenCLIP image encoder (kept in eval mode, bitwise unchanged)."""

    def __init__(
        self,
        model_name: str = "ViT-B-16",
        pretrained: str | None = None,
        classnames: list[str] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        max_steps: int | None = None,
        label_smoothing: float = 0.0,
        task_vector_out: str | None = None,
        task_name: str | None = None,
        overwrite: bool = False,
    ) -> None:
        # the signature above stays explicit because LightningCLI reads it; the rest of ImageClassifier's is fixed
        super().__init__(**init_arguments(ImageClassifier, locals(), head="linear", templates=None, freeze_encoder=True))
