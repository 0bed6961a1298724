"""LLaVA-NeXT (LLaVA-1.6, AnyRes) configuration: a LLaVA config plus the AnyRes grid pinpoints.

The text backbone is any LLaMA-shaped decoder (`llama`, Vicuna, `mistral` without an active
sliding window, Yi for the 34B); the vision tower and projector are LLaVA's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ep_jax.config import LlavaConfig
from ep_jax.errors import ConfigError

# transformers' LlavaNextConfig default (the llava-hf checkpoints list the same five, in pixels).
DEFAULT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


@dataclasses.dataclass(frozen=True)
class LlavaNextConfig(LlavaConfig):
    image_grid_pinpoints: tuple[tuple[int, int], ...] = DEFAULT_PINPOINTS  # (height, width) each
    text_model_type: str = "llama"

    @property
    def base_grid(self) -> int:
        """Side of one crop's patch grid (24 for CLIP ViT-L/14-336)."""
        return self.vision.image_size // self.vision.patch_size

    @property
    def max_crops(self) -> int:
        """Crops of the largest pinpoint plus the base view (5 for the llava-hf checkpoints)."""
        side = self.vision.image_size
        return 1 + max(-(-h // side) * -(-w // side) for h, w in self.image_grid_pinpoints)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "LlavaNextConfig":
        if d.get("model_type") != "llava_next":
            raise ConfigError(f"config.json has model_type={d.get('model_type')!r}, not 'llava_next'")
        t = dict(d.get("text_config") or {})
        kind = t.get("model_type", "llama")
        window = t.get("sliding_window")
        context = t.get("max_position_embeddings", 4096)
        if kind == "mistral" and window is not None and (not isinstance(window, int) or window < context):
            raise ConfigError(
                f"text_config.sliding_window={window!r} is smaller than the context ({context}): ep_jax runs "
                "Mistral as a full-attention LLaMA-shaped decoder only (sliding_window null or >= "
                "max_position_embeddings, as in llava-hf/llava-v1.6-mistral-7b-hf)")
        if kind not in ("llama", "mistral", "vicuna"):
            raise ConfigError(f"text_config.model_type={kind!r} is not a LLaMA-shaped decoder (llama, mistral)")
        strategy = d.get("vision_feature_select_strategy", "default")
        if strategy != "default":
            raise ConfigError(f"vision_feature_select_strategy={strategy!r}: LLaVA-NeXT tiles need 'default' "
                              "(the CLS token dropped)")
        pins = d.get("image_grid_pinpoints")
        if pins is None:
            pins = [list(p) for p in DEFAULT_PINPOINTS]
        if (not isinstance(pins, list) or not pins
                or not all(isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(v, int) and v > 0
                                                                                  for v in p) for p in pins)):
            raise ConfigError(f"image_grid_pinpoints={pins!r}: need a list of [height, width] pairs")
        if d.get("use_image_newline_parameter", True) is False:
            raise ConfigError("use_image_newline_parameter=false is not supported (LLaVA-NeXT has image_newline)")
        base = LlavaConfig.from_hf_dict({**d, "model_type": "llava", "text_config": {**t, "model_type": "llama"}})
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(LlavaConfig)}
        return cls(**fields, image_grid_pinpoints=tuple((int(h), int(w)) for h, w in pins), text_model_type=kind)

    def to_hf_dict(self) -> dict[str, Any]:
        d = super().to_hf_dict()
        d["model_type"] = "llava_next"
        d["architectures"] = ["LlavaNextForConditionalGeneration"]
        d["image_grid_pinpoints"] = [list(p) for p in self.image_grid_pinpoints]
        d["text_config"]["model_type"] = self.text_model_type if self.text_model_type != "vicuna" else "llama"
        return d

    @classmethod
    def from_json_dict(cls, d: dict[str, Any]) -> "LlavaNextConfig":
        pins = d.get("image_grid_pinpoints", DEFAULT_PINPOINTS)
        return super().from_json_dict({**d, "image_grid_pinpoints": tuple(tuple(int(v) for v in p) for p in pins)})
