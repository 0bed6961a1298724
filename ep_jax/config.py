"""Model configuration: frozen, hashable dataclasses usable as static `jit` arguments.

Built from (and written back to) a Hugging Face LLaVA `config.json`; `hf.py` owns the weight
names, this file owns the hyper-parameters.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

_SUPPORTED_TEXT_MODELS = ("llama", "mistral", "vicuna")


from ep_jax.errors import ConfigError  # noqa: E402,F401  (one class for every config error)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """CLIP ViT vision tower."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """LLaMA-style decoder."""

    vocab_size: int = 32064
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling_factor: float | None = None  # `linear` RoPE scaling: positions / factor
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    o_bias: bool | None = None  # bias on the attention output; None: as `attention_bias` (Qwen2: False)
    mrope_section: tuple[int, ...] | None = None  # M-RoPE (Qwen2-VL): positions [3, b, s], rows per section

    @property
    def attention_o_bias(self) -> bool:
        return self.attention_bias if self.o_bias is None else self.o_bias


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    image_token_id: int = 32000
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"  # "default" drops CLS, "full" keeps it
    pad_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = 2
    bos_token_id: int | None = 1

    @property
    def image_seq_len(self) -> int:
        """Visual tokens one image contributes to the decoder (576 for LLaVA-1.5)."""
        extra = 1 if self.vision_feature_select_strategy == "full" else 0
        return self.vision.num_patches + extra

    @property
    def vision_layers_used(self) -> int:
        """How many CLIP encoder layers must run to produce the selected feature layer."""
        n = self.vision.num_layers
        layer = self.vision_feature_layer
        return layer + n + 1 if layer < 0 else layer

    @property
    def eos_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    # ------------------------------------------------------------------ HF interop
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "LlavaConfig":
        if d.get("model_type") not in (None, "llava"):
            raise ConfigError(
                f"config.json has model_type={d.get('model_type')!r}; ep_jax runs 'llava' "
                "checkpoints (e.g. llava-hf/llava-1.5-7b-hf)."
            )
        v = d.get("vision_config") or {}
        t = d.get("text_config") or {}
        if v.get("model_type", "clip_vision_model") not in ("clip_vision_model", "clip"):
            raise ConfigError(f"vision_config.model_type={v.get('model_type')!r} is not CLIP")
        if t.get("model_type", "llama") not in _SUPPORTED_TEXT_MODELS:
            raise ConfigError(f"text_config.model_type={t.get('model_type')!r} is not LLaMA-like")
        layer = d.get("vision_feature_layer", -2)
        if not isinstance(layer, int):
            raise ConfigError(f"vision_feature_layer={layer!r}: only a single int layer is supported")
        strategy = d.get("vision_feature_select_strategy", "default")
        if strategy not in ("default", "full"):
            raise ConfigError(f"vision_feature_select_strategy={strategy!r} (want default|full)")

        vision = VisionConfig(
            hidden_size=v.get("hidden_size", 1024),
            intermediate_size=v.get("intermediate_size", 4096),
            num_layers=v.get("num_hidden_layers", 24),
            num_heads=v.get("num_attention_heads", 16),
            image_size=v.get("image_size", 336),
            patch_size=v.get("patch_size", 14),
            num_channels=v.get("num_channels", 3),
            layer_norm_eps=v.get("layer_norm_eps", 1e-5),
            hidden_act=v.get("hidden_act", "quick_gelu"),
        )
        num_heads = t.get("num_attention_heads", 32)
        hidden = t.get("hidden_size", 4096)
        scaling = _rope_scaling(t)
        text = TextConfig(
            vocab_size=t.get("vocab_size", 32064),
            hidden_size=hidden,
            intermediate_size=t.get("intermediate_size", 11008),
            num_layers=t.get("num_hidden_layers", 32),
            num_heads=num_heads,
            num_kv_heads=t.get("num_key_value_heads") or num_heads,
            head_dim=t.get("head_dim") or hidden // num_heads,
            rms_norm_eps=t.get("rms_norm_eps", 1e-5),
            rope_theta=_rope_theta(t),
            rope_scaling_factor=scaling,
            max_position_embeddings=t.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", t.get("tie_word_embeddings", False))),
            attention_bias=bool(t.get("attention_bias", False)),
            mlp_bias=bool(t.get("mlp_bias", False)),
            hidden_act=t.get("hidden_act", "silu"),
        )
        eos = t.get("eos_token_id", d.get("eos_token_id", 2))
        if isinstance(eos, list):
            eos = tuple(eos)
        return cls(
            vision=vision,
            text=text,
            image_token_id=d.get("image_token_id", d.get("image_token_index", 32000)),
            projector_hidden_act=d.get("projector_hidden_act", "gelu"),
            projector_bias=bool(d.get("multimodal_projector_bias", True)),
            vision_feature_layer=layer,
            vision_feature_select_strategy=strategy,
            pad_token_id=d.get("pad_token_id", t.get("pad_token_id")),
            eos_token_id=eos,
            bos_token_id=t.get("bos_token_id", d.get("bos_token_id", 1)),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> "LlavaConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path} not found: a LLaVA checkpoint directory has a config.json") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_hf_dict(d)

    def to_hf_dict(self) -> dict[str, Any]:
        v, t = self.vision, self.text
        text = {
            "model_type": "llama",
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_layers,
            "num_attention_heads": t.num_heads,
            "num_key_value_heads": t.num_kv_heads,
            "head_dim": t.head_dim,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta,
            "max_position_embeddings": t.max_position_embeddings,
            "tie_word_embeddings": t.tie_word_embeddings,
            "attention_bias": t.attention_bias,
            "mlp_bias": t.mlp_bias,
            "hidden_act": t.hidden_act,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
        }
        if t.rope_scaling_factor is not None:
            text["rope_scaling"] = {"rope_type": "linear", "factor": t.rope_scaling_factor}
        return {
            "model_type": "llava",
            "architectures": ["LlavaForConditionalGeneration"],
            "vision_config": {
                "model_type": "clip_vision_model",
                "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size,
                "num_hidden_layers": v.num_layers,
                "num_attention_heads": v.num_heads,
                "image_size": v.image_size,
                "patch_size": v.patch_size,
                "num_channels": v.num_channels,
                "layer_norm_eps": v.layer_norm_eps,
                "hidden_act": v.hidden_act,
                "projection_dim": v.hidden_size,
            },
            "text_config": text,
            "image_token_index": self.image_token_id,
            "projector_hidden_act": self.projector_hidden_act,
            "multimodal_projector_bias": self.projector_bias,
            "vision_feature_layer": self.vision_feature_layer,
            "vision_feature_select_strategy": self.vision_feature_select_strategy,
            "tie_word_embeddings": t.tie_word_embeddings,
            "pad_token_id": self.pad_token_id,
        }

    def to_json_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json_dict(cls, d: dict[str, Any]) -> "LlavaConfig":
        d = dict(d)
        eos = d.get("eos_token_id")
        if isinstance(eos, list):
            d["eos_token_id"] = tuple(eos)
        return cls(vision=VisionConfig(**d.pop("vision")), text=TextConfig(**d.pop("text")), **d)


def _rope_params(t: dict[str, Any]) -> dict[str, Any]:
    # transformers 5 moved rope settings into `rope_parameters`; older configs use rope_scaling.
    return t.get("rope_parameters") or t.get("rope_scaling") or {}


def _rope_theta(t: dict[str, Any]) -> float:
    return float(_rope_params(t).get("rope_theta", t.get("rope_theta", 10000.0)))


def _rope_scaling(t: dict[str, Any]) -> float | None:
    p = _rope_params(t)
    kind = p.get("rope_type", p.get("type", "default"))
    if kind == "default":
        return None
    if kind == "linear":
        return float(p["factor"])
    raise ConfigError(f"text_config rope type {kind!r} is not supported (default and linear are)")
