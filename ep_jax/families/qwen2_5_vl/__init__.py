"""Qwen2.5-VL (`model_type` "qwen2_5_vl"): window-attention ViT, 2x2 patch merger, Qwen2 decoder
with M-RoPE. Host side: config, weight table (hub `model.*` / `visual.*` / `lm_head.*` and
transformers-5's `model.language_model.*` / `model.visual.*`), model inputs and visual spans.

Static shapes: the batch's patches are padded to a multiple of `vision.PATCH_BUCKET` (1,024), the
visual slots n to a multiple of LLaVA-NeXT's `SLOT_BUCKET` (256 merged tokens: the same bucket);
positions [3, b, s] are transformers' `get_rope_index`, computed here on the host.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from ep_jax import hf as _hf
from ep_jax.core.spans import ImageSlots, VisualSpans, build_spans
from ep_jax.errors import InputError
from ep_jax.families import llava as _llava
from ep_jax.families.base import Family, register
from ep_jax.families.llava_next import slot_bucket
import ep_jax.families.qwen2_5_vl.vision as _vision
from ep_jax.families.qwen2_5_vl.config import Qwen25VLConfig
from ep_jax.families.qwen2_5_vl.model import Qwen25VL
from ep_jax.hf import Entry


def image_slots(cfg: Qwen25VLConfig, grid_thw) -> ImageSlots:
    """One image's visual tokens: its merged (t, h/2, w/2) grid in raster order."""
    m = cfg.vision.spatial_merge_size
    t, h, w = int(grid_thw[0]), int(grid_thw[1]) // m, int(grid_thw[2]) // m
    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    return ImageSlots(np.stack([tt, hh, ww], -1).reshape(-1, 3).astype(np.int32), (t, h, w))


def rope_index(cfg: Qwen25VLConfig, input_ids, attention_mask, grids) -> np.ndarray:
    """transformers' `Qwen2_5_VLModel.get_rope_index` for images: positions [3, b, s] (0 at padding).
    Text counts on from the running position; an image's tokens take (start + t, start + h,
    start + w) on its merged grid and the text after it starts at start + max(h, w)."""
    ids = np.asarray(input_ids)
    valid = np.asarray(attention_mask, bool)
    m = cfg.vision.spatial_merge_size
    out = np.zeros((3,) + ids.shape, np.int32)
    images = iter(grids)
    for i in range(ids.shape[0]):
        where = np.flatnonzero(valid[i])
        row = ids[i, where]
        pos, k, parts = 0, 0, []
        while k < len(row):
            if row[k] != cfg.image_token_id:
                end = k
                while end < len(row) and row[end] != cfg.image_token_id:
                    end += 1
                parts.append(np.broadcast_to(np.arange(pos, pos + end - k), (3, end - k)))
                pos += end - k
                k = end
                continue
            t, h, w = (int(x) for x in next(images))
            h, w = h // m, w // m
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
            parts.append(np.stack([tt, hh, ww]).reshape(3, -1) + pos)
            pos += max(h, w)
            k += t * h * w
        out[:, i, where] = np.concatenate(parts, 1)[:, :len(where)]
    return out


def _text_checks(cfg: Qwen25VLConfig) -> SimpleNamespace:
    """The fields LLaVA's `model_inputs` reads, for its checks of input_ids and attention_mask
    only (no image token id matches: the visual tokens are counted here)."""
    return SimpleNamespace(text=cfg.text, image_token_id=-1, image_seq_len=1, vision=SimpleNamespace(grid_size=1),
                           vision_feature_select_strategy="default")


def model_inputs(cfg: Qwen25VLConfig, input_ids, pixel_values=None, attention_mask=None, *, image_grid_thw=None,
                 mm_token_type_ids=None, dtype=np.float32, patch_bucket_size: int | None = None,
                 slot_bucket_size: int | None = None) -> tuple[dict, VisualSpans]:
    """Checked arrays as transformers' Qwen2_5_VLProcessor returns them (`pixel_values`
    [patches, c*t*p*p], `image_grid_thw` [images, 3]) -> (inputs, visual spans).
    `mm_token_type_ids` is accepted and not needed (the image tokens are read from the ids)."""
    text_only = pixel_values is None or not len(pixel_values)
    if image_grid_thw is None:  # ep_jax's processor: the pixels carry their grids (`ep_jax.processing.TaggedPixels`)
        image_grid_thw = getattr(pixel_values, "image_grid_thw", None)
    inputs, _ = _llava.model_inputs(_text_checks(cfg), input_ids, None, attention_mask, dtype=dtype)
    ids, valid = inputs["input_ids"], inputs["attention_mask"]
    is_visual = (ids == cfg.image_token_id) & valid
    per_row = is_visual.sum(1)
    if not text_only and image_grid_thw is None:
        raise InputError("Qwen2.5-VL needs image_grid_thw ([num_images, 3]) with pixel_values")
    grids = [] if text_only else np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    unit = cfg.vision.merge_unit
    tokens = [int(np.prod(g)) // unit for g in grids]
    layouts, k = [], 0
    for i, want in enumerate(per_row):
        got, row = 0, []
        while got < want and k < len(grids):
            row.append(image_slots(cfg, grids[k]))
            got += tokens[k]
            k += 1
        if got != want:
            raise InputError(f"row {i} of input_ids holds {int(want)} image tokens but its images need {got} "
                             "(image_grid_thw.prod() // 4 each); expand each <|image_pad|> with the processor")
        layouts.append(row)
    if k != len(grids):
        raise InputError(f"{len(grids)} image(s) were given but input_ids hold image tokens for {k}")
    if text_only:
        pos = np.maximum(np.cumsum(valid, 1) - 1, 0).astype(np.int32)
        inputs["mrope_positions"] = np.broadcast_to(pos, (3,) + pos.shape).copy()
    else:
        pv = np.asarray(pixel_values)
        patches = int(sum(int(np.prod(g)) for g in grids))
        if pv.ndim != 2 or pv.shape != (patches, cfg.vision.patch_dim):
            raise InputError(f"pixel_values of shape {pv.shape}: the images of grids {grids.tolist()} need "
                             f"[{patches}, {cfg.vision.patch_dim}]")
        if not np.isfinite(pv).all():
            raise InputError("pixel_values hold NaN or infinite values; check the image files and the preprocessing")
        padded = _vision.patch_bucket(patches, patch_bucket_size)
        lay = _vision.layout(grids, cfg.vision, padded)
        inputs["pixel_values"] = np.concatenate([pv, np.zeros((padded - patches, pv.shape[1]), pv.dtype)]).astype(dtype)
        inputs.update(vision_perm=lay.perm, vision_pos=lay.pos, vision_full_segment=lay.full_segment,
                      vision_window_segment=lay.window_segment)
        index = np.zeros(ids.shape, np.int32)
        index[is_visual] = lay.merged_row  # row-major: the batch's image tokens in image order
        inputs["feature_index"] = index
        inputs["mrope_positions"] = rope_index(cfg, ids, valid, grids)
    n = slot_bucket(int(per_row.max(initial=0)), slot_bucket_size)
    return inputs, build_spans(is_visual, layouts, n)


def weight_table(cfg: Qwen25VLConfig) -> list[Entry]:
    t, v = cfg.text, cfg.vision
    vb, tl = "visual.blocks.{i}.", "model.layers.{i}."
    nv, nt = v.depth, t.num_layers
    e = [
        Entry("visual.patch_embed.proj.weight", ("vision", "patch"), "conv3d"),
        Entry("visual.merger.ln_q.weight", ("vision", "merge_norm", "scale"), "copy"),
        Entry("visual.merger.mlp.0.weight", ("vision", "merge1"), "linear"),
        Entry("visual.merger.mlp.0.bias", ("vision", "merge1_bias"), "copy"),
        Entry("visual.merger.mlp.2.weight", ("vision", "merge2"), "linear"),
        Entry("visual.merger.mlp.2.bias", ("vision", "merge2_bias"), "copy"),
        Entry(vb + "norm1.weight", ("vision", "blocks", "norm1", "scale"), "copy", nv),
        Entry(vb + "norm2.weight", ("vision", "blocks", "norm2", "scale"), "copy", nv),
        Entry(vb + "attn.qkv.weight", ("vision", "blocks", "qkv"), "linear", nv),
        Entry(vb + "attn.qkv.bias", ("vision", "blocks", "qkv_bias"), "copy", nv),
        Entry(vb + "attn.proj.weight", ("vision", "blocks", "proj"), "linear", nv),
        Entry(vb + "attn.proj.bias", ("vision", "blocks", "proj_bias"), "copy", nv),
        Entry("model.embed_tokens.weight", ("embed",), "copy"),
        Entry("model.norm.weight", ("norm", "scale"), "copy"),
        Entry(tl + "input_layernorm.weight", ("layers", "input_norm", "scale"), "copy", nt),
        Entry(tl + "post_attention_layernorm.weight", ("layers", "post_norm", "scale"), "copy", nt),
        Entry(tl + "self_attn.o_proj.weight", ("layers", "attn", "o"), "heads_out", nt),
    ]
    for ours in ("gate", "up", "down"):
        e.append(Entry(vb + f"mlp.{ours}_proj.weight", ("vision", "blocks", "mlp", ours), "linear", nv))
        e.append(Entry(vb + f"mlp.{ours}_proj.bias", ("vision", "blocks", "mlp", ours + "_bias"), "copy", nv))
        e.append(Entry(tl + f"mlp.{ours}_proj.weight", ("layers", "mlp", ours), "linear", nt))
    for ours in ("q", "k", "v"):
        e.append(Entry(tl + f"self_attn.{ours}_proj.weight", ("layers", "attn", ours), "heads_in", nt))
        e.append(Entry(tl + f"self_attn.{ours}_proj.bias", ("layers", "attn", ours + "_bias"), "head_bias", nt))
    if not t.tie_word_embeddings:
        e.append(Entry("lm_head.weight", ("lm_head",), "linear"))
    return e


_RENAMES = {"model.language_model.": "model.", "model.visual.": "visual."}


def hub_name(key: str) -> str | None:
    """The hub name of a checkpoint key (transformers-5 `model.language_model.*` /
    `model.visual.*` -> `model.*` / `visual.*`); None for buffers."""
    if _hf._IGNORED.search(key):
        return None
    prefix = next((p for p in _RENAMES if key.startswith(p)), None)
    return key if prefix is None else _RENAMES[prefix] + key[len(prefix):]


def preset_fields(cfg: Qwen25VLConfig) -> dict:
    t, v = cfg.text, cfg.vision
    return {
        "family": "qwen2_5_vl", "text.num_layers": t.num_layers, "text.hidden_size": t.hidden_size,
        "text.vocab_size": t.vocab_size, "text.num_heads": t.num_heads, "text.num_kv_heads": t.num_kv_heads,
        "text.intermediate_size": t.intermediate_size, "vision.depth": v.depth, "vision.hidden_size": v.hidden_size,
        "vision.patch_size": v.patch_size,
    }


def processor(path, cfg: Qwen25VLConfig):
    from ep_jax.families.qwen2_5_vl.processing import QwenProcessor

    return QwenProcessor.from_dir(path, cfg)


FAMILY = register(Family(
    name="qwen2_5_vl",
    config_from_hf=Qwen25VLConfig.from_hf_dict,
    config_from_json_dict=Qwen25VLConfig.from_json_dict,
    module=Qwen25VL,
    read_hf_weights=lambda *a, **k: _hf.read_hf_weights(*a, **k, table=weight_table(a[1]), name_of=hub_name),
    iter_hf_export=lambda params, cfg: _hf.iter_hf_export(params, cfg, table=weight_table(cfg)),
    hf_tensor_count=lambda cfg: len(_hf._expand(weight_table(cfg))),
    processor=processor,
    inputs=model_inputs,
    decoder_layer_bytes=_llava.decoder_layer_bytes,
    preset_fields=preset_fields,
    default_template="qwen2_5_vl",
))
