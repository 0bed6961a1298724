"""The LLaVA-NeXT module: LLaVA's CLIP tower, projector and LLaMA decoder (`families.llava.model.Llava`)
plus the learned `image_newline` row, merged in transformers' AnyRes order.

    crops [C, 3, side, side] -> vision tower -> projector -> features [C * g*g, d] (+ image_newline row)
    input_ids -> token embeddings; each <image> slot takes the feature row `feature_index[b, s]`

The host (`families.llava_next.model_inputs`) computes `feature_index` from the image sizes: base
grid first, then the un-padded tile grid row by row with the newline row after each row.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ep_jax.families.llava.model import Llava
from ep_jax.families.llava_next.config import LlavaNextConfig
from ep_jax.nn.layers import param


class LlavaNext(Llava):
    def __init__(self, cfg: LlavaNextConfig, *, dtype=jnp.float32, rngs, layout: str = "stacked"):
        super().__init__(cfg, dtype=dtype, rngs=rngs, layout=layout)
        self.image_newline = param(None, (cfg.text.hidden_size,), dtype)

    def embed_inputs(self, inputs: dict) -> tuple[Float[Array, "b s d"], Int[Array, "b s"]]:
        """(merged embeddings, RoPE positions): LLaVA's text embeddings and positions, then the
        AnyRes feature row `feature_index` at every <image> slot."""
        ids = inputs["input_ids"]
        x, positions = super().embed_inputs({"input_ids": ids, "attention_mask": inputs["attention_mask"]})
        pixels = inputs.get("pixel_values")
        if pixels is not None:
            feats = self.image_features(pixels)
            flat = feats.reshape(-1, feats.shape[-1]).astype(x.dtype)
            flat = jnp.concatenate([flat, self.image_newline[...][None].astype(x.dtype)], axis=0)
            rows = jnp.take(flat, inputs["feature_index"], axis=0, mode="clip")
            x = jnp.where((ids == self.cfg.image_token_id)[..., None], rows, x)
        return x, positions
