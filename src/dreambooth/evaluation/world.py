"""A small procedural image world where the truth is known: coloured shapes on plain backgrounds.

Every image is a circle, square or triangle of one of four colours on one of four background colours, at a
random place and size, with a caption that says so ("a photo of a red circle on a gray background"). The
built-in model (`dreambooth.evaluation.world_model`) is pretrained on this world alone. The DreamBooth subject is a
circle with a red-yellow-red band pattern, which no pretraining image has: a model that draws it for
"a photo of sks circle" has learned it from the instance photos and nothing else.

The measures read an image back from its pixels (background, object mask, shape, colour, pattern), so the
paper's two claims can be checked with known truth: the subject is learned (subject fidelity) and the class
prior is kept (class prior, the drift the paper calls language drift).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 90, 220), "yellow": (240, 210, 40)}
BACKGROUNDS = {"white": (235, 235, 235), "black": (20, 20, 20), "gray": (128, 128, 128), "purple": (120, 60, 150)}
JITTER = 12  # each image's colours move up to this much per channel, so no colour is a single exact value

IDENTIFIER = "sks"
CLASS_WORD = "circle"
SUBJECT_BANDS = ("red", "yellow", "red")  # top to bottom: the pattern no pretraining image has
INSTANCE_PROMPT = f"a photo of {IDENTIFIER} {CLASS_WORD}"
CLASS_PROMPT = f"a photo of a {CLASS_WORD}"

# Reading images back. An object pixel differs from the background by more than MASK_DISTANCE (RGB
# Euclidean); fewer than MIN_OBJECT_PIXELS such pixels means no object. Shapes by how much of their bounding
# box they fill: square 1.0, circle pi/4 = 0.79, triangle 0.5.
MASK_DISTANCE = 70.0
MIN_OBJECT_PIXELS = 12
FILL_TRIANGLE_BELOW, FILL_SQUARE_ABOVE = 0.64, 0.9
PATTERN_MIN_SHARE = 0.2  # the subject: at least this share of object pixels red, and as much yellow


@dataclass(frozen=True)
class Scene:
    """What one image shows; `pattern` is True for the subject's band pattern (then `colour` is None)."""

    shape: str
    colour: str | None
    background: str
    x: float
    y: float
    radius: float
    pattern: bool = False

    def caption(self, parts: str = "full") -> str:
        """The caption with `parts` of 'full', 'colour', 'background' or 'shape' (pretraining drops parts)."""
        what = f"{self.colour} {self.shape}" if parts in ("full", "colour") else self.shape
        on = f" on a {self.background} background" if parts in ("full", "background") else ""
        return f"a photo of a {what}{on}"


def random_scene(rng: random.Random, *, shape: str | None = None, colour: str | None = None,
                 background: str | None = None, pattern: bool = False) -> Scene:
    """A scene with the given attributes and the rest drawn from `rng`; the object never touches the border."""
    radius = rng.uniform(6.0, 10.0)
    x, y = (rng.uniform(radius + 2, SIZE - radius - 2) for _ in range(2))
    return Scene(shape=shape or rng.choice(SHAPES),
                 colour=None if pattern else colour or rng.choice(list(COLOURS)),
                 background=background or rng.choice(list(BACKGROUNDS)), x=x, y=y, radius=radius, pattern=pattern)


def subject_scene(rng: random.Random, background: str | None = None) -> Scene:
    """The DreamBooth subject (a banded circle) at a random place and size."""
    return random_scene(rng, shape=CLASS_WORD, background=background, pattern=True)


def draw(scene: Scene, seed: int = 0, supersample: int = 4) -> Image.Image:
    """Renders a scene at SIZE px, antialiased, with colours jittered by a generator seeded with `seed`."""
    rng = random.Random(seed)

    def jitter(rgb):
        return tuple(int(np.clip(c + rng.randint(-JITTER, JITTER), 0, 255)) for c in rgb)

    big = SIZE * supersample
    image = Image.new("RGB", (big, big), jitter(BACKGROUNDS[scene.background]))
    mask = Image.new("L", (big, big), 0)
    x, y, r = (v * supersample for v in (scene.x, scene.y, scene.radius))
    pen = ImageDraw.Draw(mask)
    if scene.shape == "circle":
        pen.ellipse([x - r, y - r, x + r, y + r], fill=255)
    elif scene.shape == "square":
        pen.rectangle([x - r, y - r, x + r, y + r], fill=255)
    elif scene.shape == "triangle":
        pen.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=255)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}; expected one of {SHAPES}")
    if scene.pattern:
        fill = Image.new("RGB", (big, big))
        band = 2 * r / len(SUBJECT_BANDS)
        colours = [jitter(COLOURS[name]) for name in SUBJECT_BANDS]
        fill_pen = ImageDraw.Draw(fill)
        for i, rgb in enumerate(colours):
            top = y - r + i * band
            fill_pen.rectangle([0, top, big, top + band + 1], fill=rgb)
    else:
        fill = Image.new("RGB", (big, big), jitter(COLOURS[scene.colour]))
    image.paste(fill, (0, 0), mask)
    return image.resize((SIZE, SIZE), Image.Resampling.BOX)


def pretraining_set(n: int, seed: int) -> list[tuple[Scene, int]]:
    """`n` plain scenes (never the subject's pattern) with their drawing seeds, balanced over the 48 kinds."""
    rng = random.Random(seed)
    kinds = list(itertools.product(SHAPES, COLOURS, BACKGROUNDS))
    scenes = []
    for i in range(n):
        shape, colour, background = kinds[i % len(kinds)]
        scenes.append((random_scene(rng, shape=shape, colour=colour, background=background), rng.randrange(2**31)))
    rng.shuffle(scenes)
    return scenes


def instance_scenes(n: int = 5, seed: int = 1234) -> list[Scene]:
    """The subject's 'photos': `n` banded circles, each at its own place and size, backgrounds in turn."""
    rng = random.Random(seed)
    backgrounds = list(BACKGROUNDS)
    return [subject_scene(rng, background=backgrounds[i % len(backgrounds)]) for i in range(n)]


# ---- Reading an image back ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reading:
    """What the measures see in one image; `shape` and `colour` are None when no object is found."""

    background: str
    shape: str | None
    colour: str | None
    red_share: float
    yellow_share: float
    x: float | None
    y: float | None
    pixels: int

    @property
    def is_subject(self) -> bool:
        """A circle whose pixels are both red and yellow in good measure: the subject's shape and pattern."""
        return (self.shape == CLASS_WORD and self.red_share >= PATTERN_MIN_SHARE
                and self.yellow_share >= PATTERN_MIN_SHARE)


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> np.ndarray:
    """Index into `palette` of the nearest colour for each RGB row of `rgb`."""
    colours = np.array(list(palette.values()), dtype=np.float32)
    return np.argmin(((rgb[:, None, :] - colours[None]) ** 2).sum(-1), axis=1)


def read_image(image: Image.Image) -> Reading:
    """Reads background, object shape, colour and pattern from pixels alone."""
    pixels = np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BOX), dtype=np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    background_rgb = np.median(border, axis=0)
    background = list(BACKGROUNDS)[_nearest(background_rgb[None], BACKGROUNDS)[0]]
    mask = np.linalg.norm(pixels - background_rgb, axis=-1) > MASK_DISTANCE
    count = int(mask.sum())
    if count < MIN_OBJECT_PIXELS:
        return Reading(background, None, None, 0.0, 0.0, None, None, count)
    ys, xs = np.nonzero(mask)
    box = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
    fill = count / box
    shape = "triangle" if fill < FILL_TRIANGLE_BELOW else "square" if fill > FILL_SQUARE_ABOVE else "circle"
    nearest = _nearest(pixels[mask], COLOURS)
    shares = np.bincount(nearest, minlength=len(COLOURS)) / count
    names = list(COLOURS)
    return Reading(background, shape, names[int(shares.argmax())], float(shares[names.index("red")]),
                   float(shares[names.index("yellow")]), float(xs.mean()), float(ys.mean()), count)


# ---- Measures over a set of generated images ----------------------------------------------------------------


def subject_prompts(identifier: str = IDENTIFIER) -> list[tuple[str, str | None]]:
    """Prompts that ask for the subject, with the background each asks for (None: any)."""
    instance = f"a photo of {identifier} {CLASS_WORD}"
    return [(instance, None)] + [(f"{instance} on a {bg} background", bg) for bg in BACKGROUNDS]


def class_prompts() -> list[tuple[str, str]]:
    """Prompts that ask for the plain class in a given colour, with that colour."""
    return [(f"a photo of a {colour} {CLASS_WORD}", colour) for colour in COLOURS]


def measure(subject_images: dict[str, list[Image.Image]], class_images: dict[str, list[Image.Image]]) -> dict:
    """The world's measures, each a fraction in [0, 1] (diversity: mean distance between object centres / side).

    - subject_fidelity: share of images from subject prompts that show the subject (circle + band pattern).
    - prompt_fidelity: share of images from subject prompts naming a background that show that background.
    - class_prior: share of images from "a photo of a <colour> circle" that are not the subject and are of
      that colour; falls when the class word drifts towards the subject (the paper's language drift).
    - class_shape: share of those that are circles at all.
    - diversity: mean pairwise distance between object centres in the subject images, over the image side.
    """
    asked_bg = {p: _asked_background(p) for p in subject_images}
    asked_colour = {p: _asked_colour(p) for p in class_images}
    subject_readings = {p: [read_image(im) for im in ims] for p, ims in subject_images.items()}
    class_readings = {p: [read_image(im) for im in ims] for p, ims in class_images.items()}
    all_subject = [r for rs in subject_readings.values() for r in rs]
    with_bg = [(r, asked_bg[p]) for p, rs in subject_readings.items() if asked_bg.get(p) for r in rs]
    classes = [(r, asked_colour[p]) for p, rs in class_readings.items() for r in rs]
    return {
        "subject_fidelity": _share(r.is_subject for r in all_subject),
        "prompt_fidelity": _share(r.background == bg for r, bg in with_bg),
        "class_prior": _share(not r.is_subject and r.colour == colour for r, colour in classes),
        "class_shape": _share(r.shape == CLASS_WORD for r, _ in classes),
        "diversity": _spread([(r.x, r.y) for r in all_subject if r.x is not None]),
        "images": len(all_subject) + len(classes),
    }


def _words(prompt: str) -> list[str]:
    return prompt.lower().replace(",", " ").split()


def _asked_background(prompt: str) -> str | None:
    """The background a prompt names ("... on a gray background"), or None."""
    words = _words(prompt)
    return next((b for b in BACKGROUNDS if b in words), None) if "background" in words else None


def _asked_colour(prompt: str) -> str | None:
    """The object colour a prompt names ("a photo of a green circle"), or None."""
    words = _words(prompt)
    return next((c for c in COLOURS if c in words), None)


def _share(flags) -> float:
    flags = list(flags)
    return sum(flags) / len(flags) if flags else 0.0


def _spread(centres: list[tuple[float, float]]) -> float:
    """Mean pairwise Euclidean distance between points, divided by the image side."""
    if len(centres) < 2:
        return 0.0
    pts = np.array(centres)
    dist = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
    n = len(pts)
    return float(dist.sum() / (n * (n - 1)) / SIZE)


def score_columns(images: list[Image.Image], prompts: list[str]) -> dict[str, list[float | None]]:
    """Per-image world measures for `dreambooth evaluate` (None where a prompt does not ask for that thing).

    - world_subject: 1 if the image shows the subject (banded circle);
    - world_background: for prompts naming a background, 1 if the image shows it;
    - world_colour: for prompts naming an object colour, 1 if the object has it and is not the subject.
    """
    columns: dict[str, list[float | None]] = {"world_subject": [], "world_background": [], "world_colour": []}
    for image, prompt in zip(images, prompts):
        r = read_image(image)
        background, colour = _asked_background(prompt), _asked_colour(prompt)
        columns["world_subject"].append(float(r.is_subject))
        columns["world_background"].append(None if background is None else float(r.background == background))
        columns["world_colour"].append(None if colour is None else float(r.colour == colour and not r.is_subject))
    return columns


def describe() -> dict:
    """The world's definition, written beside the built-in model as world.json."""
    return {"size": SIZE, "shapes": list(SHAPES), "colours": COLOURS, "backgrounds": BACKGROUNDS,
            "identifier": IDENTIFIER, "class_word": CLASS_WORD, "subject_bands": list(SUBJECT_BANDS),
            "instance_prompt": INSTANCE_PROMPT, "class_prompt": CLASS_PROMPT,
            "example_scene": asdict(instance_scenes(1)[0])}
