"""Qwen2.5-VL processor: pixels identical to transformers' `Qwen2VLImageProcessorPil`
(`smart_resize` between min_pixels and max_pixels, BICUBIC, CLIP rescale/normalise, patches
flattened merge-block by merge-block, each frame repeated over the 2 temporal slots) and prompts
whose `<|image_pad|>` expands to `grid_thw.prod() // 4` tokens, as `Qwen2_5_VLProcessor` does.

`encode` returns the Processor's arrays with "pixel_values" [patches, 3 * 2 * 14 * 14] and
"image_grid_thw" [images, 3] (the runtime passes it on to the family's `inputs`). With `videos`
(`video_processing.QwenVideoProcessor`: transformers' `Qwen2VLVideoProcessor`), each
`<|video_pad|>` expands to `video_grid_thw.prod() // 4` tokens and the output adds
"pixel_values_videos", "video_grid_thw", "second_per_grid_ts" and "mm_token_type_ids".
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ep_jax.errors import ProcessingError
from ep_jax.families.llava_next.processing import NextProcessor
from ep_jax.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageProcessor
from ep_jax.processing import DEFAULT_BUCKETS, Processor, TaggedPixels, get_template

IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 1280  # transformers' defaults (the hub checkpoints' too)


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """transformers' `smart_resize`: both sides multiples of `factor`, the area within
    [min_pixels, max_pixels], the aspect ratio kept as closely as possible."""
    if max(height, width) / min(height, width) > 200:
        raise ProcessingError(f"image of {width}x{height}: the aspect ratio must be under 200")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclasses.dataclass(frozen=True)
class QwenImageProcessor(ImageProcessor):
    do_center_crop: bool = False
    min_pixels: int = MIN_PIXELS  # smart_resize's bounds (ImageProcessor.max_pixels guards the input file)
    resize_max_pixels: int = MAX_PIXELS
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **overrides: Any) -> "QwenImageProcessor":
        kind = str(d.get("image_processor_type", "Qwen2VLImageProcessor"))
        if not kind.startswith(("Qwen2VLImageProcessor", "Qwen2_5_VLImageProcessor")):
            raise ProcessingError(f"image_processor_type={kind!r}: a Qwen2.5-VL checkpoint has a "
                                  "Qwen2_5_VLImageProcessor / Qwen2VLImageProcessor")
        return cls(**{**cls.hf_fields(d, MIN_PIXELS, MAX_PIXELS), **overrides})

    @staticmethod
    def hf_fields(d: dict[str, Any], min_pixels: int, max_pixels: int) -> dict[str, Any]:
        """The fields of a transformers processor config (defaults: `min_pixels`, `max_pixels`)."""
        size = d.get("size") or {}
        mean, std = d.get("image_mean", OPENAI_CLIP_MEAN), d.get("image_std", OPENAI_CLIP_STD)
        return dict(
            min_pixels=int(d.get("min_pixels") or size.get("shortest_edge") or min_pixels),
            resize_max_pixels=int(d.get("max_pixels") or size.get("longest_edge") or max_pixels),
            patch_size=int(d.get("patch_size", 14)), temporal_patch_size=int(d.get("temporal_patch_size", 2)),
            merge_size=int(d.get("merge_size", 2)), resample=int(d.get("resample", 3)),
            do_rescale=bool(d.get("do_rescale", True)), rescale_factor=float(d.get("rescale_factor", 1 / 255)),
            do_normalize=bool(d.get("do_normalize", True)), image_mean=tuple(float(x) for x in mean),
            image_std=tuple(float(x) for x in std), do_convert_rgb=bool(d.get("do_convert_rgb", True)),
        )

    @classmethod
    def from_dir(cls, path: str | Path, **overrides: Any) -> "QwenImageProcessor":
        """preprocessor_config.json (hub), processor_config.json's "image_processor" (transformers 5),
        else transformers' defaults."""
        for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
            f = Path(path) / name
            if f.is_file():
                d = json.loads(f.read_text())
                return cls.from_hf_dict((d.get(key) or {}) if key else d, **overrides)
        return cls.from_hf_dict({}, **overrides)

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        return smart_resize(height, width, self.patch_size * self.merge_size, self.min_pixels, self.resize_max_pixels)

    @property
    def output_size(self):
        return None

    def patches(self, image: Any) -> tuple[np.ndarray, tuple[int, int, int]]:
        """One image -> (float32 [grid_h * grid_w, 3 * t * p * p], grid (1, grid_h, grid_w))."""
        x = self.preprocess(image)  # [3, H, W]
        c, h, w = x.shape
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        gh, gw = h // p, w // p
        x = x.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
        x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, *x.shape[5:]))
        return np.ascontiguousarray(x.reshape(gh * gw, c * t * p * p), np.float32), (1, gh, gw)

    def __call__(self, images: Any) -> np.ndarray:
        if not isinstance(images, (list, tuple)):
            images = [images]
        dim = 3 * self.temporal_patch_size * self.patch_size ** 2
        if not images:
            return np.zeros((0, dim), np.float32)
        return np.concatenate([im.pixels if isinstance(im, _Done) else self.patches(im)[0] for im in images])


@dataclasses.dataclass(frozen=True)
class _Done:
    """An image's patches and grid, computed once before the prompts are tokenised."""
    pixels: np.ndarray
    grid: tuple[int, int, int]


class QwenProcessor(NextProcessor):
    """Tokenizer + Qwen2-VL image and video processors: every <|image_pad|> expands to its image's
    tokens (LLaVA-NeXT's per-image expansion, `NextProcessor._expand`), every <|video_pad|> to its
    video's (`video_grid_thw.prod() // 4`), as `Qwen2_5_VLProcessor` does."""

    def __init__(self, tokenizer, image_processor: QwenImageProcessor, *, image_token: str = IMAGE_PAD,
                 video_processor=None):
        super().__init__(tokenizer, image_processor, patch_size=image_processor.patch_size, image_seq_len=1,
                         image_token=image_token)
        self.video_processor = video_processor
        self._video_rows: list[list[int]] | None = None

    def num_image_tokens(self, height: int, width: int) -> int:
        ip = self.image_processor
        h, w = ip.resized_size(height, width)
        return (h // ip.patch_size) * (w // ip.patch_size) // ip.merge_size ** 2

    @property
    def video_token_id(self) -> int:
        ids = self.tokenizer.encode(VIDEO_PAD, add_special_tokens=False)
        if len(ids) != 1 or ids[0] == self.tokenizer.unk_token_id:
            raise ProcessingError(f"the tokenizer has no single token for {VIDEO_PAD!r}; use the checkpoint's own "
                                  "tokenizer (Qwen2.5-VL's has it)")
        return int(ids[0])

    def _expand(self, ids):
        if self._video_rows is None:
            return super()._expand(ids)
        counts, vid = self._video_rows.pop(0), self.video_token_id
        if ids.count(vid) != len(counts):
            raise ProcessingError(f"a prompt tokenises to {ids.count(vid)} {VIDEO_PAD!r} tokens for {len(counts)} "
                                  f"video(s); put spaces or newlines around {VIDEO_PAD!r}")
        counts = list(counts)
        out = []
        for t in super()._expand(ids):
            out.extend([vid] * counts.pop(0) if t == vid else [t])
        return out

    def encode(self, prompts, images=None, *, videos=None, fps: float | None = None, **kw) -> dict[str, np.ndarray]:
        """As `Processor.encode`, plus `videos`: None, or one entry per prompt: a video (a file, a
        folder of frames, an array [T, H, W, 3], an `ep_jax.video.Video`), a list of videos, or
        None; sampled at `fps` (default 2.0). With videos, the output adds transformers' keys
        "pixel_values_videos", "video_grid_thw", "second_per_grid_ts" and "mm_token_type_ids"."""
        single = isinstance(prompts, str)
        prompts = [prompts] if single else list(prompts)
        one_image = single and images is not None and not isinstance(images, (list, tuple))
        per_prompt = self._images_per_prompt(prompts, [images] if one_image else images)
        done = [[_Done(*self.image_processor.patches(im)) for im in ims] for ims in per_prompt]
        flat = [d for row in done for d in row]
        kw.setdefault("bucket_sizes", DEFAULT_BUCKETS)
        kw.setdefault("template", "qwen2_5_vl")
        merge = self.image_processor.merge_size ** 2
        clips = self._videos(prompts, [videos] if single and videos is not None else videos, fps)
        if clips is not None:
            prompts = [self._with_video_slots(p, len(row), kw["template"]) for p, row in zip(prompts, clips)]
            self._video_rows = [[c.num_tokens for c in row] for row in clips]
        self._counts = [int(np.prod(d.grid)) // merge for d in flat]
        try:
            enc = Processor.encode(self, prompts, done, **kw)
        finally:
            self._counts = self._video_rows = None
        enc["image_grid_thw"] = np.array([d.grid for d in flat], np.int64).reshape(-1, 3)
        enc["pixel_values"] = TaggedPixels(enc["pixel_values"], image_grid_thw=enc["image_grid_thw"])
        if clips is not None:
            enc.update(self._video_arrays([c for row in clips for c in row], enc["input_ids"]))
        return enc

    def _videos(self, prompts, videos, fps):
        """Per prompt, its videos' patches (None without videos)."""
        if videos is None:
            return None
        if self.video_processor is None:
            raise ProcessingError("this processor has no video processor; load the model from its checkpoint (the family builds the video processor from its files)")
        if not isinstance(videos, (list, tuple)) or len(videos) != len(prompts):
            raise ProcessingError(f"videos must be a list with one entry per prompt ({len(prompts)}), "
                                  f"got {type(videos).__name__}")
        rows = [[] if v is None else list(v) if isinstance(v, (list, tuple)) else [v] for v in videos]
        vp = self.video_processor
        return [[v if hasattr(v, "grid") else vp.video_patches(v, fps) for v in row] for row in rows]

    def _with_video_slots(self, prompt: str, count: int, template) -> str:
        """The prompt with one vision block per video in front (as the Qwen chat template puts a
        video before the text), unless it places its own <|video_pad|> tokens."""
        found = prompt.count(VIDEO_PAD)
        if found == 0 and count:
            slot = get_template(template).image_slot
            if slot is None:
                raise ProcessingError(f"the {get_template(template).name!r} template adds no video slot: put "
                                      f"<|vision_start|>{VIDEO_PAD}<|vision_end|> where each video goes")
            return slot.replace("{image}", VIDEO_PAD) * count + prompt
        if found != count:
            raise ProcessingError(f"prompt {prompt[:60]!r} has {found} {VIDEO_PAD!r} token(s) but {count} video(s) "
                                  "were given for it")
        return prompt

    def _video_arrays(self, clips, input_ids) -> dict[str, np.ndarray]:
        dim = 3 * self.image_processor.temporal_patch_size * self.image_processor.patch_size ** 2
        grid = np.array([c.grid for c in clips], np.int64).reshape(-1, 3)
        seconds = np.array([c.second_per_grid_t for c in clips], np.float32)
        pixels = np.concatenate([c.pixels for c in clips]) if clips else np.zeros((0, dim), np.float32)
        ids = np.asarray(input_ids)
        types = np.where(ids == self.image_token_id, 1, np.where(ids == self.video_token_id, 2, 0)).astype(np.int64)
        return {"pixel_values_videos": TaggedPixels(pixels, video_grid_thw=grid, second_per_grid_ts=seconds),
                "video_grid_thw": grid, "second_per_grid_ts": seconds, "mm_token_type_ids": types}
