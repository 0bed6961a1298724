"""Images to pixel values, as Hugging Face's CLIP/LLaVA image processors compute them.

Numpy and PIL only. Reproduces transformers' `CLIPImageProcessorPil` / `LlavaImageProcessorPil`
(PIL bicubic resize of the shortest edge, floor-rounded long edge, floor-offset center crop,
float64 rescale then float32 normalise), so pixel values are bit-identical to what the Hugging
Face model was evaluated with.

Inputs are read by `ep_jax/image_files.py` (sizes checked before decoding, modes scaled not
clipped, alpha composited onto white, EXIF orientation applied to files); pixel values are
checked on the host (finite) before they are returned. With `do_pad`, an image whose padded
square would exceed `max_pixels` is first shrunk so the square fits; only that case (long
side > 10,000 px at the default limit) differs from transformers, which would allocate the
full square.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image

from ep_jax.errors import ProcessingError
from ep_jax.image_files import MAX_ASPECT_RATIO, MAX_IMAGE_PIXELS, count_text, open_image, to_rgb

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, the value HF configs store as "resample"


@dataclasses.dataclass(frozen=True)
class ImageProcessor:
    """CLIP image preprocessing, pixel-identical to transformers' `CLIPImageProcessorPil`.

    With `do_pad=True` it is `LlavaImageProcessorPil(do_pad=True)`: the original LLaVA-1.5
    "pad to square" with the mean colour (int(mean * 255) per channel) before resizing.
    Defaults are CLIP ViT-L/14-336 (what LLaVA-1.5 uses). Note that llava-hf checkpoints ship a
    plain `CLIPImageProcessor` (no padding); the original LLaVA-1.5 pads — pick with `do_pad`.

    size: shortest edge to resize to (the long edge is floor(size * long / short)), or an exact
          (height, width).
    crop_size: (height, width) of the center crop.
    max_pixels, max_aspect_ratio: inputs larger or more elongated are refused (files before they
          are decoded); see the module docstring.
    """

    size: int | tuple[int, int] = 336
    crop_size: tuple[int, int] = (336, 336)
    do_resize: bool = True
    do_center_crop: bool = True
    resample: int = BICUBIC
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    do_pad: bool = False
    do_convert_rgb: bool = True
    max_pixels: int = MAX_IMAGE_PIXELS
    max_aspect_ratio: float = MAX_ASPECT_RATIO

    def __post_init__(self):
        sizes = [self.size] if isinstance(self.size, int) else list(self.size)
        if len(sizes) not in (1, 2) or any(int(v) < 1 for v in sizes) or any(int(v) < 1 for v in self.crop_size):
            raise ProcessingError(f"ImageProcessor size={self.size!r}, crop_size={self.crop_size!r}: sizes must be "
                                  "positive (a shortest edge, or (height, width))")
        for name in ("image_mean", "image_std"):
            v = getattr(self, name)
            if len(v) != 3 or not all(math.isfinite(float(x)) for x in v):
                raise ProcessingError(f"ImageProcessor {name}={v!r}: need 3 finite numbers")
        if any(float(x) == 0.0 for x in self.image_std):
            raise ProcessingError(f"ImageProcessor image_std={self.image_std!r} has a zero; normalising would "
                                  "divide by zero (CLIP uses OPENAI_CLIP_STD)")
        if not math.isfinite(float(self.rescale_factor)):
            raise ProcessingError(f"ImageProcessor rescale_factor={self.rescale_factor!r}: need a finite number "
                                  "(1/255)")
        if not (int(self.max_pixels) >= 1 and float(self.max_aspect_ratio) >= 1.0):
            raise ProcessingError(f"ImageProcessor max_pixels={self.max_pixels!r}, max_aspect_ratio="
                                  f"{self.max_aspect_ratio!r}: need max_pixels >= 1 and max_aspect_ratio >= 1")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dir(cls, path: str | Path, **overrides: Any) -> "ImageProcessor":
        """Read `preprocessor_config.json` (llava-hf hub layout) or the "image_processor" entry of
        `processor_config.json` (what transformers 5 `save_pretrained` writes) from `path`.

        Keys absent from the file take this class's defaults (CLIP ViT-L/336); `overrides` (field
        names of this class, e.g. `do_pad=True`) replace values read from the file.
        """
        path = Path(path)
        pre, proc = path / "preprocessor_config.json", path / "processor_config.json"
        if pre.is_file():
            d = _read_json(pre)
        elif proc.is_file():
            d = _read_json(proc).get("image_processor")
            if not isinstance(d, dict):
                raise ProcessingError(f"{proc} has no 'image_processor' settings; re-save the processor with "
                                      "transformers (processor.save_pretrained) or pass an ImageProcessor")
        else:
            raise ProcessingError(
                f"no preprocessor_config.json or processor_config.json in {str(path)!r}; point at a Hugging Face "
                "LLaVA checkpoint directory, or build ImageProcessor() (CLIP ViT-L/336 defaults) yourself"
            )
        return dataclasses.replace(cls.from_hf_dict(d), **overrides)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ImageProcessor":
        """Translate a Hugging Face image-processor dict (CLIP or LLaVA type)."""
        default = cls()
        kind = str(d.get("image_processor_type", "CLIPImageProcessor"))
        if not kind.startswith(("CLIPImageProcessor", "LlavaImageProcessor")):
            raise ProcessingError(f"image_processor_type={kind!r} is not supported; ep_jax reproduces "
                                  "CLIPImageProcessor and LlavaImageProcessor (LLaVA-1.5)")
        mean, std = d.get("image_mean", default.image_mean), d.get("image_std", default.image_std)
        return cls(
            size=_parse_size(d.get("size", default.size)),
            crop_size=_parse_crop(d.get("crop_size", default.crop_size)),
            do_resize=bool(d.get("do_resize", default.do_resize)),
            do_center_crop=bool(d.get("do_center_crop", default.do_center_crop)),
            resample=int(d.get("resample", default.resample)),
            do_rescale=bool(d.get("do_rescale", default.do_rescale)),
            rescale_factor=float(d.get("rescale_factor", default.rescale_factor)),
            do_normalize=bool(d.get("do_normalize", default.do_normalize)),
            image_mean=_triple(mean, "image_mean"),
            image_std=_triple(std, "image_std"),
            # For CLIPImageProcessor `do_pad` means "pad the batch to its largest image", a no-op
            # after the center crop; only the LLaVA processor pads each image to a square.
            do_pad=bool(d.get("do_pad")) and kind.startswith("LlavaImageProcessor"),
            do_convert_rgb=bool(d.get("do_convert_rgb", default.do_convert_rgb)),
        )

    # ------------------------------------------------------------------ geometry
    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize step (before the crop) for an input of that size."""
        if not self.do_resize:
            return height, width
        if not isinstance(self.size, int):
            return tuple(self.size)
        # transformers.image_transforms.get_resize_output_image_size: int(), i.e. floor.
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.size * long / short)
        return (new_long, self.size) if width <= height else (self.size, new_long)

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every output, or None when it depends on the input's aspect ratio."""
        if self.do_center_crop:
            return tuple(self.crop_size)
        if self.do_resize and not isinstance(self.size, int):
            return tuple(self.size)
        return None

    # ------------------------------------------------------------------ processing
    def preprocess(self, image: Any) -> np.ndarray:
        """One image (anything `load_image` accepts) -> float32 [3, H, W]."""
        im, label = self._rgb(image)
        if self.do_pad:
            side = max(im.size)
            if side * side > self.max_pixels:
                # The padded square would be a huge intermediate (a 70,000 x 1,400 image pads to 5
                # gigapixels): shrink first so it fits. Not bit-identical with transformers, which
                # would build the full square; only images with a long side over sqrt(max_pixels).
                if not self.do_resize:
                    raise ProcessingError(
                        f"{label} padded to a square is {side}x{side} = {count_text(side * side)}, over "
                        f"max_pixels={self.max_pixels}, and do_resize=False; downscale the image first"
                    )
                im = _shrink(im, math.isqrt(int(self.max_pixels)), self.resample)
            im = _pad_to_square(im, tuple(int(m * 255) for m in self.image_mean))
        if self.do_resize:
            h, w = self.resized_size(im.height, im.width)
            if h * w > self.max_pixels:
                raise ProcessingError(
                    f"{label}: resizing {im.width}x{im.height} to {w}x{h} would build {count_text(h * w)}, "
                    f"over max_pixels={self.max_pixels}; crop or pad the image to a less elongated shape, or use a "
                    "smaller size"
                )
            im = im.resize((w, h), resample=self.resample)
        pixels = np.asarray(im)  # [H, W, 3] uint8
        if self.do_center_crop:
            pixels = _center_crop(pixels, self.crop_size)
        if self.do_rescale:
            # float64 product then float32, exactly as transformers' rescale.
            x = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            x = pixels.astype(np.float32)
        if self.do_normalize:
            with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # checked just below
                x = (x - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        if not np.isfinite(x).all():  # checked on the host, before any transfer to a device
            raise ProcessingError(
                f"pixel values of {label} are not finite after preprocessing (rescale_factor={self.rescale_factor}, "
                f"image_mean={self.image_mean}, image_std={self.image_std}); fix the image processor settings"
            )
        return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)

    def __call__(self, images: Any) -> np.ndarray:
        """A list of images (or one image) -> float32 [n, 3, H, W]."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            h, w = self.output_size or (0, 0)
            return np.zeros((0, 3, h, w), np.float32)
        out = []
        for i, im in enumerate(images):
            try:
                out.append(self.preprocess(im))
            except ProcessingError as e:
                if len(images) == 1:
                    raise
                raise ProcessingError(f"image {i} of {len(images)}: {e}") from None
        shapes = {o.shape for o in out}
        if len(shapes) > 1:
            raise ProcessingError(f"processed images have different shapes {sorted(shapes)}; enable "
                                  "do_center_crop or give an exact (height, width) size to batch them")
        return np.stack(out)

    def image_size(self, image: Any) -> tuple[int, int]:
        """(height, width) of the image as the processor sees it (EXIF orientation applied)."""
        im, _ = self._rgb(image)
        return im.height, im.width

    def _rgb(self, image: Any) -> tuple[PIL.Image.Image, str]:
        raw, label = open_image(image, self.max_pixels, self.max_aspect_ratio)
        if not self.do_convert_rgb and raw.mode != "RGB":
            raise ProcessingError(f"{label} has mode {raw.mode!r} but do_convert_rgb=False; the vision tower "
                                  "needs 3 channels: set do_convert_rgb=True or convert the image to RGB")
        return to_rgb(raw, label), label


def _shrink(im: PIL.Image.Image, max_side: int, resample: int) -> PIL.Image.Image:
    """Scale `im` down so that its long side is `max_side` (aspect ratio kept)."""
    scale = max_side / max(im.size)
    size = (max(1, min(max_side, round(im.width * scale))), max(1, min(max_side, round(im.height * scale))))
    return im.resize(size, resample=resample)


def _pad_to_square(im: PIL.Image.Image, color: tuple[int, ...]) -> PIL.Image.Image:
    # LLaVA's expand2square; offsets floor((long - short) / 2), like LlavaImageProcessor.pad_to_square.
    w, h = im.size
    if w == h:
        return im
    side = max(w, h)
    out = PIL.Image.new("RGB", (side, side), color)
    out.paste(im, ((side - w) // 2, (side - h) // 2))
    return out


def _center_crop(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """transformers.image_transforms.center_crop on [H, W, C]: floor offsets, zero pad if too small."""
    h, w = pixels.shape[:2]
    ch, cw = int(size[0]), int(size[1])
    top, left = (h - ch) // 2, (w - cw) // 2
    if top >= 0 and left >= 0:
        return pixels[top:top + ch, left:left + cw]
    nh, nw = max(ch, h), max(cw, w)
    top_pad, left_pad = -(-(nh - h) // 2), -(-(nw - w) // 2)  # ceil
    canvas = np.zeros((nh, nw) + pixels.shape[2:], pixels.dtype)
    canvas[top_pad:top_pad + h, left_pad:left_pad + w] = pixels
    top, left = top + top_pad, left + left_pad
    return canvas[max(0, top):min(nh, top + ch), max(0, left):min(nw, left + cw)]


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ProcessingError(f"cannot read {path} as JSON ({e}); re-save the processor files") from None
    if not isinstance(d, dict):
        raise ProcessingError(f"{path} holds a {type(d).__name__}, not a JSON object")
    return d


def _parse_size(size: Any) -> int | tuple[int, int]:
    if isinstance(size, int):
        return size  # HF's get_size_dict(default_to_square=False): an int is the shortest edge
    if isinstance(size, dict):
        if set(size) == {"shortest_edge"}:
            return int(size["shortest_edge"])
        if set(size) == {"height", "width"}:
            return int(size["height"]), int(size["width"])
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return int(size[0]), int(size[1])
    raise ProcessingError(f"image processor size={size!r} is not supported; use {{'shortest_edge': n}} "
                          "or {'height': h, 'width': w}")


def _parse_crop(crop: Any) -> tuple[int, int]:
    if isinstance(crop, int):
        return crop, crop
    if isinstance(crop, dict) and set(crop) == {"height", "width"}:
        return int(crop["height"]), int(crop["width"])
    if isinstance(crop, (list, tuple)) and len(crop) == 2:
        return int(crop[0]), int(crop[1])
    raise ProcessingError(f"image processor crop_size={crop!r} is not supported; use {{'height': h, 'width': w}}")


def _triple(v: Any, name: str) -> tuple[float, float, float]:
    if isinstance(v, (int, float)):
        return (float(v),) * 3
    if isinstance(v, (list, tuple)) and len(v) == 3:
        return tuple(float(x) for x in v)
    raise ProcessingError(f"{name}={v!r}: need one value or three (one per RGB channel)")
