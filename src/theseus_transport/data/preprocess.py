"""OpenCLIP image preprocessing for a model name and pretrained tag, without building the model."""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import open_clip
from open_clip.transform import PreprocessCfg, merge_preprocess_dict

from ..transport.errors import OfflineError

LOCAL_DIR_PREFIX = "local-dir:"
HF_HUB_PREFIX = "hf-hub:"


def _register_project_configs() -> None:
    # the offline zoo family registers its open_clip configs on demand, not on import
    try:
        family = importlib.import_module("theseus_transport.zoo.family")
    except ImportError:
        return
    family.register_family_configs()


def _registered_model_config(model_name: str) -> dict[str, Any] | None:
    config = open_clip.get_model_config(model_name)
    if config is None:
        _register_project_configs()
        config = open_clip.get_model_config(model_name)
    return config


def _config_file_overlay(config_file: Path) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    payload = json.loads(config_file.read_text())
    return payload.get("model_cfg"), payload.get("preprocess_cfg", {})


def openclip_preprocess_cfg(model_name: str, pretrained: str | None = None) -> dict[str, Any]:
    """Return open_clip's preprocessing settings (size, mean, std, interpolation, resize_mode, ...).

    Follows ``open_clip.create_model_and_transforms``: defaults, then the pretrained tag's (or a local
    ``open_clip_config.json``'s) settings, then the image size of the model's vision config.
    """
    cfg = asdict(PreprocessCfg())
    if model_name.startswith(LOCAL_DIR_PREFIX):
        model_cfg, overlay = _config_file_overlay(Path(model_name[len(LOCAL_DIR_PREFIX) :]) / "open_clip_config.json")
        cfg = merge_preprocess_dict(cfg, overlay)
    elif model_name.startswith(HF_HUB_PREFIX):
        hub_id = model_name[len(HF_HUB_PREFIX) :]
        try:
            payload = open_clip.factory._get_hf_config(hub_id)
        except Exception as error:  # noqa: BLE001 - any failure here means the config is unreachable
            raise OfflineError(
                f"cannot read the OpenCLIP config of {model_name!r}: {error}. Pre-download it on a machine with "
                f"network (`python -c \"import open_clip; open_clip.create_model('{model_name}')\"`) and copy "
                "the Hugging Face cache, or use a local-dir: path."
            ) from error
        model_cfg = payload.get("model_cfg")
        cfg = merge_preprocess_dict(cfg, payload.get("preprocess_cfg", {}))
    else:
        model_cfg = _registered_model_config(model_name.replace("/", "-"))
        if model_cfg is None:
            raise ValueError(f"unknown OpenCLIP model {model_name!r}; known models: {open_clip.list_models()}")
        if pretrained:
            tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
            if tag_cfg:
                cfg = merge_preprocess_dict(cfg, tag_cfg)
            else:
                # a local checkpoint may carry its preprocessing in an open_clip_config.json beside it
                path = Path(pretrained)
                config_file = (path if path.is_dir() else path.parent) / "open_clip_config.json"
                if config_file.is_file():
                    cfg = merge_preprocess_dict(cfg, _config_file_overlay(config_file)[1])
    if model_cfg is not None and "preprocess_cfg" in model_cfg:
        # non-standard but handy: a registered config may carry its own preprocessing (mean, std, ...)
        cfg = merge_preprocess_dict(cfg, model_cfg["preprocess_cfg"])
    if model_cfg is not None and "image_size" in model_cfg.get("vision_cfg", {}):
        cfg["size"] = model_cfg["vision_cfg"]["image_size"]
    return cfg


def openclip_image_transform(model_name: str, pretrained: str | None = None, train: bool = False) -> Callable:
    """Return the model's eval transform (or its train transform with augmentation when ``train``)."""
    cfg = openclip_preprocess_cfg(model_name, pretrained)
    return open_clip.image_transform(
        cfg["size"],
        is_train=train,
        mean=cfg["mean"],
        std=cfg["std"],
        interpolation=cfg["interpolation"],
        resize_mode=cfg["resize_mode"],
        fill_color=cfg["fill_color"],
    )


def image_size_of(model_name: str, pretrained: str | None = None) -> tuple[int, int]:
    """Return the (height, width) the model's eval transform produces."""
    size = openclip_preprocess_cfg(model_name, pretrained)["size"]
    return (size, size) if isinstance(size, int) else tuple(size)
