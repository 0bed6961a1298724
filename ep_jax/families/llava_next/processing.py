"""LLaVA-NeXT processor: AnyRes crops, pixel-identical to transformers' `LlavaNextImageProcessorPil`,
and prompts expanded to each image's own token count as `LlavaNextProcessor` does.

`encode` returns the LLaVA-1.5 processor's arrays plus "image_sizes" [num_images, 2] (height,
width); "pixel_values" holds every image's crops (base view first, then its tiles in raster
order), image after image: [total crops, 3, side, side].
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image

from ep_jax.errors import ProcessingError
import ep_jax.families.llava_next.anyres as anyres
from ep_jax.families.llava_next.config import DEFAULT_PINPOINTS
from ep_jax.images import ImageProcessor
from ep_jax.processing import DEFAULT_BUCKETS, Processor, TaggedPixels

# Prompt-length buckets: LLaVA-1.5's plus four in the 1,800-2,950-token range of one AnyRes image
# at 336 px (50 random aspect ratios: 4.6 % mean sequence padding instead of 17.5 %).
NEXT_BUCKETS = tuple(sorted(set(DEFAULT_BUCKETS) | {1792, 2304, 2560, 2816}))


@dataclasses.dataclass(frozen=True)
class AnyResImageProcessor(ImageProcessor):
    image_grid_pinpoints: tuple[tuple[int, int], ...] = DEFAULT_PINPOINTS

    @property
    def side(self) -> int:
        return int(self.crop_size[0]) if self.do_center_crop else (
            self.size if isinstance(self.size, int) else int(self.size[0]))

    @classmethod
    def from_dir(cls, path: str | Path, **overrides: Any) -> "AnyResImageProcessor":
        path = Path(path)
        pre, proc = path / "preprocessor_config.json", path / "processor_config.json"
        if pre.is_file():
            d = json.loads(pre.read_text())
        elif proc.is_file():
            d = json.loads(proc.read_text()).get("image_processor") or {}
        else:
            raise ProcessingError(f"no preprocessor_config.json or processor_config.json in {str(path)!r}")
        return cls.from_hf_dict(d, **overrides)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **overrides: Any) -> "AnyResImageProcessor":
        kind = str(d.get("image_processor_type", "LlavaNextImageProcessor"))
        if not kind.startswith("LlavaNextImageProcessor"):
            raise ProcessingError(f"image_processor_type={kind!r}: a LLaVA-NeXT checkpoint has a "
                                  "LlavaNextImageProcessor")
        base = ImageProcessor.from_hf_dict({**d, "image_processor_type": "CLIPImageProcessor", "do_pad": False})
        pins = d.get("image_grid_pinpoints") or DEFAULT_PINPOINTS
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(ImageProcessor)}
        fields.update(image_grid_pinpoints=tuple((int(h), int(w)) for h, w in pins))
        fields.update(overrides)
        return cls(**fields)

    def crops(self, image: Any) -> tuple[np.ndarray, tuple[int, int]]:
        """One image -> (float32 [crops, 3, side, side], its (height, width))."""
        im, _ = self._rgb(image)
        size = (im.height, im.width)
        side = self.side
        best = anyres.select_best_resolution(size, self.image_grid_pinpoints)
        nh, nw = anyres.patch_output_size(size, best)
        resized = np.asarray(im.resize((nw, nh), resample=self.resample))
        py, ry = divmod(best[0] - nh, 2)
        px, rx = divmod(best[1] - nw, 2)
        padded = np.pad(resized, ((py, py + ry), (px, px + rx), (0, 0)))
        views = [im.resize((side, side), resample=self.resample)]
        for y in range(0, best[0], side):
            for x in range(0, best[1], side):
                views.append(PIL.Image.fromarray(np.ascontiguousarray(padded[y:y + side, x:x + side])))
        plain = dataclasses.replace(self, do_pad=False)
        return np.stack([ImageProcessor.preprocess(plain, v) for v in views]), size

    def __call__(self, images: Any) -> np.ndarray:
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            return np.zeros((0, 3, self.side, self.side), np.float32)
        return np.concatenate([im.pixels if isinstance(im, _Done) else self.crops(im)[0] for im in images])


@dataclasses.dataclass(frozen=True)
class _Done:
    """An image already cut into crops (so `Processor.encode` does not process it twice)."""
    pixels: np.ndarray
    size: tuple[int, int]


class NextProcessor(Processor):
    """Tokenizer + AnyRes image processor: every <image> expands to that image's token count."""

    def __init__(self, tokenizer, image_processor: AnyResImageProcessor, *, patch_size: int, image_seq_len: int,
                 image_token: str | None = None):
        super().__init__(tokenizer, image_processor, image_seq_len=image_seq_len, image_token=image_token)
        self.patch_size = int(patch_size)
        self._counts: list[int] | None = None

    def num_image_tokens(self, height: int, width: int) -> int:
        ip = self.image_processor
        return anyres.num_image_tokens((height, width), ip.image_grid_pinpoints, ip.side, self.patch_size)

    def image_token_counts(self, images) -> list[int]:
        return [self.num_image_tokens(*self.image_processor.image_size(im)) for im in images]

    def _expand(self, ids):
        if self._counts is None:  # tokenize() of text alone: the base grid's count
            return super()._expand(ids)
        out: list[int] = []
        for t in ids:
            if t == self.image_token_id:
                out.extend([self.image_token_id] * self._counts.pop(0))
            else:
                out.append(int(t))
        return out

    def encode(self, prompts, images=None, **kw) -> dict[str, np.ndarray]:
        if isinstance(prompts, str):
            prompts = [prompts]
            if images is not None and not isinstance(images, (list, tuple)):
                images = [images]
        per_prompt = self._images_per_prompt(list(prompts), images)
        done = []
        for ims in per_prompt:
            row = []
            for im in ims:
                pixels, size = self.image_processor.crops(im)
                row.append(_Done(pixels, size))
            done.append(row)
        flat = [d for row in done for d in row]
        kw.setdefault("bucket_sizes", NEXT_BUCKETS)
        self._counts = [self.num_image_tokens(*d.size) for d in flat]
        try:
            enc = super().encode(prompts, done, **kw)
        finally:
            self._counts = None
        enc["image_sizes"] = np.array([d.size for d in flat], np.int64).reshape(-1, 2)
        enc["pixel_values"] = TaggedPixels(enc["pixel_values"], image_sizes=enc["image_sizes"])
        return enc
