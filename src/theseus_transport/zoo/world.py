"""A procedural image-caption world: scenes of coloured, textured shapes with glyphs on a background.

Everything is rendered with numpy and PIL from a seed, so the world (pretraining pairs and the eight
downstream classification tasks) is reproducible bit for bit on any machine, without a network.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

import datasets

from ..transport.errors import OutputExistsError, UnknownNameError

log = logging.getLogger(__name__)

WORLD_FORMAT = "theseus-zoo-world/1"
IMAGE_SIZE = 48
# Shapes are drawn at this multiple of IMAGE_SIZE and box-downsampled, for anti-aliased edges.
SUPERSAMPLE = 2

# ---------------------------------------------------------------------------------------------
# Attribute vocabularies (the words double as caption words and as task class names)
# ---------------------------------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (140, 50, 190),
    "orange": (245, 140, 20),
}
TEXTURES = ("plain", "striped", "dotted", "checkered")
# Radii in pixels at IMAGE_SIZE.
SIZES: dict[str, int] = {"small": 6, "medium": 9, "large": 13}
# Most objects of one size that fit in a 48 px scene without overlapping.
MAX_COUNT = {"small": 4, "medium": 3, "large": 1}
COUNT_WORDS = ("one", "two", "three", "four")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
GLYPHS = ("A", "E", "H", "K", "R", "X", "2", "3", "5", "7")
# Backgrounds share the object colour words (a slightly darker shade, never the objects' own colour),
# so "red" alone does not say whether the objects or the background are red: like real CLIP models,
# the family must bind colour words to their roles, which zero-shot prompts only partly manage.
BACKGROUND_SHADE = 0.72
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    name: tuple(int(c * BACKGROUND_SHADE) for c in rgb) for name, rgb in COLORS.items()  # type: ignore[misc]
}
# The glyph occupies a disc of this radius (pixels at IMAGE_SIZE) when placing objects.
GLYPH_RADIUS = 8
GLYPH_FONT_SIZE = 15
# How far (pixels) a single object's centre must stay from the midlines, so its quadrant is clear.
QUADRANT_MARGIN = 4
OBJECT_GAP = 2

CAPTION_PREFIXES = ("a photo of", "an image of", "a picture of", "a rendering of", "")


def glyph_phrase(glyph: str) -> str:
    """Return the natural words for a glyph, e.g. 'letter A' or 'digit 7'."""
    return f"digit {glyph}" if glyph.isdigit() else f"letter {glyph}"


# ---------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSpec:
    """One downstream classification task: its attribute, class names and zero-shot prompt templates."""

    name: str
    attribute: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    description: str
    # Scene attributes fixed or restricted for this task's images, so the label is well defined.
    constraints: Mapping[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classnames)


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            name="shapes",
            attribute="shape",
            classnames=SHAPES,
            templates=("a photo of a {}.", "an image of a {}.", "a rendering of a {}.", "a picture of a {} shape."),
            description="Which shape the objects have (6 classes).",
        ),
        TaskSpec(
            name="colors",
            attribute="color",
            classnames=tuple(COLORS),
            templates=("a photo of a {} object.", "an image of {} shapes.", "a picture of something {}."),
            description="Which colour the objects have (6 classes).",
        ),
        TaskSpec(
            name="counting",
            attribute="count",
            classnames=COUNT_WORDS,
            templates=("a photo of {} objects.", "an image of {} shapes.", "a picture showing {} things."),
            description="How many objects the image shows (4 classes).",
        ),
        TaskSpec(
            name="textures",
            attribute="texture",
            classnames=TEXTURES,
            templates=("a photo of a {} object.", "an image of {} shapes.", "a {} pattern."),
            description="The fill pattern of the objects (4 classes); objects are medium or large.",
            constraints={"size": ("medium", "large")},
        ),
        TaskSpec(
            name="positions",
            attribute="position",
            classnames=POSITIONS,
            templates=("a photo of an object in the {}.", "an image of a shape in the {}.", "something in the {}."),
            description="Which quadrant a single object lies in (4 classes).",
            constraints={"count": (1,)},
        ),
        TaskSpec(
            name="sizes",
            attribute="size",
            classnames=tuple(SIZES),
            templates=("a photo of a {} object.", "an image of {} shapes.", "a picture of something {}."),
            description="How large the objects are (3 classes); at most two objects.",
            constraints={"count": (1, 2)},
        ),
        TaskSpec(
            name="glyphs",
            attribute="glyph",
            classnames=tuple(glyph_phrase(g) for g in GLYPHS),
            templates=("a photo with the {}.", "an image of an object with the {}.", "a picture of the {}."),
            description="Which letter or digit is written in the image (10 classes).",
            constraints={"has_glyph": True},
        ),
        TaskSpec(
            name="backgrounds",
            attribute="background",
            classnames=tuple(BACKGROUNDS),
            templates=("a photo of an object on a {} background.", "an image on a {} background.", "a {} background."),
            description="The background colour (6 classes, the object colour words).",
        ),
    )
}

SPLITS = ("train", "val", "test", "calibration")


@dataclass(frozen=True)
class WorldSizes:
    """How many examples the world renders: pretraining pairs, and per task split."""

    pretrain: int = 24000
    train: int = 2000
    val: int = 300
    test: int = 500
    calibration: int = 640

    def split_size(self, split: str) -> int:
        """Number of images in one task split."""
        return int(getattr(self, split))


def _as_sizes(sizes: WorldSizes | Mapping[str, int] | None) -> WorldSizes:
    """Accept a WorldSizes, a partial mapping of overrides, or None (defaults)."""
    if sizes is None:
        return WorldSizes()
    if isinstance(sizes, WorldSizes):
        return sizes
    unknown = set(sizes) - set(asdict(WorldSizes()))
    if unknown:
        raise ValueError(f"unknown world size keys {sorted(unknown)}; known: {sorted(asdict(WorldSizes()))}")
    return replace(WorldSizes(), **{k: int(v) for k, v in sizes.items()})


# ---------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scene:
    """Everything needed to render one image and to caption or label it."""

    shape: str
    color: str
    texture: str
    size: str
    count: int
    background: str
    glyph: str | None
    centers: tuple[tuple[float, float], ...]
    glyph_center: tuple[float, float] | None

    @property
    def position(self) -> str | None:
        """Quadrant of a single object, None when there are several."""
        if self.count != 1:
            return None
        x, y = self.centers[0]
        half = IMAGE_SIZE / 2
        return f"{'top' if y < half else 'bottom'} {'left' if x < half else 'right'}"

    def attribute(self, name: str) -> Any:
        """The value of an attribute by task attribute name ('count' is the count word)."""
        if name == "count":
            return COUNT_WORDS[self.count - 1]
        if name == "glyph":
            return glyph_phrase(self.glyph) if self.glyph else None
        return getattr(self, name)


def _choice(rng: np.random.Generator, options: tuple | list) -> Any:
    """Uniform choice that keeps Python types (np.random.choice would return numpy scalars)."""
    return options[int(rng.integers(len(options)))]


def _place_discs(
    rng: np.random.Generator, radii: list[int], first_quadrant: str | None, tries: int = 400
) -> list[tuple[float, float]] | None:
    """Place non-overlapping discs one after another (the first one inside `first_quadrant` if given).

    Returns None if some disc finds no room in `tries` attempts.
    """
    placed: list[tuple[float, float, int]] = []
    for index, radius in enumerate(radii):
        low, high = radius + 1.0, IMAGE_SIZE - radius - 1.0
        for _ in range(tries):
            x, y = (float(v) for v in rng.uniform(low, high, size=2))
            if index == 0 and first_quadrant is not None and not _in_quadrant(x, y, first_quadrant):
                continue
            if all(math.hypot(x - px, y - py) >= radius + pr + OBJECT_GAP for px, py, pr in placed):
                placed.append((x, y, radius))
                break
        else:
            return None
    return [(x, y) for x, y, _ in placed]


def _in_quadrant(x: float, y: float, quadrant: str) -> bool:
    """Whether (x, y) is inside the named quadrant, clear of the midlines."""
    half = IMAGE_SIZE / 2
    vertical, horizontal = quadrant.split()
    in_rows = y < half - QUADRANT_MARGIN if vertical == "top" else y > half + QUADRANT_MARGIN
    in_cols = x < half - QUADRANT_MARGIN if horizontal == "left" else x > half + QUADRANT_MARGIN
    return in_rows and in_cols


def _sample_color_pair(rng: np.random.Generator, constraints: Mapping[str, Any]) -> tuple[str, str]:
    """Object colour and a different background colour, each within its allowed values."""
    backgrounds = tuple(constraints.get("background", BACKGROUNDS))
    colors = tuple(constraints.get("color", COLORS))
    if len(backgrounds) == 1:
        colors = tuple(c for c in colors if c != backgrounds[0])
    color = _choice(rng, colors)
    background = _choice(rng, tuple(b for b in backgrounds if b != color))
    return color, background


def _sample_size_and_count(rng: np.random.Generator, constraints: Mapping[str, Any]) -> tuple[str, int]:
    """Object size and count within their allowed values, never more objects than fit."""
    counts = tuple(constraints.get("count", (1, 2, 3, 4)))
    sizes = [s for s in constraints.get("size", SIZES) if any(c <= MAX_COUNT[s] for c in counts)]
    if not sizes:
        raise ValueError(f"no object size fits the constraints {dict(constraints)}")
    size = _choice(rng, sizes)
    count = _choice(rng, [c for c in counts if c <= MAX_COUNT[size]])
    return size, count


def sample_scene(rng: np.random.Generator, constraints: Mapping[str, Any] | None = None) -> Scene:
    """Draw a random scene; `constraints` maps attribute names to allowed values (or has_glyph)."""
    constraints = dict(constraints or {})
    while True:
        size, count = _sample_size_and_count(rng, constraints)
        # a glyph needs free space, so crowded scenes carry none
        has_glyph = constraints.get("has_glyph", bool(rng.random() < 0.5) and count <= 2)
        quadrant = _choice(rng, constraints["position"]) if "position" in constraints else None
        if quadrant is None and count == 1:
            quadrant = _choice(rng, POSITIONS)
        radii = [SIZES[size]] * count + ([GLYPH_RADIUS] if has_glyph else [])
        centers = _place_discs(rng, radii, first_quadrant=quadrant)
        if centers is None:
            continue  # rare: the draw does not fit; draw again (still deterministic)
        color, background = _sample_color_pair(rng, constraints)
        return Scene(
            shape=_choice(rng, constraints.get("shape", SHAPES)),
            color=color,
            texture=_choice(rng, constraints.get("texture", TEXTURES)),
            size=size,
            count=count,
            background=background,
            glyph=_choice(rng, constraints.get("glyph", GLYPHS)) if has_glyph else None,
            centers=tuple(centers[:count]),
            glyph_center=centers[count] if has_glyph else None,
        )


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape centred at (cx, cy) with circumradius r."""
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    if shape == "cross":
        a, b = r, r * 0.36
        return [
            (cx - b, cy - a), (cx + b, cy - a), (cx + b, cy - b), (cx + a, cy - b), (cx + a, cy + b), (cx + b, cy + b),
            (cx + b, cy + a), (cx - b, cy + a), (cx - b, cy + b), (cx - a, cy + b), (cx - a, cy - b), (cx - b, cy - b),
        ]
    raise ValueError(f"unknown shape {shape!r}")


def _shape_mask(shape: str, centers: tuple[tuple[float, float], ...], radius: float, side: int) -> Image.Image:
    """An 'L' mask (at `side` px) with every object of the scene drawn in white."""
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    for cx, cy in centers:
        if shape == "circle":
            draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=255)
        else:
            draw.polygon(_shape_polygon(shape, cx, cy, radius), fill=255)
    return mask


def _texture_fill(texture: str, color: tuple[int, int, int], side: int, period: int) -> np.ndarray:
    """An RGB array of the object colour carrying the texture, drawn in a darker shade of it."""
    rgb = np.asarray(color, dtype=np.float32)
    dark = rgb * 0.35
    yy, xx = np.mgrid[0:side, 0:side]
    if texture == "plain":
        pattern = np.zeros((side, side), dtype=bool)
    elif texture == "striped":
        pattern = ((xx + yy) // (period // 2)) % 2 == 1
    elif texture == "dotted":
        cx = (xx % period) - period / 2 + 0.5
        cy = (yy % period) - period / 2 + 0.5
        pattern = cx**2 + cy**2 <= (period * 0.28) ** 2
    elif texture == "checkered":
        pattern = ((xx // (period // 2)) + (yy // (period // 2))) % 2 == 1
    else:
        raise ValueError(f"unknown texture {texture!r}")
    return np.where(pattern[..., None], dark, rgb).astype(np.uint8)


@lru_cache(maxsize=1)
def _glyph_font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's bundled default font at glyph size (FreeType when available, else the bitmap font)."""
    try:
        return ImageFont.load_default(size=GLYPH_FONT_SIZE * SUPERSAMPLE)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def _glyph_ink(background: str) -> tuple[int, int, int]:
    """Black ink on light backgrounds, white ink on dark ones."""
    red, green, blue = BACKGROUNDS[background]
    return (0, 0, 0) if 0.299 * red + 0.587 * green + 0.114 * blue > 110 else (255, 255, 255)


def render_scene(scene: Scene) -> Image.Image:
    """Render a scene as an IMAGE_SIZE x IMAGE_SIZE RGB PIL image."""
    side = IMAGE_SIZE * SUPERSAMPLE
    canvas = Image.new("RGB", (side, side), BACKGROUNDS[scene.background])
    centers = tuple((x * SUPERSAMPLE, y * SUPERSAMPLE) for x, y in scene.centers)
    mask = _shape_mask(scene.shape, centers, SIZES[scene.size] * SUPERSAMPLE, side)
    fill = Image.fromarray(_texture_fill(scene.texture, COLORS[scene.color], side, period=6 * SUPERSAMPLE))
    canvas.paste(fill, (0, 0), mask)
    if scene.glyph is not None and scene.glyph_center is not None:
        gx, gy = (c * SUPERSAMPLE for c in scene.glyph_center)
        draw = ImageDraw.Draw(canvas)
        draw.text((gx, gy), scene.glyph, fill=_glyph_ink(scene.background), font=_glyph_font(), anchor="mm")
    return canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------


def _article(word: str) -> str:
    """'an' before a vowel, else 'a'."""
    return "an" if word[0] in "aeiou" else "a"


def _plural(noun: str, count: int) -> str:
    """English plural for our nouns (cross -> crosses)."""
    if count == 1:
        return noun
    return noun + ("es" if noun.endswith(("s", "x")) else "s")


CAPTION_ATTRIBUTES = ("count", "size", "color", "texture", "shape", "position", "glyph", "background")
# How often a multi-attribute caption names each attribute. Backgrounds are seldom described (as on
# the web), so the background task must lean on colour words learned mostly from objects.
MENTION_PROBABILITY = {
    "count": 0.5, "size": 0.4, "color": 0.5, "texture": 0.4, "shape": 0.6, "position": 0.5, "glyph": 0.6,
    "background": 0.35,
}
# Share of captions naming a single (foreground) attribute. Without them the easy attributes
# (colours) separate most of a batch and the loss barely rewards learning shapes, counts or glyphs.
SINGLE_ATTRIBUTE_SHARE = 0.3


def caption_scene(scene: Scene, rng: np.random.Generator) -> str:
    """A caption naming one or a random subset of the scene's attributes, in one of several phrasings."""
    present = [a for a in CAPTION_ATTRIBUTES if scene.attribute(a) is not None]
    if rng.random() < SINGLE_ATTRIBUTE_SHARE:
        named = {_choice(rng, [a for a in present if a != "background"])}
    else:
        named = {a for a in present if rng.random() < MENTION_PROBABILITY[a]}
    return describe_scene(scene, named, rng)


def describe_scene(scene: Scene, named: set[str], rng: np.random.Generator) -> str:
    """A caption naming exactly the attributes in `named` (nouns and prefix drawn from `rng`)."""
    words = [COUNT_WORDS[scene.count - 1]] if "count" in named else []
    words += [getattr(scene, a) for a in ("size", "color", "texture") if a in named]
    noun = scene.shape if "shape" in named else _choice(rng, ("object", "shape", "thing"))
    words.append(_plural(noun, scene.count))
    if "count" not in named:
        words.insert(0, _article(words[0]) if scene.count == 1 else "some")
    phrase = " ".join(words)
    if "position" in named:
        phrase += f" in the {scene.position}"
    if "glyph" in named:
        phrase += f" with the {glyph_phrase(scene.glyph)}"
    if "background" in named:
        phrase += f" on {_article(scene.background)} {scene.background} background"
    prefix = _choice(rng, CAPTION_PREFIXES)
    return f"{prefix} {phrase}.".strip()


# ---------------------------------------------------------------------------------------------
# Building and loading
# ---------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """The cache root: $THESEUS_CACHE if set, else ~/.cache/theseus_transport."""
    env = os.environ.get("THESEUS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "theseus_transport"


def _world_dir(cache_dir: str | os.PathLike | None) -> Path:
    """Folder of the rendered world inside a cache root."""
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def _rng(seed: int, *stream: int) -> np.random.Generator:
    """An independent generator per (seed, stream) so each split is reproducible on its own."""
    return np.random.default_rng([seed, *stream])


def _image_features(classnames: tuple[str, ...]) -> datasets.Features:
    """HF features of a task split: a PIL image and a class label."""
    return datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(classnames))})


def render_task_split(task: TaskSpec, split: str, size: int, seed: int) -> datasets.Dataset:
    """Render one split of a task, with labels spread uniformly over its classes."""
    task_index = list(TASKS).index(task.name)
    rng = _rng(seed, 1, task_index, SPLITS.index(split))
    # draw the label first and condition the scene on it, so classes are balanced
    labels = [int(rng.integers(task.num_classes)) for _ in range(size)]
    images = []
    for label in labels:
        constraints = dict(task.constraints)
        constraints.update(_label_constraint(task, label))
        scene = sample_scene(rng, constraints)
        assert scene.attribute(task.attribute) == task.classnames[label]
        images.append(render_scene(scene))
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=_image_features(task.classnames))


def _label_constraint(task: TaskSpec, label: int) -> dict[str, Any]:
    """Scene constraint that forces the task's attribute to the class of `label`."""
    if task.attribute == "count":
        return {"count": (label + 1,)}
    if task.attribute == "glyph":
        return {"has_glyph": True, "glyph": (GLYPHS[label],)}
    if task.attribute == "position":
        return {"count": (1,), "position": (task.classnames[label],)}
    return {task.attribute: (task.classnames[label],)}


def render_pretraining_pairs(size: int, seed: int) -> datasets.Dataset:
    """Render image-caption pairs (with every attribute as a column, so captions can be redrawn)."""
    rng = _rng(seed, 0)
    rows: dict[str, list] = {k: [] for k in ("image", "caption", *PRETRAIN_ATTRIBUTES)}
    for _ in range(size):
        scene = sample_scene(rng)
        rows["image"].append(render_scene(scene))
        rows["caption"].append(caption_scene(scene, rng))
        for name in PRETRAIN_ATTRIBUTES:
            rows[name].append(_attribute_cell(scene, name))
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "caption": datasets.Value("string"),
            **{name: datasets.Value("int32" if name == "count" else "string") for name in PRETRAIN_ATTRIBUTES},
        }
    )
    return datasets.Dataset.from_dict(rows, features=features)


PRETRAIN_ATTRIBUTES = ("shape", "color", "texture", "size", "count", "position", "glyph", "background")


def _attribute_cell(scene: Scene, name: str) -> Any:
    """Attribute value as stored in the pretraining table ('' for absent position or glyph)."""
    if name == "count":
        return scene.count
    value = getattr(scene, name)
    return "" if value is None else value


def scene_from_row(row: Mapping[str, Any]) -> Scene:
    """Rebuild the captionable part of a scene from a pretraining row (no geometry)."""
    count = int(row["count"])
    # geometry is not stored; a single object's quadrant is encoded by a representative centre
    centers = ((12.0, 12.0),) * count
    if count == 1 and row["position"]:
        vertical, horizontal = row["position"].split()
        centers = ((12.0 if horizontal == "left" else 36.0, 12.0 if vertical == "top" else 36.0),)
    return Scene(
        shape=row["shape"],
        color=row["color"],
        texture=row["texture"],
        size=row["size"],
        count=count,
        background=row["background"],
        glyph=row["glyph"] or None,
        centers=centers,
        glyph_center=None,
    )


def _manifest(seed: int, sizes: WorldSizes) -> dict[str, Any]:
    """What identifies a built world: format, seed, sizes and the task vocabularies."""
    return {
        "format": WORLD_FORMAT,
        "seed": seed,
        "sizes": asdict(sizes),
        "image_size": IMAGE_SIZE,
        "tasks": {name: list(spec.classnames) for name, spec in TASKS.items()},
    }


def _read_manifest(world_dir: Path) -> dict[str, Any] | None:
    """The world's manifest, or None when absent or unreadable."""
    try:
        return json.loads((world_dir / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def world_identity(cache_dir: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """What identifies the cache's world (its manifest without the build time), or None if there is none."""
    found = _read_manifest(_world_dir(cache_dir) / "world")
    return None if found is None else _without_build_time(found)


def _without_build_time(manifest: dict[str, Any]) -> dict[str, Any]:
    """A manifest's identifying part: everything but how long the build took."""
    return {key: value for key, value in manifest.items() if key != "build_seconds"}


def _same_world(found: dict[str, Any] | None, wanted: dict[str, Any]) -> bool:
    """Whether a manifest on disk describes the wanted world (build time aside)."""
    return found is not None and _without_build_time(found) == wanted


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Silence the HF datasets progress bars (dozens of tiny saves), restoring the previous state."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _is_complete(world_dir: Path) -> bool:
    """Whether a world folder holds the pretraining pairs and every task (not only a manifest)."""
    return (world_dir / "pretrain").is_dir() and all((world_dir / "tasks" / name).is_dir() for name in TASKS)


def build_world(
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    sizes: WorldSizes | Mapping[str, int] | None = None,
) -> Path:
    """Render the pretraining pairs and all task splits into `<cache>/world`; no-op if already built."""
    sizes = _as_sizes(sizes)
    world_dir = _world_dir(cache_dir) / "world"
    wanted = _manifest(seed, sizes)
    found = _read_manifest(world_dir)
    if _same_world(found, wanted) and _is_complete(world_dir):
        return world_dir
    if world_dir.exists() and (found is None or found.get("format") != WORLD_FORMAT):
        # only a folder this code wrote (its manifest says so) is ever replaced: a cache root may be
        # any folder the user names, and a `world` in it that is not ours is theirs
        raise OutputExistsError(
            f"{world_dir} exists but is not a theseus world (no {WORLD_FORMAT} manifest); move it away or "
            "choose another cache folder (THESEUS_CACHE, --cache-dir)"
        )
    # each build renders into its own folder, so two processes building at once cannot mix their files
    world_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=world_dir.parent, prefix="world.tmp-"))
    try:
        started = time.perf_counter()
        with _quiet_datasets():
            render_pretraining_pairs(sizes.pretrain, seed).save_to_disk(str(staging / "pretrain"))
            for task in TASKS.values():
                splits = {split: render_task_split(task, split, sizes.split_size(split), seed) for split in SPLITS}
                datasets.DatasetDict(splits).save_to_disk(str(staging / "tasks" / task.name))
        wanted_with_time = {**wanted, "build_seconds": round(time.perf_counter() - started, 2)}
        (staging / "manifest.json").write_text(json.dumps(wanted_with_time, indent=2))
        found = _read_manifest(world_dir)
        if _same_world(found, wanted) and _is_complete(world_dir):
            return world_dir  # another process finished the same world meanwhile
        if world_dir.exists():
            log.info("rebuilding the world at %s (seed or sizes changed, or it was incomplete)", world_dir)
            shutil.rmtree(world_dir)
        # a rename makes a half-written world impossible to mistake for a finished one
        try:
            os.rename(staging, world_dir)
        except OSError:
            if not (_same_world(_read_manifest(world_dir), wanted) and _is_complete(world_dir)):
                raise
            # another process renamed the same world into place first
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return world_dir


_WARNED_WORLDS: set[Path] = set()


def _ensure_world(cache_dir: str | os.PathLike | None) -> Path:
    """The world folder, building it with default settings when it is missing."""
    world_dir = _world_dir(cache_dir) / "world"
    found, wanted = _read_manifest(world_dir), _manifest(0, WorldSizes())
    if found is None:
        log.info("no world at %s; building it with default seed and sizes", world_dir)
        build_world(cache_dir)
    elif not _is_complete(world_dir):
        # a manifest without its data (an interrupted or raced build of an older version): build it again
        log.warning("the world at %s is incomplete; rebuilding it with its own seed and sizes", world_dir)
        build_world(cache_dir, seed=found.get("seed", 0), sizes=found.get("sizes"))
    elif not _same_world(found, wanted) and world_dir not in _WARNED_WORLDS:
        # a world built with other settings (on purpose, or by an older version) is used as it is, since
        # rebuilding would replace what the user made; but results from it are not the defaults' results
        _WARNED_WORLDS.add(world_dir)
        differing = sorted(key for key in wanted if found.get(key) != wanted[key])
        log.warning("the world at %s differs from the default world in %s (found %s); using it as it is. "
                    "build_world(%r) rebuilds it with the defaults", world_dir, ", ".join(differing),
                    {key: found.get(key) for key in differing if key != "tasks"}, str(cache_dir or ""))
    return world_dir


def load_task(name: str, cache_dir: str | os.PathLike | None = None) -> datasets.DatasetDict:
    """Load a task's splits (train, val, test, calibration), building the world if missing."""
    if name not in TASKS:
        raise UnknownNameError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    return datasets.load_from_disk(str(_ensure_world(cache_dir) / "tasks" / name))


def load_pretraining_pairs(cache_dir: str | os.PathLike | None = None) -> datasets.Dataset:
    """Load the image-caption pretraining pairs, building the world if missing."""
    return datasets.load_from_disk(str(_ensure_world(cache_dir) / "pretrain"))
