"""Prompt templates for CLIP zero-shot heads: a generic list and one list per vision task."""

from __future__ import annotations

# Each template holds one "{}" that receives a class name. The per-task lists follow the style of
# the CLIP / task-vectors prompt sets (a few domain phrasings per task), written for this project.
GENERIC_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a close-up photo of a {}.",
    "a cropped photo of the {}.",
    "a photo of the {}.",
)

TASK_TEMPLATES: dict[str, tuple[str, ...]] = {
    "sun397": (
        "a photo of a {}.",
        "a photo of the {}.",
        "a photo of a scene: {}.",
        "a picture of a place: {}.",
    ),
    "stanford_cars": (
        "a photo of a {}.",
        "a photo of the {}, a type of car.",
        "a photo of my {}.",
        "a photo of a {}, a car model.",
        "a picture of the {} car.",
    ),
    "resisc45": (
        "satellite imagery of {}.",
        "aerial imagery of {}.",
        "an aerial photo of the {}.",
        "a satellite photo of the {}.",
        "remote sensing image of {}.",
    ),
    "eurosat": (
        "a centered satellite photo of {}.",
        "a satellite photo of {}.",
        "a centered aerial photo of the {}.",
        "satellite view of {}.",
    ),
    "gtsrb": (
        'a zoomed in photo of a "{}" traffic sign.',
        'a centered photo of a "{}" traffic sign.',
        'a close up photo of a "{}" traffic sign.',
        'a photo of the "{}" road sign.',
    ),
    "dtd": (
        "a photo of a {} texture.",
        "a photo of a {} pattern.",
        "a photo of a {} thing.",
        "a close-up of a {} surface.",
        "a photo of the {} object.",
    ),
    "svhn": (
        'a photo of the number: "{}".',
        'a street sign showing the digit "{}".',
        'a house number photo with the digit "{}".',
    ),
    "mnist": (
        'a photo of the number: "{}".',
        'a handwritten digit "{}".',
        'an image of the handwritten number "{}".',
    ),
}


def templates_for(task: str | None) -> list[str]:
    """Return the templates of a known vision task, or the generic list for any other name."""
    return list(TASK_TEMPLATES.get(task or "", GENERIC_TEMPLATES))
