"""Pixels of the synthetic scenes (`scenes.py`): shape outlines, the toned-down photo
backgrounds and antialiased, outlined painting of each object, plus the per-patch coverage of
an object's silhouette. Deterministic given the random generator `scenes.py` passes in.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CIRCUMRADIUS = {"circle": 1.0, "square": 0.88 * math.sqrt(2.0), "triangle": 1.4, "star": 1.4}
_STAR_INNER = 0.5  # inner/outer radius of the star's concave vertices
_OUTLINE = 0.009  # outline width
_OUTLINE_RGB = np.array((25, 25, 25), np.float32)
_SUPERSAMPLE = 4  # antialiasing of the shape masks

# Background toning: keep photo structure, remove what could be mistaken for an object.
_SATURATION = 0.3
_LUMA_RANGE = (70.0, 195.0)
_BLUR_OUTPUT_PX = 0.8  # Gaussian radius at output scale for a mid-sized crop
_CROP_FRACTION = (0.45, 1.0)  # crop side / photo's short side
_PHOTO_SHORT_SIDE = 2.2  # cached photos keep at most this many output sides of resolution



@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One painted object. Coordinates are pixels, origin top-left, x to the right.

    Every painted pixel lies inside `bbox` and inside the circle of `radius` around `center`.
    """

    shape: str
    color: str
    size: str
    center: tuple[float, float]  # (x, y)
    radius: float  # circumradius
    bbox: tuple[float, float, float, float]  # (x0, y0, x1, y1)
    rgb: tuple[int, int, int]  # fill colour actually painted (palette colour + jitter)
    rotation_deg: float


# Geometry


def outline_points(shape: str, scale: float, rotation_deg: float) -> np.ndarray:
    """Polygon vertices [V, 2] (x, y) around the origin, pointing up; circles return []."""
    radius = CIRCUMRADIUS[shape] * scale
    rot = math.radians(rotation_deg)
    if shape == "circle":
        return np.zeros((0, 2))
    if shape == "square":
        angles = np.pi / 4 + np.arange(4) * np.pi / 2
        radii = np.full(4, radius)
    elif shape == "triangle":
        angles = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        radii = np.full(3, radius)
    elif shape == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, radius, radius * _STAR_INNER)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {tuple(CIRCUMRADIUS)}")
    return np.stack([radii * np.cos(angles + rot), radii * np.sin(angles + rot)], axis=1)


# Pixels


def load_photo(name: str) -> np.ndarray:
    """uint8 [H, W, 3] from the files inside the scikit-image / scikit-learn wheels."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{name}.jpg")
    import skimage.data

    if name == "motorcycle":
        photo = skimage.data.stereo_motorcycle()[0]
    else:
        photo = getattr(skimage.data, name)()
    photo = np.asarray(photo)
    if photo.ndim == 2:
        photo = np.repeat(photo[..., None], 3, axis=2)
    return np.ascontiguousarray(photo[..., :3].astype(np.uint8))


@functools.lru_cache(maxsize=None)
def _toned_photo(name: str, image_size: int) -> Image.Image:
    """The photo downscaled (never up), blurred, desaturated and dimmed; cached per size."""
    photo = Image.fromarray(load_photo(name))
    short = min(photo.size)
    target_short = min(short, round(_PHOTO_SHORT_SIDE * image_size))
    if target_short < short:
        factor = target_short / short
        photo = photo.resize((round(photo.size[0] * factor), round(photo.size[1] * factor)), Image.BILINEAR, reducing_gap=2.0)
    # A mid-sized crop maps `photo_short * 0.7` pixels onto `image_size`.
    blur = _BLUR_OUTPUT_PX * min(photo.size) * 0.7 / image_size
    pixels = np.asarray(photo.filter(ImageFilter.GaussianBlur(blur)), np.float32)
    luma = pixels @ np.array([0.299, 0.587, 0.114], np.float32)
    pixels = luma[..., None] + _SATURATION * (pixels - luma[..., None])
    lo, hi = _LUMA_RANGE
    pixels = lo + (hi - lo) / 255.0 * pixels
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def background_crop(rng: np.random.Generator, name: str, image_size: int) -> np.ndarray:
    """float32 [S, S, 3]: a random square crop, randomly mirrored, resized to the output."""
    photo = _toned_photo(name, image_size)
    width, height = photo.size
    side = rng.uniform(*_CROP_FRACTION) * min(width, height)
    x0, y0 = rng.uniform(0, width - side), rng.uniform(0, height - side)
    crop = photo.resize((image_size, image_size), Image.BILINEAR, box=(x0, y0, x0 + side, y0 + side))
    if rng.random() < 0.5:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(crop, np.float32).copy()


def _draw_shape(draw: ImageDraw.ImageDraw, obj: SceneObject, cx: float, cy: float, ss: float) -> list:
    """Fill `obj`'s silhouette centred at (cx, cy), `ss` mask pixels per image pixel; returns
    the polygon's points ([] for a circle)."""
    if obj.shape == "circle":
        r = obj.radius * ss
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        return []
    scale = obj.radius / CIRCUMRADIUS[obj.shape]
    points = [(cx + px * ss, cy + py * ss) for px, py in outline_points(obj.shape, scale, obj.rotation_deg)]
    draw.polygon(points, fill=255)
    return points


def object_coverage(objects, image_size: int, grid: int) -> np.ndarray:
    """float32 [len(objects), grid, grid]: the fraction of each grid cell (a ViT patch when
    `image_size / grid` is the patch size) that each object's silhouette covers, rasterised at
    pixel resolution without antialiasing (PIL fills boundary pixels: about half a pixel wider
    all round than the painted shape). Cheap enough to run per training sample."""
    if image_size % grid:
        raise ValueError(f"image_size {image_size} is not a multiple of grid {grid}")
    cell = image_size // grid
    out = np.zeros((len(objects), grid, grid), np.float32)
    for k, obj in enumerate(objects):
        mask = Image.new("L", (image_size, image_size), 0)
        _draw_shape(ImageDraw.Draw(mask), obj, obj.center[0], obj.center[1], 1.0)
        m = np.asarray(mask, np.float32) / 255.0
        out[k] = m.reshape(grid, cell, grid, cell).mean(axis=(1, 3))
    return out


def paint(image: np.ndarray, obj: SceneObject, image_size: int) -> None:
    """Alpha-composite one outlined, antialiased object into `image` (float32, in place)."""
    ss = _SUPERSAMPLE
    x0, y0 = math.floor(obj.bbox[0]) - 1, math.floor(obj.bbox[1]) - 1
    x1, y1 = math.ceil(obj.bbox[2]) + 1, math.ceil(obj.bbox[3]) + 1
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, image_size), min(y1, image_size)
    w, h = x1 - x0, y1 - y0
    cx, cy = (obj.center[0] - x0) * ss, (obj.center[1] - y0) * ss
    outline = max(1.0, _OUTLINE * image_size) * ss
    shape_mask, fill_mask = Image.new("L", (w * ss, h * ss), 0), Image.new("L", (w * ss, h * ss), 0)
    draw_shape, draw_fill = ImageDraw.Draw(shape_mask), ImageDraw.Draw(fill_mask)
    points = _draw_shape(draw_shape, obj, cx, cy, ss)
    if obj.shape == "circle":
        r = obj.radius * ss - outline
        draw_fill.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    else:
        draw_fill.polygon(points, fill=255)
        # A line centred on the edge, twice the outline wide, erases `outline` inside the edge.
        draw_fill.line(points + points[:1], fill=0, width=round(2 * outline), joint="curve")

    def downsample(mask: Image.Image) -> np.ndarray:  # box filter, in C
        return np.asarray(mask.reduce(ss), np.float32)[..., None] * (1.0 / 255.0)

    alpha, fill = downsample(shape_mask), downsample(fill_mask)
    colour = fill * np.array(obj.rgb, np.float32) + (1 - fill) * _OUTLINE_RGB
    region = image[y0:y1, x0:x1]
    region[...] = alpha * colour + (1 - alpha) * region
