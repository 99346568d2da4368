"""The offline model zoo: a procedural image-caption world and a tiny OpenCLIP family trained on it."""

from .family import (
    FAMILY_MEMBERS,
    build_family,
    load_member,
    register_family_configs,
    zero_shot_accuracy,
    zero_shot_classifier,
)
from .world import TASKS, TaskSpec, build_world, default_cache_dir, load_pretraining_pairs, load_task

__all__ = [
    "FAMILY_MEMBERS",
    "TASKS",
    "TaskSpec",
    "build_family",
    "build_world",
    "default_cache_dir",
    "load_member",
    "load_pretraining_pairs",
    "load_task",
    "register_family_configs",
    "zero_shot_accuracy",
    "zero_shot_classifier",
]
