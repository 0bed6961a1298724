"""LLaVA-1.5 (`model_type` "llava"): CLIP ViT + MLP projector + LLaMA decoder.

The host side of the family: its config, weight table (`ep_jax/hf.py`), processor, model
inputs and visual spans. The module is `model.Llava`.
"""

from __future__ import annotations

import numpy as np

from ep_jax.config import LlavaConfig
from ep_jax.core.spans import ImageSlots, VisualSpans, build_spans
from ep_jax.errors import InputError
from ep_jax.families.base import Family, register
from ep_jax.families.llava.model import Llava


def image_slots(cfg: LlavaConfig) -> ImageSlots:
    """The tokens of one image: a CLS token first under strategy "full", then the patch grid."""
    return ImageSlots.square(cfg.vision.grid_size, leading=int(cfg.vision_feature_select_strategy == "full"))


def model_inputs(cfg: LlavaConfig, input_ids, pixel_values=None, attention_mask=None, *,
                 dtype=np.float32) -> tuple[dict, VisualSpans]:
    """Checked arrays as Hugging Face's LlavaProcessor returns them -> (inputs, visual spans).
    Rows may hold different numbers of images (or none)."""
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2 or not np.issubdtype(input_ids.dtype, np.integer):
        raise InputError(f"input_ids must be integer [batch, seq], got {input_ids.dtype} shape {input_ids.shape}")
    input_ids = input_ids.astype(np.int32)
    if attention_mask is None:
        attention_mask = np.ones_like(input_ids)
    attention_mask = np.asarray(attention_mask)
    if attention_mask.shape != input_ids.shape:
        raise InputError(f"attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}")
    attention_mask = attention_mask.astype(bool)
    if not attention_mask.any(axis=1).all():
        raise InputError(f"rows {np.flatnonzero(~attention_mask.any(axis=1)).tolist()} of attention_mask hold no "
                         "real token")
    if input_ids.max(initial=0) >= cfg.text.vocab_size or input_ids.min(initial=0) < 0:
        raise InputError(f"input_ids hold ids outside the vocabulary [0, {cfg.text.vocab_size})")
    is_visual = (input_ids == cfg.image_token_id) & attention_mask
    per_row = is_visual.sum(1)
    n_img = 0 if pixel_values is None else len(pixel_values)
    seq = cfg.image_seq_len
    if int(per_row.sum()) != n_img * seq or np.any(per_row % seq):
        raise InputError(
            f"input_ids hold {per_row.tolist()} image tokens per row but {n_img} image(s) x {seq} visual tokens "
            "were given; expand each <image> to image_seq_len tokens (the Processor does)"
        )
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if pixel_values is not None and n_img:
        pixel_values = np.asarray(pixel_values)
        want = (cfg.vision.num_channels, cfg.vision.image_size, cfg.vision.image_size)
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != want:
            raise InputError(f"pixel_values must be [num_images, {want[0]}, {want[1]}, {want[2]}], got {pixel_values.shape}")
        if not np.isfinite(pixel_values).all():
            raise InputError("pixel_values hold NaN or infinite values; check the image files and the preprocessing")
        inputs["pixel_values"] = pixel_values.astype(dtype)
    slots = image_slots(cfg)
    layouts = [[slots] * (int(n) // seq) for n in per_row]
    return inputs, build_spans(is_visual, layouts, max(int(per_row.max(initial=0)), 1))


def decoder_layer_bytes(cfg: LlavaConfig, dtype) -> int:
    """Bytes of one decoder layer's matrices (attention q, k, v, o and the three MLP ones)."""
    t = cfg.text
    attention = t.hidden_size * t.head_dim * (2 * t.num_heads + 2 * t.num_kv_heads)
    return (attention + 3 * t.hidden_size * t.intermediate_size) * np.dtype(dtype).itemsize


def preset_fields(cfg: LlavaConfig) -> dict:
    t, v = cfg.text, cfg.vision
    return {
        "text.num_layers": t.num_layers, "text.hidden_size": t.hidden_size, "text.vocab_size": t.vocab_size,
        "text.num_heads": t.num_heads, "vision.image_size": v.image_size, "vision.patch_size": v.patch_size,
        "vision.hidden_size": v.hidden_size, "image_seq_len": cfg.image_seq_len,
    }


def processor(path, cfg: LlavaConfig):
    from ep_jax.processing import Processor

    return Processor.from_dir(path, image_seq_len=cfg.image_seq_len)


def _hf():
    from ep_jax import hf

    return hf


FAMILY = register(Family(
    name="llava",
    config_from_hf=LlavaConfig.from_hf_dict,
    config_from_json_dict=LlavaConfig.from_json_dict,
    module=Llava,
    read_hf_weights=lambda *a, **k: _hf().read_hf_weights(*a, **k),
    iter_hf_export=lambda *a, **k: _hf().iter_hf_export(*a, **k),
    hf_tensor_count=lambda cfg: len(_hf()._expand(_hf().weight_table(cfg))),
    processor=processor,
    inputs=model_inputs,
    decoder_layer_bytes=decoder_layer_bytes,
    preset_fields=preset_fields,
    default_template="vicuna_v1",
))
