"""Synthetic visual-question-answering scenes over real photographs.

Each sample is a few flat-coloured, dark-outlined shapes composited (on the cells of a 14 x 14
board, without overlap, fully inside the frame) over a toned-down crop of a real photo, plus one question with a one-word
answer that is exact by construction. It is the training and evaluation data for the small
LLaVA model shipped with ep_jax, so it must be:

- deterministic per sample: sample ``i`` of ``(split, seed)`` is drawn from
  ``np.random.default_rng([SPLIT_IDS[split], seed, i])`` alone, so any index can be rebuilt
  without generating the ones before it, and the splits never share a random stream;
- split by photo: every background photo belongs to exactly one split (``PHOTOS``), so
  val/test measure generalisation to unseen backgrounds, not memorised pixels;
- balanced: the question type cycles with the index (``QUESTION_TYPES[i % 5]``), the yes/no
  answer alternates, and every other answer is drawn uniformly *before* the scene is built
  around it, so no answer prior beats chance;
- unambiguous: backgrounds are blurred, desaturated and squeezed into mid-grey luminance, so
  no background pixel is as saturated as any object colour, and objects carry a dark outline.

Photos are those that ship inside the scikit-image and scikit-learn wheels (no download).

    python -m ep_jax.data.scenes --out /tmp/scenes --n 8 --split test
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from ep_jax.data.render import (CIRCUMRADIUS, SceneObject, background_crop, object_coverage,  # noqa: F401
                               outline_points, paint)

# Vocabulary

SHAPES = ("circle", "square", "triangle", "star")
COLORS = {  # well separated in RGB and hue; all far more saturated than any toned background
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 80, 235),
    "yellow": (245, 215, 30),
    "purple": (150, 50, 205),
    "orange": (255, 135, 0),
}
SIZES = ("small", "large")
QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")
MAX_OBJECTS = 6
COUNT_ANSWERS = tuple(str(k) for k in range(MAX_OBJECTS + 1))  # digits, "0".."6"

QUESTION_TYPES = ("color", "shape", "count", "exist", "position")
ANSWERS = (*COLORS, *SHAPES, *COUNT_ANSWERS, "yes", "no", *QUADRANTS)

SPLIT_IDS = {"train": 0, "val": 1, "test": 2}

# Background photos per split, disjoint. Synthetic images (checkerboard, logo, colorwheel),
# near-empty ones (cell, clock), the screenshot `page`, and files that need a pooch download
# (brain, eagle, lily, ...) are excluded. `cat` is the same file as `chelsea`; only the left
# view of `stereo_motorcycle` is used.
PHOTOS = {
    "train": (
        "astronaut", "coffee", "rocket", "camera", "coins", "hubble_deep_field",
        "immunohistochemistry", "retina", "grass", "brick", "text",
    ),
    "val": ("china", "motorcycle", "gravel"),
    "test": ("chelsea", "flower", "moon"),
}

_TEMPLATES = {
    "color": "What color is the {shape}?",
    "shape": "What shape is the {color} object?",
    "count_shape": "How many {shape}s are there?",
    "count_all": "How many objects are there?",
    "exist": "Is there {article} {color} {shape}?",
    "position": "In which quadrant is the {color} {shape}?",
}

# Geometry. Objects sit on a BOARD x BOARD grid of cells (at 224 px: 16-px cells, the patch
# grid of a ViT with 16-px patches): a small object inside one cell, a large one inside a 2x2
# block. Each ViT patch then sees a whole small object, or the same quarter of a large one, at
# a fixed offset, so shape is a per-patch feature a small model learns quickly. Sizes are
# circumradii in cells (shrunk by up to _SIZE_JITTER); rotation keeps every shape in its cells.
BOARD = 14
_CELL_RADIUS = {"small": 0.46, "large": 0.92}
_SIZE_JITTER = 0.08
_MAX_ROTATION_DEG = 10.0
_COLOR_JITTER = 10  # per-channel, keeps the nearest palette colour unambiguous
_CENTRE_LINE_MARGIN = 0.02  # a position target keeps this far off both centre lines
# Shapes, painting and backgrounds: render.py.


@dataclasses.dataclass(frozen=True, eq=False)
class Sample:
    image: np.ndarray  # uint8 [H, W, 3]
    question: str
    answer: str
    qtype: str
    objects: tuple[SceneObject, ...]
    background: str  # photo name, see PHOTOS
    split: str
    seed: int
    index: int

    def to_json(self) -> dict:
        """Everything but the pixels, JSON-serialisable."""
        record = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "image"}
        record["objects"] = [dataclasses.asdict(o) for o in self.objects]
        record["image_size"] = int(self.image.shape[0])
        return record


# Public API


def make_sample(split: str, index: int, seed: int = 0, image_size: int = 224) -> Sample:
    """Sample `index` of the `(split, seed)` stream; independent of every other index."""
    _check_args(split, seed, image_size)
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    rng = np.random.default_rng([SPLIT_IDS[split], seed, index])
    qtype = QUESTION_TYPES[index % len(QUESTION_TYPES)]
    # The yes/no answer alternates over successive exist questions: exactly balanced.
    exist_yes = (index // len(QUESTION_TYPES)) % 2 == 0
    question, answer, specs, quadrant = _QUESTION_BUILDERS[qtype](rng, exist_yes)
    objects = _place_objects(rng, specs, quadrant, image_size)
    background = PHOTOS[split][rng.integers(len(PHOTOS[split]))]
    image = background_crop(rng, background, image_size)
    for obj in objects:
        paint(image, obj, image_size)
    return Sample(
        image=np.clip(np.rint(image), 0, 255).astype(np.uint8),
        question=question,
        answer=answer,
        qtype=qtype,
        objects=objects,
        background=background,
        split=split,
        seed=seed,
        index=index,
    )


def generate(split: str, n: int, seed: int = 0, image_size: int = 224) -> list[Sample]:
    """Samples 0..n-1 of the `(split, seed)` stream."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return list(iterate(split, seed, image_size, stop=n))


def iterate(
    split: str, seed: int = 0, image_size: int = 224, start: int = 0, stop: int | None = None
) -> Iterator[Sample]:
    """Samples start, start+1, ... (endless when `stop` is None) of the `(split, seed)` stream."""
    _check_args(split, seed, image_size)
    indices = itertools.count(start) if stop is None else range(start, stop)
    for index in indices:
        yield make_sample(split, index, seed, image_size)


def tokenizer_corpus() -> list[str]:
    """Every question the generator can ask and every answer, one per line, fixed order."""
    lines = [_TEMPLATES["count_all"]]
    for shape in SHAPES:
        lines += [_TEMPLATES["color"].format(shape=shape), _TEMPLATES["count_shape"].format(shape=shape)]
    for color in COLORS:
        lines.append(_TEMPLATES["shape"].format(color=color))
        for shape in SHAPES:
            lines.append(_exist_question(color, shape))
            lines.append(_TEMPLATES["position"].format(color=color, shape=shape))
    return lines + list(ANSWERS)


def scene_questions(objects, image_size: int) -> list[tuple[str, str, str]]:
    """Every question with an unambiguous answer about this scene, as (question, answer, qtype):
    the colour of each shape present once, the shape of each colour present once, all counts,
    every colour-shape pair's existence, and the quadrant of each pair present once whose centre
    keeps the centre-line margin. Used to ask several questions about one training image."""
    out = []
    shapes, colors = Counter(o.shape for o in objects), Counter(o.color for o in objects)
    pairs = Counter((o.color, o.shape) for o in objects)
    half, line = image_size / 2, _CENTRE_LINE_MARGIN * image_size
    for o in objects:
        if shapes[o.shape] == 1:
            out.append((_TEMPLATES["color"].format(shape=o.shape), o.color, "color"))
        if colors[o.color] == 1:
            out.append((_TEMPLATES["shape"].format(color=o.color), o.shape, "shape"))
        x, y = o.center
        if pairs[(o.color, o.shape)] == 1 and abs(x - half) >= line and abs(y - half) >= line:
            question = _TEMPLATES["position"].format(color=o.color, shape=o.shape)
            out.append((question, quadrant_of(x, y, image_size), "position"))
    out.append((_TEMPLATES["count_all"], str(len(objects)), "count"))
    for shape in SHAPES:
        out.append((_TEMPLATES["count_shape"].format(shape=shape), str(shapes[shape]), "count"))
    for color in COLORS:
        for shape in SHAPES:
            out.append((_exist_question(color, shape), "yes" if pairs[(color, shape)] else "no", "exist"))
    return out


def key_words(question: str) -> list[str]:
    """The words of `question` that say what it is about, as written: colours, shapes (or their
    plurals) and "objects"."""
    return [w for w in question.rstrip("?").split()
            if w in COLORS or w.removesuffix("s") in SHAPES or w == "objects"]


def referents(question: str, objects) -> tuple[list[int], bool]:
    """(indices of the objects `question` is about, whether it counts them), read from its
    `key_words`: a count is about every object of the named shape (all objects when none
    is named); any other question about the objects matching its named colour and/or shape
    (none for an existence question answered "no"). The evidence a model must look at."""
    words = key_words(question)
    color = next((w for w in words if w in COLORS), None)
    shape = next((w.removesuffix("s") for w in words if w.removesuffix("s") in SHAPES), None)
    counting = question.startswith("How many")
    if not counting and color is None and shape is None:
        raise ValueError(f"not a scene question: {question!r}")
    hits = [k for k, o in enumerate(objects)
            if (color is None or o.color == color) and (shape is None or o.shape == shape)]
    return hits, counting


def quadrant_of(x: float, y: float, image_size: int) -> str:
    half = image_size / 2
    return QUADRANTS[2 * int(y >= half) + int(x >= half)]


def _check_args(split: str, seed: int, image_size: int) -> None:
    if split not in SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(SPLIT_IDS)}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0 (it seeds numpy's SeedSequence), got {seed}")
    if image_size < 12 * BOARD or image_size % BOARD:
        raise ValueError(
            f"image_size {image_size} must be a multiple of {BOARD} (the object grid) and >= {12 * BOARD} "
            "(cells of at least 12 px keep a small outlined object readable)"
        )


# Questions: the answer is drawn first, then the object list is built to make it true.
# A spec is (shape, color, size); builders return (question, answer, specs, target quadrant).
# Specs with a quadrant put the target first; the others may go anywhere.

Spec = tuple[str, str, str]


def _choice(rng: np.random.Generator, options) -> str:
    return options[rng.integers(len(options))]


def _random_spec(rng: np.random.Generator, allowed: Callable[[str, str], bool] = lambda c, s: True) -> Spec:
    while True:
        shape, color = _choice(rng, SHAPES), _choice(rng, tuple(COLORS))
        if allowed(color, shape):
            return shape, color, _choice(rng, SIZES)


def _n_objects(rng: np.random.Generator, low: int = 1) -> int:
    return int(rng.integers(low, MAX_OBJECTS + 1))


def _exist_question(color: str, shape: str) -> str:
    article = "an" if color[0] in "aeiou" else "a"
    return _TEMPLATES["exist"].format(article=article, color=color, shape=shape)


def _color_question(rng, _):
    shape, color = _choice(rng, SHAPES), _choice(rng, tuple(COLORS))
    target = (shape, color, _choice(rng, SIZES))
    others = [_random_spec(rng, lambda c, s: s != shape) for _ in range(_n_objects(rng) - 1)]
    return _TEMPLATES["color"].format(shape=shape), color, [target, *others], None


def _shape_question(rng, _):
    shape, color = _choice(rng, SHAPES), _choice(rng, tuple(COLORS))
    target = (shape, color, _choice(rng, SIZES))
    others = [_random_spec(rng, lambda c, s: c != color) for _ in range(_n_objects(rng) - 1)]
    return _TEMPLATES["shape"].format(color=color), shape, [target, *others], None


def _count_question(rng, _):
    if rng.random() < 0.5:
        n = _n_objects(rng)
        return _TEMPLATES["count_all"], str(n), [_random_spec(rng) for _ in range(n)], None
    shape = _choice(rng, SHAPES)
    k = int(rng.integers(0, MAX_OBJECTS + 1))
    specs = [_random_spec(rng, lambda c, s: s == shape) for _ in range(k)]
    specs += [_random_spec(rng, lambda c, s: s != shape) for _ in range(_n_objects(rng, max(k, 1)) - k)]
    return _TEMPLATES["count_shape"].format(shape=shape), str(k), specs, None


def _exist_question_specs(rng, exist_yes):
    shape, color = _choice(rng, SHAPES), _choice(rng, tuple(COLORS))
    n = _n_objects(rng)
    not_pair = lambda c, s: (c, s) != (color, shape)  # noqa: E731
    if exist_yes:
        specs = [(shape, color, _choice(rng, SIZES))]
    elif n >= 2 and rng.random() < 0.5:
        # Distractors that share the colour or the shape, so "no" needs binding, not presence.
        specs = [
            _random_spec(rng, lambda c, s: c == color and s != shape),
            _random_spec(rng, lambda c, s: s == shape and c != color),
        ]
    else:
        specs = []
    specs += [_random_spec(rng, not_pair if not exist_yes else (lambda c, s: True)) for _ in range(n - len(specs))]
    return _exist_question(color, shape), "yes" if exist_yes else "no", specs, None


def _position_question(rng, _):
    shape, color, quadrant = _choice(rng, SHAPES), _choice(rng, tuple(COLORS)), _choice(rng, QUADRANTS)
    target = (shape, color, _choice(rng, SIZES))
    others = [_random_spec(rng, lambda c, s: (c, s) != (color, shape)) for _ in range(_n_objects(rng) - 1)]
    question = _TEMPLATES["position"].format(color=color, shape=shape)
    return question, quadrant, [target, *others], quadrant


_QUESTION_BUILDERS = {
    "color": _color_question,
    "shape": _shape_question,
    "count": _count_question,
    "exist": _exist_question_specs,
    "position": _position_question,
}


# Geometry and placement


def _extent(shape: str, scale: float, rotation_deg: float) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of the shape around the origin."""
    if shape == "circle":
        return -scale, -scale, scale, scale
    points = outline_points(shape, scale, rotation_deg)
    return (*points.min(axis=0), *points.max(axis=0))


def _place_objects(
    rng: np.random.Generator, specs: list[Spec], quadrant: str | None, image_size: int
) -> tuple[SceneObject, ...]:
    """Put each object in free board cells (1x1 small, 2x2 large), uniformly among the free
    spots; the first spec goes wholly inside `quadrant` if set. Never overlaps, never fails
    (six 2x2 blocks use 24 of the 196 cells)."""
    cell = image_size / BOARD
    free = np.ones((BOARD, BOARD), bool)
    looks = []  # drawn once per object, before positions
    for shape, color, size in specs:
        radius = _CELL_RADIUS[size] * cell * (1 - rng.uniform(0, _SIZE_JITTER))
        rotation = 0.0 if shape == "circle" else float(rng.uniform(-_MAX_ROTATION_DEG, _MAX_ROTATION_DEG))
        jitter = rng.integers(-_COLOR_JITTER, _COLOR_JITTER + 1, size=3)
        rgb = tuple(int(v) for v in np.clip(np.array(COLORS[color]) + jitter, 0, 255))
        looks.append((radius, rotation, rgb))
    placed: dict[int, SceneObject] = {}
    for i, (shape, color, size) in enumerate(specs):  # the quadrant target is specs[0]
        radius, rotation, rgb = looks[i]
        span = 2 if size == "large" else 1
        rows = cols = range(BOARD - span + 1)
        if quadrant is not None and i == 0:
            half = BOARD // 2
            rows = range(half, BOARD - span + 1) if quadrant.startswith("bottom") else range(0, half - span + 1)
            cols = range(half, BOARD - span + 1) if quadrant.endswith("right") else range(0, half - span + 1)
        spots = [(r, c) for r in rows for c in cols if free[r : r + span, c : c + span].all()]
        r, c = spots[rng.integers(len(spots))]
        free[r : r + span, c : c + span] = False
        x, y = (c + span / 2) * cell, (r + span / 2) * cell
        scale = radius / CIRCUMRADIUS[shape]
        dx0, dy0, dx1, dy1 = _extent(shape, scale, rotation)
        placed[i] = SceneObject(
            shape=shape, color=color, size=size, center=(float(x), float(y)), radius=float(radius),
            bbox=(float(x + dx0), float(y + dy0), float(x + dx1), float(y + dy1)), rgb=rgb, rotation_deg=rotation,
        )
    # List order carries no information: the target is not always first.
    return tuple(placed[i] for i in rng.permutation(len(specs)))


# CLI


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write example scenes as PNGs plus questions.jsonl.")
    parser.add_argument("--out", type=Path, required=True, help="output directory (created)")
    parser.add_argument("--n", type=int, default=8, help="number of samples")
    parser.add_argument("--split", default="test", choices=sorted(SPLIT_IDS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "questions.jsonl", "w") as jsonl:
        for sample in iterate(args.split, args.seed, args.image_size, stop=args.n):
            file_name = f"{args.split}_{args.seed}_{sample.index:05d}.png"
            Image.fromarray(sample.image).save(args.out / file_name)
            jsonl.write(json.dumps({"file": file_name, **sample.to_json()}) + "\n")
    print(f"wrote {args.n} samples to {args.out}")


if __name__ == "__main__":
    main()
