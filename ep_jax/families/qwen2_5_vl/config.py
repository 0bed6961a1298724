"""Qwen2.5-VL configuration: the Qwen2 decoder (bias on q/k/v, none on o; M-RoPE) as a
`TextConfig`, and the window-attention vision tower.

Reads the hub's flat config.json (`Qwen/Qwen2.5-VL-*-Instruct`: text fields at the top level,
`rope_scaling` {"type": "mrope", "mrope_section": [...]}) and transformers-5's nested form
(`text_config` with `rope_parameters`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ep_jax.config import TextConfig
from ep_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class QwenVisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    out_hidden_size: int = 3584
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    tokens_per_second: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size ** 2


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig:
    vision: QwenVisionConfig = QwenVisionConfig()
    text: TextConfig = TextConfig()
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    pad_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = 151645
    bos_token_id: int | None = 151643

    @property
    def eos_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return (self.eos_token_id,) if isinstance(self.eos_token_id, int) else tuple(self.eos_token_id)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "Qwen25VLConfig":
        if d.get("model_type") != "qwen2_5_vl":
            raise ConfigError(f"config.json has model_type={d.get('model_type')!r}, not 'qwen2_5_vl'")
        t = {**d, **(d.get("text_config") or {})}
        v = dict(d.get("vision_config") or {})
        rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
        if not isinstance(rope, dict) or "mrope_section" not in rope:
            raise ConfigError(f"rope_scaling/rope_parameters={rope!r}: Qwen2.5-VL needs M-RoPE's mrope_section")
        section = tuple(int(x) for x in rope["mrope_section"])
        heads = int(t["num_attention_heads"])
        head_dim = int(t.get("head_dim") or t["hidden_size"] // heads)
        if 2 * sum(section) != head_dim:
            raise ConfigError(f"mrope_section {list(section)} does not cover head_dim/2 = {head_dim // 2}")
        text = TextConfig(
            vocab_size=int(t["vocab_size"]), hidden_size=int(t["hidden_size"]),
            intermediate_size=int(t["intermediate_size"]), num_layers=int(t["num_hidden_layers"]),
            num_heads=heads, num_kv_heads=int(t.get("num_key_value_heads") or heads), head_dim=head_dim,
            rms_norm_eps=float(t.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", t.get("rope_theta", 1000000.0))),
            max_position_embeddings=int(t.get("max_position_embeddings", 128000)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", t.get("tie_word_embeddings", False))),
            attention_bias=True, o_bias=False, hidden_act=t.get("hidden_act", "silu"), mrope_section=section,
        )
        vrope = v.get("rope_parameters") or {}
        vision = QwenVisionConfig(
            depth=int(v.get("depth", 32)), hidden_size=int(v.get("hidden_size", 1280)),
            intermediate_size=int(v.get("intermediate_size", 3420)), num_heads=int(v.get("num_heads", 16)),
            in_channels=int(v.get("in_channels", v.get("in_chans", 3))), patch_size=int(v.get("patch_size", 14)),
            temporal_patch_size=int(v.get("temporal_patch_size", 2)),
            spatial_merge_size=int(v.get("spatial_merge_size", 2)), window_size=int(v.get("window_size", 112)),
            out_hidden_size=int(v.get("out_hidden_size", text.hidden_size)),
            fullatt_block_indexes=tuple(int(i) for i in v.get("fullatt_block_indexes", (7, 15, 23, 31))),
            hidden_act=v.get("hidden_act", "silu"), rope_theta=float(vrope.get("rope_theta", 10000.0)),
            tokens_per_second=int(v.get("tokens_per_second", 2)),
        )
        eos = t.get("eos_token_id", 151645)
        return cls(vision=vision, text=text, image_token_id=int(d.get("image_token_id", 151655)),
                   video_token_id=int(d.get("video_token_id", 151656)),
                   vision_start_token_id=int(d.get("vision_start_token_id", 151652)),
                   vision_end_token_id=int(d.get("vision_end_token_id", 151653)),
                   pad_token_id=t.get("pad_token_id"), eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
                   bos_token_id=t.get("bos_token_id"))

    def to_hf_dict(self) -> dict[str, Any]:
        """The hub's flat config.json."""
        t, v = self.text, self.vision
        return {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
            "vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_layers, "num_attention_heads": t.num_heads,
            "num_key_value_heads": t.num_kv_heads, "rms_norm_eps": t.rms_norm_eps, "rope_theta": t.rope_theta,
            "max_position_embeddings": t.max_position_embeddings, "tie_word_embeddings": t.tie_word_embeddings,
            "hidden_act": t.hidden_act,
            "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_section)},
            "image_token_id": self.image_token_id, "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id, "vision_end_token_id": self.vision_end_token_id,
            "pad_token_id": self.pad_token_id, "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "vision_config": {
                "depth": v.depth, "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
                "num_heads": v.num_heads, "in_chans": v.in_channels, "patch_size": v.patch_size,
                "temporal_patch_size": v.temporal_patch_size, "spatial_merge_size": v.spatial_merge_size,
                "window_size": v.window_size, "out_hidden_size": v.out_hidden_size,
                "fullatt_block_indexes": list(v.fullatt_block_indexes), "hidden_act": v.hidden_act,
                "tokens_per_second": v.tokens_per_second,
            },
        }

    def to_json_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json_dict(cls, d: dict[str, Any]) -> "Qwen25VLConfig":
        d = dict(d)
        text = dict(d.pop("text"))
        text["mrope_section"] = tuple(text["mrope_section"]) if text.get("mrope_section") else None
        vision = dict(d.pop("vision"))
        vision["fullatt_block_indexes"] = tuple(vision.get("fullatt_block_indexes", ()))
        if isinstance(d.get("eos_token_id"), list):
            d["eos_token_id"] = tuple(d["eos_token_id"])
        return cls(vision=QwenVisionConfig(**vision), text=TextConfig(**text), **d)
