"""Tiny random Hugging Face LLaVA checkpoints, built locally and saved in the *hub* layout.

Test-only (imports torch). Each builder returns the directory it wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

IMAGE_TOKEN = "<image>"

_CORPUS = [
    "A chat between a curious human and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "USER: ASSISTANT: What is in the image? Describe the photo in detail.",
    "How many circles are there? What colour is the square? Is there a red triangle?",
    "the cat sits on a mat near the window; a woman in a space suit holds a helmet.",
    "coffee cup, rocket, astronaut, flag, table, yes, no, one two three four five six.",
]


def build_tokenizer(out_dir: Path, vocab_size: int = 300):
    """A small byte-level BPE tokenizer with <s>, </s>, <unk>, <pad> and <image>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    from tokenizers import processors
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    fast.save_pretrained(out_dir)
    return fast


def tiny_config_dict(
    *,
    vocab_size: int,
    image_token_id: int,
    pad_token_id: int,
    num_kv_heads: int = 4,
    vision_feature_layer: int = -2,
    strategy: str = "default",
    text_layers: int = 4,
    tie: bool = False,
    image_size: int = 32,
    patch_size: int = 8,
    head_dim: int | None = None,
    text_extra: dict | None = None,
) -> dict:
    """The config.json of a tiny LLaVA; `text_extra` adds or overrides text_config entries
    (e.g. attention_bias, mlp_bias, rope_scaling)."""
    text = {
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": text_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": num_kv_heads,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": tie,
        "pad_token_id": pad_token_id,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    if head_dim is not None:
        text["head_dim"] = head_dim
    if text_extra:
        text.update(text_extra)
    return {
        "model_type": "llava",
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "image_size": image_size,
            "patch_size": patch_size,
            "projection_dim": 32,
        },
        "text_config": text,
        "image_token_index": image_token_id,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": vision_feature_layer,
        "vision_feature_select_strategy": strategy,
        "tie_word_embeddings": tie,
        "pad_token_id": pad_token_id,
    }


def hub_state_dict(model) -> dict:
    """transformers 5 state dict renamed to the hub layout of llava-hf checkpoints."""
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("model.language_model."):
            k = "language_model.model." + k[len("model.language_model."):]
        elif k.startswith("model.vision_tower."):
            k = "vision_tower.vision_model." + k[len("model.vision_tower."):]
        elif k.startswith("model.multi_modal_projector."):
            k = "multi_modal_projector." + k[len("model.multi_modal_projector."):]
        elif k.startswith("lm_head."):
            k = "language_model." + k
        out[k] = v.detach().contiguous().clone()
    return out


def build_tiny_llava(out_dir: Path, *, seed: int = 0, shards: int = 2, layout: str = "hub", **cfg_kw):
    """Write a random tiny LLaVA (config, sharded safetensors, tokenizer, processor) to out_dir.

    layout: "hub" (llava-hf names) or "v5" (transformers 5 save_pretrained names).
    Returns (out_dir, torch_model, processor).
    """
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out_dir)
    image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    cfg = tiny_config_dict(
        vocab_size=len(tok), image_token_id=image_token_id, pad_token_id=tok.pad_token_id, **cfg_kw
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(LlavaConfig(**_config_kwargs(cfg))).eval()
    # Random init leaves norms at 1 and biases at 0; perturb them so parity tests see them.
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name or "layrnorm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.mul_(2.0)  # wider logits make greedy decoding less tie-prone
    state = hub_state_dict(model) if layout == "hub" else {
        k: v.detach().contiguous().clone() for k, v in model.state_dict().items()
    }
    if cfg["tie_word_embeddings"]:
        state = {k: v for k, v in state.items() if "lm_head" not in k}
    names = sorted(state)
    chunks = np.array_split(np.arange(len(names)), shards)
    weight_map = {}
    for i, idx in enumerate(chunks):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {names[j]: state[names[j]] for j in idx}
        save_file(part, str(out_dir / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1)
    )
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=1))
    v = cfg["vision_config"]
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": v["image_size"]},
        crop_size={"height": v["image_size"], "width": v["image_size"]},
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=v["patch_size"],
        vision_feature_select_strategy=cfg["vision_feature_select_strategy"],
        num_additional_image_tokens=1, image_token=IMAGE_TOKEN,
    )
    processor.save_pretrained(out_dir)
    return out_dir, model, processor


def _config_kwargs(cfg: dict) -> dict:
    from transformers import CLIPVisionConfig, LlamaConfig

    kw = {k: v for k, v in cfg.items() if k not in ("vision_config", "text_config", "model_type")}
    kw["vision_config"] = CLIPVisionConfig(**{k: v for k, v in cfg["vision_config"].items() if k != "model_type"})
    kw["text_config"] = LlamaConfig(**{k: v for k, v in cfg["text_config"].items() if k != "model_type"})
    return kw


# ---------------------------------------------------------------------- LLaVA-NeXT
TINY_PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]


def build_tiny_llava_next(out_dir: Path, *, seed: int = 0, text: str = "llama", layout: str = "hub", **cfg_kw):
    """A random tiny LlavaNextForConditionalGeneration (32-px crops, 8-px patches: a 4x4 base grid,
    AnyRes pinpoints up to 3 tiles) with its LlavaNextProcessor (the PIL image processor).
    text: "llama" or "mistral" (sliding_window null). Returns (out_dir, torch_model, processor)."""
    import torch
    from safetensors.torch import save_file
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessorPil, LlavaNextProcessor, MistralConfig)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out_dir)
    image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    extra = {**cfg_kw.pop("text_extra", {}),
             **({"model_type": "mistral", "sliding_window": None} if text == "mistral" else {})}
    cfg = tiny_config_dict(vocab_size=len(tok), image_token_id=image_token_id, pad_token_id=tok.pad_token_id,
                           text_extra=extra, **cfg_kw)
    cfg["model_type"] = "llava_next"
    cfg["image_grid_pinpoints"] = TINY_PINPOINTS
    kw = {k: v for k, v in cfg.items() if k not in ("vision_config", "text_config", "model_type")}
    kw["vision_config"] = CLIPVisionConfig(**{k: v for k, v in cfg["vision_config"].items() if k != "model_type"})
    text_cls = MistralConfig if text == "mistral" else LlamaConfig
    kw["text_config"] = text_cls(**{k: v for k, v in cfg["text_config"].items() if k != "model_type"})
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(LlavaNextConfig(**kw)).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name or "layrnorm" in name or "image_newline" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.mul_(2.0)
    if layout == "hub":
        state = hub_state_dict(model)
        state["image_newline"] = state.pop("model.image_newline")
    else:
        state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    if cfg["tie_word_embeddings"]:
        state = {k: v for k, v in state.items() if "lm_head" not in k}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg["architectures"] = ["LlavaNextForConditionalGeneration"]
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=1))
    v = cfg["vision_config"]
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": v["image_size"]}, crop_size={"height": v["image_size"], "width": v["image_size"]},
        image_grid_pinpoints=TINY_PINPOINTS,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=v["patch_size"],
        vision_feature_select_strategy=cfg["vision_feature_select_strategy"], num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
    )
    processor.save_pretrained(out_dir)
    return out_dir, model, processor


# ---------------------------------------------------------------------- Qwen2.5-VL
QWEN_VOCAB = 300
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
QWEN_PAD, QWEN_EOS, QWEN_VSTART, QWEN_VEND, QWEN_IMAGE, QWEN_VIDEO = 0, 2, 3, 4, 5, 6


def build_qwen_tokenizer(out_dir: Path):
    """A small byte-level BPE tokenizer with Qwen's special tokens at ids 0..6."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=QWEN_VOCAB, special_tokens=QWEN_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4 + ["system user assistant You are a helpful assistant."] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   extra_special_tokens={"image_token": "<|image_pad|>"})
    fast.save_pretrained(out_dir)
    return fast


def qwen2_5_vl_config_dict(*, tie: bool = False, text_layers: int = 8) -> dict:
    """The hub's flat config.json of a tiny Qwen2.5-VL (text fields at the top level)."""
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "vocab_size": QWEN_VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": text_layers,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "max_position_embeddings": 1024, "tie_word_embeddings": tie, "hidden_act": "silu",
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "image_token_id": QWEN_IMAGE, "video_token_id": QWEN_VIDEO, "vision_start_token_id": QWEN_VSTART,
        "vision_end_token_id": QWEN_VEND, "bos_token_id": None, "eos_token_id": QWEN_EOS, "pad_token_id": QWEN_PAD,
        "vision_config": {"depth": 4, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2, "in_chans": 3,
                          "patch_size": 14, "temporal_patch_size": 2, "spatial_merge_size": 2, "window_size": 56,
                          "out_hidden_size": 64, "fullatt_block_indexes": [1, 3], "hidden_act": "silu",
                          "tokens_per_second": 2},
    }


def build_tiny_qwen2_5_vl(out_dir: Path, *, seed: int = 0, layout: str = "hub", tie: bool = False):
    """A random tiny Qwen2_5_VLForConditionalGeneration saved with the flat hub config.json and
    hub weight names (`model.*`, `visual.*`, `lm_head.*`; layout "v5": transformers 5's).
    Returns (out_dir, torch_model)."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    flat = qwen2_5_vl_config_dict(tie=tie)
    text = {k: v for k, v in flat.items() if k not in ("vision_config", "architectures", "model_type",
                                                      "rope_scaling")}
    text["rope_parameters"] = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
    build_qwen_tokenizer(out_dir)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=flat["vision_config"],
                              image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO, vision_start_token_id=QWEN_VSTART,
                              vision_end_token_id=QWEN_VEND, tie_word_embeddings=tie)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name or "ln_q" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.mul_(2.0)
    state = {}
    for k, v in model.state_dict().items():
        if layout == "hub":
            if k.startswith("model.language_model."):
                k = "model." + k[len("model.language_model."):]
            elif k.startswith("model.visual."):
                k = "visual." + k[len("model.visual."):]
        state[k] = v.detach().contiguous().clone()
    if tie:
        state = {k: v for k, v in state.items() if "lm_head" not in k}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(flat, indent=1))
    from transformers import Qwen2VLImageProcessorPil

    Qwen2VLImageProcessorPil().save_pretrained(out_dir)
    return out_dir, model
