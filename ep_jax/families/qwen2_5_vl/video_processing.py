"""Qwen2.5-VL video processor: transformers' `Qwen2VLVideoProcessor` (which needs torchvision, so it
cannot run here) in NumPy + PIL.

    sampled frames [n, H, W, 3] (`ep_jax.video`) --(smart_resize with the video pixel limits, every
    frame to one size, BICUBIC; CLIP rescale/normalise)--> [n, 3, H', W']
    --(temporal patches of 2 frames; an odd count repeats the last frame)--> patches
    [t * gh * gw, 3 * 2 * 14 * 14] flattened merge-block by merge-block within each temporal patch,
    grid (t, gh, gw), second_per_grid_t = temporal_patch_size / sampled fps.

Frames are resized with PIL (as `Qwen2VLImageProcessorPil` resizes images) where transformers'
video processor uses torchvision's bicubic on tensors: the pixels differ slightly after resizing;
a video whose frames need no resizing gets exactly transformers' patches. The pixel limits are
the video processor's (`size` {"shortest_edge": 128 * 28 * 28, "longest_edge": 768 * 28 * 28})
unless the checkpoint's config sets them: as transformers, `processor_config.json`'s
"video_processor", else `video_preprocessor_config.json`, else `preprocessor_config.json`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from ep_jax.errors import ProcessingError
from ep_jax.families.qwen2_5_vl.processing import QwenImageProcessor
from ep_jax.video import Video, read_video

VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS = 128 * 28 * 28, 768 * 28 * 28  # Qwen2VLVideoProcessor.size


@dataclasses.dataclass(frozen=True)
class VideoPatches:
    """One video's patches, grid and temporal spacing, as the processor returns them."""
    pixels: np.ndarray  # float32 [t * gh * gw, 3 * 2 * p * p]
    grid: tuple[int, int, int]  # (t, gh, gw)
    second_per_grid_t: float  # seconds between temporal patches
    video: Video | None = None  # the sampled frames (for --explain and the report)

    @property
    def num_tokens(self) -> int:
        return int(np.prod(self.grid)) // 4


@dataclasses.dataclass(frozen=True)
class QwenVideoProcessor(QwenImageProcessor):
    min_pixels: int = VIDEO_MIN_PIXELS
    resize_max_pixels: int = VIDEO_MAX_PIXELS

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **overrides: Any) -> "QwenVideoProcessor":
        kind = str(d.get("video_processor_type") or d.get("image_processor_type") or "Qwen2VLVideoProcessor")
        if not kind.startswith(("Qwen2VL", "Qwen2_5_VL")):
            raise ProcessingError(f"video processor {kind!r}: a Qwen2.5-VL checkpoint has a Qwen2VLVideoProcessor")
        return cls(**{**cls.hf_fields(d, VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS), **overrides})

    @classmethod
    def from_dir(cls, path: str | Path, **overrides: Any) -> "QwenVideoProcessor":
        for name, key in (("processor_config.json", "video_processor"), ("video_preprocessor_config.json", None),
                          ("preprocessor_config.json", None)):
            f = Path(path) / name
            if f.is_file():
                d = json.loads(f.read_text())
                d = d.get(key) if key else d
                if d:
                    return cls.from_hf_dict(d, **overrides)
        return cls(**overrides)

    def frames_to_pixels(self, frames: np.ndarray) -> np.ndarray:
        """uint8 [n, H, W, 3] -> float32 [n, 3, H', W'], every frame at the video's smart_resize size."""
        return np.stack([self.preprocess(f) for f in frames])

    def video_patches(self, video: Any, fps: float | None = None) -> VideoPatches:
        """A video (anything `ep_jax.video.read_video` takes, or a `Video`) -> its patches."""
        v = video if isinstance(video, Video) else read_video(video, **({} if fps is None else {"fps": fps}))
        x = self.frames_to_pixels(v.frames)
        p, m, tp = self.patch_size, self.merge_size, self.temporal_patch_size
        if pad := -len(x) % tp:
            x = np.concatenate([x, np.repeat(x[-1:], pad, 0)])
        n, c, h, w = x.shape
        gt, gh, gw = n // tp, h // p, w // p
        x = x.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        pixels = np.ascontiguousarray(x.reshape(gt * gh * gw, c * tp * p * p), np.float32)
        return VideoPatches(pixels, (gt, gh, gw), tp / v.sampled_fps, v)
