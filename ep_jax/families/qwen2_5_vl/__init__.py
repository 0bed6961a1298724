"""Qwen2.5-VL (`model_type` "qwen2_5_vl"): window-attention ViT, 2x2 patch merger, Qwen2 decoder
with M-RoPE; images and videos. Host side: config, weight table (hub `model.*` / `visual.*` /
`lm_head.*` and transformers-5's `model.language_model.*` / `model.visual.*`), model inputs and
visual spans (`inputs.py`).

Static shapes: the batch's patches (images and video frames together) are padded to a multiple
of `vision.PATCH_BUCKET` (1,024; `VIDEO_PATCH_BUCKET`, 256, when the batch holds a video), the
visual slots n to a multiple of LLaVA-NeXT's `SLOT_BUCKET` (256 merged tokens: for images, the
same bucket as their 1,024 patches); positions [3, b, s] are transformers' `get_rope_index`,
computed on the host.
"""

from __future__ import annotations

from ep_jax import hf as _hf
from ep_jax.families import llava as _llava
from ep_jax.families.base import Family, register
from ep_jax.families.qwen2_5_vl.config import Qwen25VLConfig
from ep_jax.families.qwen2_5_vl.inputs import image_slots, model_inputs, rope_index, token_types  # noqa: F401
from ep_jax.families.qwen2_5_vl import vision as _vision
from ep_jax.families.qwen2_5_vl.model import Qwen25VL
from ep_jax.hf import Entry


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
    """The checkpoint's tokenizer, image processor and video processor."""
    from ep_jax.families.qwen2_5_vl.processing import QwenImageProcessor, QwenProcessor
    from ep_jax.families.qwen2_5_vl.video_processing import QwenVideoProcessor
    from ep_jax.tokenizer import load_tokenizer

    return QwenProcessor(load_tokenizer(path), QwenImageProcessor.from_dir(path),
                         video_processor=QwenVideoProcessor.from_dir(path))


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
    default_prune_layer=1,
    graph_settings=_vision.graph_settings,
))
