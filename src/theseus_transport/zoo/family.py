"""A tiny OpenCLIP family (source, wider target, deeper target), pretrained contrastively on the world.

The members are ordinary OpenCLIP ViT-CLIP configs registered at run time, built by the real
`open_clip.create_model_and_transforms` factory and tokenised by the real OpenCLIP tokenizer, so every
code path that serves real checkpoints runs unchanged on them.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import multiprocessing
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import open_clip

from ..transport.errors import UnknownNameError
from .world import (
    TASKS,
    caption_scene,
    default_cache_dir,
    load_pretraining_pairs,
    load_task,
    scene_from_row,
    world_identity,
)

log = logging.getLogger(__name__)

FAMILY_FORMAT = "theseus-zoo-family/1"
SOURCE, WIDE, DEEP = "theseus-tiny-s", "theseus-tiny-w", "theseus-tiny-deep"
FAMILY_MEMBERS: tuple[str, ...] = (SOURCE, WIDE, DEEP)

# A wider target of equal depth on the source's patch grid (32 px images, 8 px patches: 4x4 + CLS = 17
# vision tokens for every member), like T5-Large -> T5-3B on the same tokens. Session 4 shipped the
# ViT-B/16 (224 px) -> ViT-B/16+ (240 px) analogy (targets at 40 px, 5x5 + CLS = 26 tokens); session 5's
# full demo measured the same-grid pair as better for transport (linear CKA of the base embeddings
# 0.92-0.95 against 0.74-0.83; gap recovered 29 % against 7 % with the embedding stage transported,
# which on the 40 px pair hurt because the source's patch filters saw another pixel scale): docs/zoo.md.
# The different-grid case stays covered by the engine's tests (token interpolation) and the real configs.
# Patches of 8 px (not 4): in a learning-curve study (docs/zoo.md) 4 px patches trained 2x slower per
# step and their CLIP loss stalled (3.84 after 480 steps against 2.84 after 800 steps with 8 px),
# leaving zero-shot at chance on most tasks; 8 px patches reach 60 %+ average zero-shot in the same budget.
CONTEXT_LENGTH = 32
_TEXT_CFG = {"context_length": CONTEXT_LENGTH, "vocab_size": 49408, "layers": 3}
FAMILY_CONFIGS: dict[str, dict[str, Any]] = {
    SOURCE: {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 32, "layers": 4, "width": 64, "head_width": 16, "patch_size": 8},
        "text_cfg": {**_TEXT_CFG, "width": 64, "heads": 4},
    },
    WIDE: {
        "embed_dim": 96,
        "vision_cfg": {"image_size": 32, "layers": 4, "width": 96, "head_width": 16, "patch_size": 8},
        "text_cfg": {**_TEXT_CFG, "width": 96, "heads": 6},
    },
    DEEP: {
        "embed_dim": 96,
        "vision_cfg": {"image_size": 32, "layers": 6, "width": 96, "head_width": 16, "patch_size": 8},
        "text_cfg": {**_TEXT_CFG, "width": 96, "heads": 6},
    },
}


@dataclass(frozen=True)
class PretrainRecipe:
    """The contrastive pretraining recipe of the members (they differ in seed; see MEMBER_STEPS)."""

    steps: int = 2000
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_fraction: float = 0.1
    grad_clip: float = 1.0


DEFAULT_RECIPE = PretrainRecipe()
# The deep member serves only the depth experiment; half the steps keeps the whole family within
# 15 minutes on 2 cores (it is the costliest member per step).
MEMBER_STEPS: dict[str, int] = {DEEP: 1000}


def member_recipe(name: str, steps: int | None = None) -> PretrainRecipe:
    """The recipe a member trains with: the default one, its own step count, or `steps` for all."""
    chosen = steps if steps is not None else MEMBER_STEPS.get(name, DEFAULT_RECIPE.steps)
    return replace(DEFAULT_RECIPE, steps=int(chosen))

_registered_config_dir: Path | None = None


def register_family_configs() -> None:
    """Register the family's model configs with OpenCLIP (idempotent)."""
    global _registered_config_dir
    if _registered_config_dir is not None and all(name in open_clip.list_models() for name in FAMILY_MEMBERS):
        return
    for name, config in FAMILY_CONFIGS.items():
        existing = open_clip.get_model_config(name) if name in open_clip.list_models() else None
        if existing is not None and existing != config:
            raise ValueError(f"an OpenCLIP config named {name!r} is already registered with different contents")
    # open_clip only reads configs from files; a private folder that lives as long as the process
    # keeps them readable for any later registry rescan and leaves the user's cache untouched
    config_dir = Path(tempfile.mkdtemp(prefix="theseus_zoo_configs_"))
    atexit.register(shutil.rmtree, config_dir, ignore_errors=True)
    for name, config in FAMILY_CONFIGS.items():
        (config_dir / f"{name}.json").write_text(json.dumps(config, indent=2))
    open_clip.add_model_config(config_dir)
    _registered_config_dir = config_dir


def vision_token_count(name: str) -> int:
    """Number of vision tokens (patch grid plus CLS) of a family member."""
    vision = FAMILY_CONFIGS[name]["vision_cfg"]
    grid = vision["image_size"] // vision["patch_size"]
    return grid * grid + 1


def member_seed(name: str, seed: int) -> int:
    """Each member gets its own seed derived from the family seed."""
    return seed * 1000 + FAMILY_MEMBERS.index(name) + 1


FAMILY_VARIANT_ENV = "THESEUS_ZOO_FAMILY"


def family_variant() -> str:
    """Which family folder is in use: '' for the default recipe, or $THESEUS_ZOO_FAMILY (e.g. 'quick')."""
    return os.environ.get(FAMILY_VARIANT_ENV, "").strip()


def _family_dir(cache_dir: str | os.PathLike | None) -> Path:
    """Folder of the family's checkpoints inside a cache root (`family` or `family-<variant>`).

    A variant (the quick demo's short recipe) lives in its own folder beside the default family, so a
    quickly trained member never replaces a fully trained one, and both share one rendered world.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    variant = family_variant()
    return root / (f"family-{variant}" if variant else "family")


def _variant_steps() -> int | None:
    """The step count a variant folder named '<N>steps' (the demo's short recipes) stands for, else None."""
    match = re.fullmatch(r"(\d+)steps", family_variant())
    return int(match.group(1)) if match else None


def checkpoint_path(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where a member's pretrained weights live: `<cache>/family/<name>.safetensors`."""
    return _family_dir(cache_dir) / f"{name}.safetensors"


def read_family_manifest(cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The family manifest (per member: seed, steps, final loss, build time), empty if none."""
    try:
        return json.loads((_family_dir(cache_dir) / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {"format": FAMILY_FORMAT, "members": {}}


def _write_member_record(cache_dir: str | os.PathLike | None, name: str, record: dict[str, Any]) -> None:
    """Add or replace one member's entry in the family manifest (atomic rewrite)."""
    manifest = read_family_manifest(cache_dir)
    manifest.setdefault("members", {})[name] = record
    manifest["format"] = FAMILY_FORMAT
    target = _family_dir(cache_dir) / "manifest.json"
    staging = target.with_suffix(".json.tmp")
    staging.write_text(json.dumps(manifest, indent=2))
    os.replace(staging, target)


# ---------------------------------------------------------------------------------------------
# Pretraining
# ---------------------------------------------------------------------------------------------


def preprocess_images(images: Sequence[Any], preprocess: Callable) -> torch.Tensor:
    """Apply a model's eval preprocess to PIL images and stack them into one (N, 3, H, W) tensor."""
    return torch.stack([preprocess(image.convert("RGB")) for image in images])


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of normalised image and text features (the CLIP loss)."""
    logits = logit_scale * image_features @ text_features.T
    targets = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def _optimizer(model: torch.nn.Module, recipe: PretrainRecipe) -> torch.optim.Optimizer:
    """AdamW without weight decay on gains, biases and the logit scale (OpenCLIP's split)."""

    def no_decay(name: str, param: torch.Tensor) -> bool:
        return param.ndim < 2 or "ln" in name or "bias" in name or "logit_scale" in name

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in params if no_decay(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in params if not no_decay(n, p)], "weight_decay": recipe.weight_decay},
    ]
    return torch.optim.AdamW(groups, lr=recipe.lr, betas=(0.9, 0.98), eps=1e-6)


def _cosine_lr(step: int, recipe: PretrainRecipe) -> float:
    """Linear warmup then cosine decay to zero."""
    warmup = max(1, int(recipe.warmup_fraction * recipe.steps))
    if step < warmup:
        return recipe.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, recipe.steps - warmup)
    return recipe.lr * 0.5 * (1 + math.cos(math.pi * progress))


def pretrain_member(
    name: str,
    pairs_images: torch.Tensor,
    pairs_rows: list[dict[str, Any]],
    recipe: PretrainRecipe,
    seed: int,
    progress: bool = True,
    step_callback: Callable[[int, open_clip.CLIP], None] | None = None,
) -> tuple[open_clip.CLIP, list[float]]:
    """Train one member from random init with the CLIP loss; returns the model and per-step losses.

    Captions are redrawn from each pair's attributes every time it is sampled, so over training the
    model sees every attribute named in many phrasings (pairs_rows hold the attributes).
    """
    register_family_configs()
    torch.manual_seed(seed)
    model, _, _ = open_clip.create_model_and_transforms(name)
    tokenizer = open_clip.get_tokenizer(name)
    optimizer = _optimizer(model, recipe)
    batch_generator = torch.Generator().manual_seed(seed)
    caption_rng = np.random.default_rng(seed)
    scenes = [scene_from_row(row) for row in pairs_rows]
    losses: list[float] = []
    model.train()
    report_every = max(1, recipe.steps // 10)
    started = time.perf_counter()
    for step in range(recipe.steps):
        for group in optimizer.param_groups:
            group["lr"] = _cosine_lr(step, recipe)
        index = torch.randint(len(pairs_images), (recipe.batch_size,), generator=batch_generator)
        texts = tokenizer([caption_scene(scenes[i], caption_rng) for i in index.tolist()])
        image_features, text_features, logit_scale = model(pairs_images[index], texts)
        loss = clip_loss(image_features, text_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        with torch.no_grad():
            # as in OpenCLIP training: the temperature may not exceed 100
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if step_callback is not None:
            step_callback(step + 1, model)
        if progress and (step + 1) % report_every == 0:
            recent = sum(losses[-report_every:]) / len(losses[-report_every:])
            print(f"  [{name}] step {step + 1}/{recipe.steps} loss {recent:.3f} ({time.perf_counter() - started:.0f}s)",
                  flush=True)
    model.eval()
    return model, losses


def _pretraining_tensors(
    cache_dir: str | os.PathLike | None, image_size: int
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """The pretraining images preprocessed for one image size (a member's own eval preprocess)."""
    pairs = load_pretraining_pairs(cache_dir)
    rows = pairs.remove_columns(["image"]).to_list()
    member = next(n for n in FAMILY_MEMBERS if FAMILY_CONFIGS[n]["vision_cfg"]["image_size"] == image_size)
    _, _, preprocess = open_clip.create_model_and_transforms(member)
    return preprocess_images(list(pairs["image"]), preprocess), rows


def _train_and_save(
    name: str, cache_dir: str | os.PathLike | None, recipe: PretrainRecipe, seed: int, progress: bool,
    variant: str = "",
) -> dict[str, Any]:
    """Pretrain one member with one torch thread, save its checkpoint, and return its manifest record.

    Runs in a worker process when members train in parallel, so it takes only picklable arguments.
    """
    # one thread per member: on a small machine two members on one core each beat one member on two
    torch.set_num_threads(1)
    register_family_configs()  # a spawned worker starts with OpenCLIP's built-in registry only
    if variant:
        os.environ[FAMILY_VARIANT_ENV] = variant
    started = time.perf_counter()
    images, rows = _pretraining_tensors(cache_dir, FAMILY_CONFIGS[name]["vision_cfg"]["image_size"])
    model, losses = pretrain_member(name, images, rows, recipe, member_seed(name, seed), progress)
    _save_member(model, checkpoint_path(name, cache_dir))
    record = {
        "seed": seed,
        "member_seed": member_seed(name, seed),
        "recipe": asdict(recipe),
        "steps": recipe.steps,
        "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
        "build_seconds": round(time.perf_counter() - started, 1),
        "pretraining_pairs": len(rows),
        "config": FAMILY_CONFIGS[name],
        "world": world_identity(cache_dir),
    }
    if progress:
        print(f"theseus zoo: built {name} in {record['build_seconds']}s, final loss {record['final_loss']}", flush=True)
    return record


def _training_cost(name: str) -> int:
    """Relative cost of one pretraining step (vision layers x width^2 x tokens), to schedule the biggest first."""
    vision = FAMILY_CONFIGS[name]["vision_cfg"]
    return vision["layers"] * vision["width"] ** 2 * vision_token_count(name)


def build_family(
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    steps: int | None = None,
    members: Sequence[str] | None = None,
    force: bool = False,
    progress: bool = True,
    workers: int | None = None,
) -> dict[str, Path]:
    """Pretrain the family members (skipping cached ones) and return their checkpoint paths.

    Members train in parallel worker processes (`workers`, default: one per CPU core, at most one per
    member), each on one thread; every member has its own seed, so the result does not depend on
    how many workers ran.
    """
    register_family_configs()
    members = tuple(members) if members is not None else FAMILY_MEMBERS
    unknown = [m for m in members if m not in FAMILY_MEMBERS]
    if unknown:
        raise UnknownNameError(f"unknown family members {unknown}; known: {list(FAMILY_MEMBERS)}")
    recipes = {m: member_recipe(m, steps) for m in members}
    records = read_family_manifest(cache_dir).get("members", {})
    todo = [m for m in members if force or not _is_cached(m, cache_dir, records.get(m), recipes[m], seed)]
    paths = {m: checkpoint_path(m, cache_dir) for m in members}
    if not todo:
        return paths
    stale = [m for m in todo if paths[m].is_file() and not force]
    if stale:
        # a cache, not user data: a member trained with another seed, recipe or config is rebuilt
        log.warning("cached %s in %s were trained with another seed, recipe, config or world, or the file is "
                    "damaged; rebuilding them",
                    ", ".join(stale), _family_dir(cache_dir))
    total_started = time.perf_counter()
    load_pretraining_pairs(cache_dir)  # render the world here, once, before any worker reads it
    _family_dir(cache_dir).mkdir(parents=True, exist_ok=True)
    # longest first: on two workers the big member runs alone while the small ones share the other
    todo.sort(key=lambda m: _training_cost(m) * recipes[m].steps, reverse=True)
    workers = min(len(todo), workers if workers is not None else (os.cpu_count() or 1))
    if progress:
        plan = ", ".join(f"{m} ({recipes[m].steps} steps)" for m in todo)
        print(f"theseus zoo: pretraining {plan} on {workers} worker(s)", flush=True)
    if workers <= 1:
        for name in todo:
            _write_member_record(cache_dir, name, _train_and_save(name, cache_dir, recipes[name], seed, progress))
    else:
        # spawn, not fork: torch's thread pools do not survive a fork
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = {pool.submit(_train_and_save, name, cache_dir, recipes[name], seed, progress, family_variant()): name
                       for name in todo}
            for future in as_completed(futures):
                # the manifest is written here only, so workers never race on it
                _write_member_record(cache_dir, futures[future], future.result())
    if progress:
        print(f"theseus zoo: family build took {time.perf_counter() - total_started:.0f}s in all", flush=True)
    return paths


def _is_cached(
    name: str, cache_dir: str | os.PathLike | None, record: Mapping[str, Any] | None, recipe: PretrainRecipe, seed: int
) -> bool:
    """Whether a member's checkpoint exists whole and was trained with this seed, recipe, config and world."""
    return (
        checkpoint_intact(checkpoint_path(name, cache_dir))
        and record is not None
        and record.get("seed") == seed
        and record.get("recipe") == asdict(recipe)
        and record.get("config") == FAMILY_CONFIGS[name]
        # members built before the world was recorded are taken as built on the world that is there
        and ("world" not in record or record["world"] == world_identity(cache_dir))
    )


def checkpoint_intact(path: Path) -> bool:
    """Whether a safetensors file exists and is as long as its header says (not truncated or garbled)."""
    try:
        with open(path, "rb") as handle:
            header_size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(header_size))
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
        return path.stat().st_size == 8 + header_size + max(ends, default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, MemoryError, OverflowError):
        return False


def _save_member(model: torch.nn.Module, path: Path) -> None:
    """Write the model's state dict as safetensors, atomically."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    staging = path.with_suffix(".safetensors.tmp")
    save_file(state, str(staging), metadata={"format": FAMILY_FORMAT, "model": path.stem})
    os.replace(staging, path)


# ---------------------------------------------------------------------------------------------
# Loading and zero-shot evaluation
# ---------------------------------------------------------------------------------------------


def load_member(
    name: str, cache_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu"
) -> tuple[open_clip.CLIP, Callable, Callable]:
    """Load a pretrained member as (model in eval mode, preprocess_val, tokenizer), building it if missing."""
    model, _, preprocess_val, tokenizer = load_member_with_transforms(name, cache_dir, device)
    return model, preprocess_val, tokenizer


def load_member_with_transforms(
    name: str, cache_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu"
) -> tuple[open_clip.CLIP, Callable, Callable, Callable]:
    """Load a pretrained member as (model in eval mode, preprocess_train, preprocess_val, tokenizer)."""
    if name not in FAMILY_MEMBERS:
        raise UnknownNameError(f"unknown family member {name!r}; known: {list(FAMILY_MEMBERS)}")
    register_family_configs()
    path = checkpoint_path(name, cache_dir)
    if not checkpoint_intact(path):
        log.warning("no whole checkpoint for %s at %s; pretraining it now (a few minutes on CPU)", name, path)
        build_family(cache_dir, members=(name,), steps=_variant_steps())
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        name, pretrained=str(path), device=device
    )
    model.eval()
    return model, preprocess_train, preprocess_val, open_clip.get_tokenizer(name)


def _model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's parameters."""
    return next(model.parameters()).device


@torch.no_grad()
def zero_shot_classifier(
    model: open_clip.CLIP, tokenizer: Callable, classnames: Sequence[str], templates: Sequence[str]
) -> torch.Tensor:
    """Class embeddings (num_classes x embed_dim): normalised prompt embeddings averaged over templates."""
    device = _model_device(model)
    class_embeddings = []
    for classname in classnames:
        texts = tokenizer([template.format(classname) for template in templates]).to(device)
        embeddings = F.normalize(model.encode_text(texts), dim=-1)
        class_embeddings.append(F.normalize(embeddings.mean(dim=0), dim=-1))
    return torch.stack(class_embeddings)


@torch.no_grad()
def encode_images(
    model: open_clip.CLIP, preprocess: Callable, images: Sequence[Any], batch_size: int = 256
) -> torch.Tensor:
    """Normalised image embeddings of PIL images, in batches."""
    device = _model_device(model)
    features = []
    for start in range(0, len(images), batch_size):
        batch = preprocess_images(images[start : start + batch_size], preprocess).to(device)
        features.append(F.normalize(model.encode_image(batch), dim=-1))
    return torch.cat(features)


def zero_shot_accuracy(
    model: open_clip.CLIP,
    preprocess: Callable,
    tokenizer: Callable,
    task_name: str,
    split: str = "test",
    cache_dir: str | os.PathLike | None = None,
) -> float:
    """Top-1 zero-shot accuracy of a model on a world task split, with the task's prompt templates."""
    task = TASKS[task_name]
    data = load_task(task_name, cache_dir)[split]
    was_training = model.training
    model.eval()
    head = zero_shot_classifier(model, tokenizer, task.classnames, task.templates)
    image_features = encode_images(model, preprocess, list(data["image"]))
    model.train(was_training)
    predictions = (image_features @ head.T).argmax(dim=-1).cpu()
    return float((predictions == torch.as_tensor(data["label"])).float().mean())
