"""LLaVA-NeXT / LLaVA-1.6 (`model_type` "llava_next"): AnyRes crops through LLaVA's CLIP tower,
projector and LLaMA-shaped decoder (Vicuna, Mistral, Yi-34B), plus `image_newline`.

Host side: config (`config.LlavaNextConfig`), weight table (LLaVA's + `image_newline`), processor
(`processing.NextProcessor`, pixel-identical to transformers' `LlavaNextImageProcessorPil`), model
inputs and visual spans. Each image holds its own number of visual tokens N (base 24x24 grid, the
un-padded tile grid and one newline per tile-grid row); static shapes come from buckets:

  visual slots n   the batch's largest N rounded up to a multiple of `SLOT_BUCKET`
  crops            the batch's crops rounded up to a multiple of `max_crops` (zero crops, unused)
"""

from __future__ import annotations

import numpy as np

from ep_jax.core.spans import ImageSlots, VisualSpans, build_spans
from ep_jax.errors import InputError
from ep_jax.families import llava as _llava
from ep_jax.families.base import Family, register
import ep_jax.families.llava_next.anyres as anyres
from ep_jax.families.llava_next.config import LlavaNextConfig
from ep_jax.families.llava_next.model import LlavaNext

SLOT_BUCKET = 256  # visual slots n are rounded up to a multiple of this


def slot_bucket(n: int, bucket: int | None = None) -> int:
    bucket = SLOT_BUCKET if bucket is None else bucket
    return max(bucket, -(-int(n) // bucket) * bucket)


def image_slots(cfg: LlavaNextConfig, size) -> tuple[np.ndarray, ImageSlots, np.ndarray]:
    """(feature rows [N] (-1: newline), slots, per-token grid [N, 3]) of one image of (height, width)."""
    feats, coords, (base, tiles) = anyres.image_layout(size, cfg.image_grid_pinpoints, cfg.vision.image_size,
                                                       cfg.vision.patch_size)
    grid = np.where(coords[:, :1] == 0, np.array([2, *base]), np.array([2, *tiles])).astype(np.int32)
    return feats, ImageSlots(coords, (2, *base)), grid


def _crops(cfg: LlavaNextConfig, pixel_values, sizes) -> list[np.ndarray]:
    """Per image, its crops: from [total crops, 3, H, W] (ep_jax's processor) or [images, max
    crops, 3, H, W] (transformers', zero-padded per image)."""
    side = cfg.vision.image_size
    counts = [anyres.num_crops(s, cfg.image_grid_pinpoints, side) for s in sizes]
    pv = np.asarray(pixel_values)
    want = (cfg.vision.num_channels, side, side)
    if pv.ndim == 5 and pv.shape[2:] == want and len(pv) == len(sizes) and pv.shape[1] >= max(counts):
        return [pv[i, :c] for i, c in enumerate(counts)]
    if pv.ndim == 4 and pv.shape[1:] == want and len(pv) == sum(counts):
        return np.split(pv, np.cumsum(counts)[:-1])
    raise InputError(f"pixel_values of shape {pv.shape} do not hold the AnyRes crops of {len(sizes)} image(s) of "
                     f"sizes {[tuple(s) for s in sizes]} ({counts} crops of {want}); use the LLaVA-NeXT processor")


def model_inputs(cfg: LlavaNextConfig, input_ids, pixel_values=None, attention_mask=None, *, image_sizes=None,
                 dtype=np.float32, slot_bucket_size: int | None = None) -> tuple[dict, VisualSpans]:
    """Checked arrays as transformers' LlavaNextProcessor (or ep_jax's) returns them, plus
    `image_sizes` [num_images, 2] (height, width) -> (inputs, visual spans). Without
    `image_sizes`, those `pixel_values` carry (`ep_jax.processing.TaggedPixels`, ep_jax's processor) are used."""
    if image_sizes is None:
        image_sizes = getattr(pixel_values, "image_sizes", None)
    text_only = pixel_values is None or not len(pixel_values)
    sizes = [] if text_only else [tuple(int(v) for v in s) for s in np.asarray(image_sizes).reshape(-1, 2)] \
        if image_sizes is not None else None
    if sizes is None:
        raise InputError("LLaVA-NeXT needs image_sizes ([num_images, 2], height and width) with pixel_values")
    # LLaVA's checks of ids and mask, with no images: the visual tokens are counted below.
    inputs, _ = _llava.model_inputs(cfg, np.where(np.asarray(input_ids) == cfg.image_token_id, 0, input_ids),
                                    None, attention_mask, dtype=dtype)
    ids = np.asarray(input_ids).astype(np.int32)
    inputs["input_ids"] = ids
    is_visual = (ids == cfg.image_token_id) & inputs["attention_mask"]
    per_row = is_visual.sum(1)
    layouts, grids, rows_feat = [], [], []
    crops = [] if text_only else _crops(cfg, pixel_values, sizes)
    k = 0
    offset = 0  # crops before this image
    p = cfg.base_grid ** 2
    for i, want in enumerate(per_row):
        got, row_layout, row_grid, row_feat = 0, [], [], []
        while got < want and k < len(sizes):
            feats, slots, grid = image_slots(cfg, sizes[k])
            row_feat.append(np.where(feats < 0, -1, feats + offset * p))
            row_layout.append(slots)
            row_grid.append(grid)
            got += len(slots)
            offset += len(crops[k])
            k += 1
        if got != want:
            raise InputError(f"row {i} of input_ids holds {int(want)} image tokens but its images need {got} "
                             f"(image sizes {sizes}); expand each <image> with the LLaVA-NeXT processor")
        layouts.append(row_layout)
        grids.append(row_grid)
        rows_feat.append(row_feat)
    if k != len(sizes):
        raise InputError(f"{len(sizes)} image(s) were given but input_ids hold image tokens for {k}")
    n_crops = offset
    if not text_only:
        padded = -(-n_crops // cfg.max_crops) * cfg.max_crops
        pv = np.concatenate(crops)
        pv = np.concatenate([pv, np.zeros((padded - n_crops, *pv.shape[1:]), pv.dtype)])
        if not np.isfinite(pv).all():
            raise InputError("pixel_values hold NaN or infinite values; check the image files and the preprocessing")
        inputs["pixel_values"] = pv.astype(dtype)
        newline = padded * p
        index = np.zeros(ids.shape, np.int32)
        for i, row_feat in enumerate(rows_feat):
            if row_feat:
                f = np.concatenate(row_feat)
                index[i, np.flatnonzero(is_visual[i])] = np.where(f < 0, newline, f)
        inputs["feature_index"] = index
    n = slot_bucket(int(per_row.max(initial=0)), slot_bucket_size)
    spans = build_spans(is_visual, layouts, n)
    for i, row_grid in enumerate(grids):
        if row_grid:
            g = np.concatenate(row_grid)
            spans.grid[i, :len(g)] = g
    return inputs, spans


def preset_fields(cfg: LlavaNextConfig) -> dict:
    t, v = cfg.text, cfg.vision
    return {
        "family": "llava_next", "text.model_type": cfg.text_model_type, "text.num_layers": t.num_layers,
        "text.hidden_size": t.hidden_size, "text.vocab_size": t.vocab_size, "text.num_heads": t.num_heads,
        "text.num_kv_heads": t.num_kv_heads, "text.intermediate_size": t.intermediate_size,
        "vision.image_size": v.image_size, "vision.patch_size": v.patch_size, "vision.hidden_size": v.hidden_size,
    }


def weight_table(cfg: LlavaNextConfig):
    from ep_jax import hf

    return hf.weight_table(cfg) + [hf.Entry("image_newline", ("image_newline",), "copy")]


def processor(path, cfg: LlavaNextConfig):
    from ep_jax.families.llava_next.processing import AnyResImageProcessor, NextProcessor
    from ep_jax.tokenizer import load_tokenizer

    image_processor = AnyResImageProcessor.from_dir(path)
    return NextProcessor(load_tokenizer(path), image_processor, patch_size=cfg.vision.patch_size,
                         image_seq_len=cfg.base_grid ** 2)


def _read(*a, **k):
    from ep_jax import hf

    return hf.read_hf_weights(*a, **k, table=weight_table(a[1]))


def _export(params, cfg):
    from ep_jax import hf

    return hf.iter_hf_export(params, cfg, table=weight_table(cfg))


def _count(cfg) -> int:
    from ep_jax import hf

    return len(hf._expand(weight_table(cfg)))


FAMILY = register(Family(
    name="llava_next",
    config_from_hf=LlavaNextConfig.from_hf_dict,
    config_from_json_dict=LlavaNextConfig.from_json_dict,
    module=LlavaNext,
    read_hf_weights=_read,
    iter_hf_export=_export,
    hf_tensor_count=_count,
    processor=processor,
    inputs=model_inputs,
    decoder_layer_bytes=_llava.decoder_layer_bytes,
    preset_fields=preset_fields,
    default_template="vicuna_v1",
))
