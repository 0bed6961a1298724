"""Qwen2.5-VL model inputs on the host: images and videos in one prompt, M-RoPE positions, spans.

A row's visual tokens are `<|image_pad|>` runs (one image each, `image_grid_thw`) and
`<|video_pad|>` runs (one video each, `video_grid_thw`, `second_per_grid_ts`), in any order. The
vision tower sees every image and video of the batch as one list of grids in sequence order
(row by row, left to right), so that merged token k of that list is visual token k of the batch.

Positions [3, b, s] are transformers' `Qwen2_5_VLModel.get_rope_index` (which it computes only
when `mm_token_type_ids` is passed): text counts on from the running position; an image's or a
video's tokens take (start + t', start + h, start + w) on its merged grid, where t' = t for an
image and int(t * tokens_per_second * second_per_grid_t) (float32, as torch) for a video; the text
after it starts at start + max(h, w).
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np

from ep_jax.core.spans import ImageSlots, VisualSpans, build_spans
from ep_jax.errors import InputError
from ep_jax.families import llava as _llava
from ep_jax.families.llava_next import slot_bucket
import ep_jax.families.qwen2_5_vl.vision as _vision
from ep_jax.families.qwen2_5_vl.config import Qwen25VLConfig

IMAGE, VIDEO = 1, 2  # transformers' mm_token_type_ids (0 text)
_NAMES = {IMAGE: "image", VIDEO: "video"}


def image_slots(cfg: Qwen25VLConfig, grid_thw) -> ImageSlots:
    """One image's (or video's) visual tokens: its merged (t, h/2, w/2) grid in raster order."""
    m = cfg.vision.spatial_merge_size
    t, h, w = int(grid_thw[0]), int(grid_thw[1]) // m, int(grid_thw[2]) // m
    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    return ImageSlots(np.stack([tt, hh, ww], -1).reshape(-1, 3).astype(np.int32), (t, h, w))


def token_types(cfg: Qwen25VLConfig, input_ids) -> np.ndarray:
    """mm_token_type_ids as transformers' processor returns them: 0 text, 1 image, 2 video."""
    ids = np.asarray(input_ids)
    return np.where(ids == cfg.image_token_id, IMAGE, np.where(ids == cfg.video_token_id, VIDEO, 0)).astype(np.int64)


def _runs(kinds: np.ndarray):
    """(kind, start, end) of each run of equal token types."""
    edges = np.flatnonzero(np.diff(kinds)) + 1
    starts = np.concatenate([[0], edges]).astype(int)
    ends = np.concatenate([edges, [len(kinds)]]).astype(int)
    return [(int(kinds[s]), int(s), int(e)) for s, e in zip(starts, ends)]


def visual_items(cfg: Qwen25VLConfig, kinds, valid, grids: dict) -> list[list[tuple[int, int]]]:
    """Per row, its images and videos in sequence order as (kind, index into that kind's grids),
    checked against the token counts (grid.prod() // 4 each)."""
    unit = cfg.vision.merge_unit
    taken = {IMAGE: 0, VIDEO: 0}
    rows = []
    for i in range(kinds.shape[0]):
        items = []
        for kind, start, end in _runs(kinds[i][valid[i]]) if valid[i].any() else []:
            if kind == 0:
                continue
            got = 0
            while got < end - start and taken[kind] < len(grids[kind]):
                items.append((kind, taken[kind]))
                got += int(np.prod(grids[kind][taken[kind]])) // unit
                taken[kind] += 1
            if got != end - start:
                name = _NAMES[kind]
                raise InputError(f"row {i} of input_ids holds {end - start} {name} tokens in a row but its {name}s "
                                 f"need {got} ({name}_grid_thw.prod() // 4 each); expand each <|{name}_pad|> with "
                                 "the processor")
        rows.append(items)
    for kind, name in _NAMES.items():
        if taken[kind] != len(grids[kind]):
            raise InputError(f"{len(grids[kind])} {name}(s) were given but input_ids hold {name} tokens for "
                             f"{taken[kind]}")
    return rows


def _time_step(cfg: Qwen25VLConfig, kind: int, seconds) -> np.float32 | int:
    if kind == IMAGE:
        return 1
    return np.float32(np.float32(cfg.vision.tokens_per_second) * np.float32(seconds))


def rope_index(cfg: Qwen25VLConfig, kinds, valid, items, grids: dict, seconds) -> np.ndarray:
    """transformers' `get_rope_index`: positions [3, b, s] (0 at padding), see the module docstring."""
    m = cfg.vision.spatial_merge_size
    out = np.zeros((3,) + kinds.shape, np.int32)
    for i in range(kinds.shape[0]):
        where = np.flatnonzero(valid[i])
        pos, parts, todo = 0, [], iter(items[i])
        for kind, start, end in _runs(kinds[i][where]) if len(where) else []:
            if kind == 0:
                parts.append(np.broadcast_to(np.arange(pos, pos + end - start), (3, end - start)))
                pos += end - start
                continue
            left = end - start
            while left > 0:
                kind_, k = next(todo)
                t, h, w = (int(x) for x in grids[kind_][k])
                h, w = h // m, w // m
                step = _time_step(cfg, kind_, seconds[k] if kind_ == VIDEO else 1)
                temporal = (np.arange(t, dtype=np.float32 if kind_ == VIDEO else np.int64) * step).astype(np.int64)
                tt, hh, ww = np.meshgrid(temporal, np.arange(h), np.arange(w), indexing="ij")
                parts.append(np.stack([tt, hh, ww]).reshape(3, -1) + pos)
                pos += max(h, w)
                left -= t * h * w
        out[:, i, where] = np.concatenate(parts, 1)[:, :len(where)] if parts else 0
    return out


def _text_checks(cfg: Qwen25VLConfig) -> SimpleNamespace:
    """The fields LLaVA's `model_inputs` reads, for its checks of input_ids and attention_mask
    only (no image token id matches: the visual tokens are counted here)."""
    return SimpleNamespace(text=cfg.text, image_token_id=-1, image_seq_len=1, vision=SimpleNamespace(grid_size=1),
                           vision_feature_select_strategy="default")


def _patches(cfg: Qwen25VLConfig, pixels, grids, name: str) -> np.ndarray:
    """Checked [patches, c*t*p*p] pixels of one kind (images or videos)."""
    if not len(grids):
        return np.zeros((0, cfg.vision.patch_dim), np.float32)
    pv = np.asarray(pixels)
    patches = int(sum(int(np.prod(g)) for g in grids))
    if pv.ndim != 2 or pv.shape != (patches, cfg.vision.patch_dim):
        raise InputError(f"{name} of shape {pv.shape}: the grids {np.asarray(grids).tolist()} need "
                         f"[{patches}, {cfg.vision.patch_dim}]")
    if not np.isfinite(pv).all():
        raise InputError(f"{name} hold NaN or infinite values; check the image or video files and the preprocessing")
    return pv


def _grids(pixels, grid_thw, name: str, what: str) -> np.ndarray:
    """[k, 3] grids of one kind; the processor's pixels carry them (`ep_jax.processing.TaggedPixels`)."""
    if pixels is None or not len(pixels):
        return np.zeros((0, 3), np.int64)
    if grid_thw is None:
        grid_thw = getattr(pixels, what, None)
    if grid_thw is None:
        raise InputError(f"Qwen2.5-VL needs {what} ([num_{name}s, 3]) with its pixel values")
    return np.asarray(grid_thw, np.int64).reshape(-1, 3)


def model_inputs(cfg: Qwen25VLConfig, input_ids, pixel_values=None, attention_mask=None, *, image_grid_thw=None,
                 pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None, mm_token_type_ids=None,
                 dtype=np.float32, patch_bucket_size: int | None = None,
                 slot_bucket_size: int | None = None) -> tuple[dict, VisualSpans]:
    """Checked arrays as transformers' Qwen2_5_VLProcessor returns them (`pixel_values`
    [patches, c*t*p*p] with `image_grid_thw` [images, 3]; `pixel_values_videos` with
    `video_grid_thw` [videos, 3] and `second_per_grid_ts` [videos]) -> (inputs, visual spans).
    `mm_token_type_ids` is accepted and not needed (the visual tokens are read from the ids);
    without `second_per_grid_ts` a video's temporal patches are 1 s apart (transformers' default)."""
    grids = {IMAGE: _grids(pixel_values, image_grid_thw, "image", "image_grid_thw"),
             VIDEO: _grids(pixel_values_videos, video_grid_thw, "video", "video_grid_thw")}
    if second_per_grid_ts is None:
        second_per_grid_ts = getattr(pixel_values_videos, "second_per_grid_ts", None)
    seconds = np.ones(len(grids[VIDEO])) if second_per_grid_ts is None else \
        np.asarray(second_per_grid_ts, np.float32).reshape(-1)
    if len(seconds) != len(grids[VIDEO]) or not (np.isfinite(seconds) & (seconds > 0)).all():
        raise InputError(f"second_per_grid_ts {seconds.tolist()}: need one positive number per video "
                         f"({len(grids[VIDEO])})")
    inputs, _ = _llava.model_inputs(_text_checks(cfg), input_ids, None, attention_mask, dtype=dtype)
    ids, valid = inputs["input_ids"], inputs["attention_mask"].astype(bool)
    kinds = np.where(valid, token_types(cfg, ids), 0)
    is_visual = kinds > 0
    items = visual_items(cfg, kinds, valid, grids)
    pixels = {IMAGE: _patches(cfg, pixel_values, grids[IMAGE], "pixel_values"),
              VIDEO: _patches(cfg, pixel_values_videos, grids[VIDEO], "pixel_values_videos")}
    order = [item for row in items for item in row]
    if not order:
        pos = np.maximum(np.cumsum(valid, 1) - 1, 0).astype(np.int32)
        inputs["mrope_positions"] = np.broadcast_to(pos, (3,) + pos.shape).copy()
    else:
        starts = {k: np.concatenate([[0], np.cumsum(np.prod(g, 1))]).astype(int) for k, g in grids.items()}
        pv = np.concatenate([pixels[k][starts[k][j]:starts[k][j + 1]] for k, j in order])
        batch_grids = np.stack([grids[k][j] for k, j in order])
        padded = _vision.patch_bucket(len(pv), patch_bucket_size, video=_vision.has_frame_pairs(batch_grids))
        lay = _vision.layout(batch_grids, cfg.vision, padded)
        inputs["pixel_values"] = np.concatenate([pv, np.zeros((padded - len(pv), pv.shape[1]), pv.dtype)]).astype(dtype)
        inputs.update({f"vision_{f.name}": getattr(lay, f.name) for f in dataclasses.fields(lay)
                       if f.name != "merged_row"})
        index = np.zeros(ids.shape, np.int32)
        index[is_visual] = lay.merged_row  # row-major: the batch's visual tokens in sequence order
        inputs["feature_index"] = index
        inputs["mrope_positions"] = rope_index(cfg, kinds, valid, items, grids, seconds)
    layouts = [[image_slots(cfg, grids[k][j]) for k, j in row] for row in items]
    n = slot_bucket(int(is_visual.sum(1).max(initial=0)), slot_bucket_size)
    return inputs, build_spans(is_visual, layouts, n)
