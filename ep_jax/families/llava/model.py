"""The LLaVA-1.5 module: CLIP vision tower + MLP projector + LLaMA decoder, as a runtime family.

    pixels -> vision tower -> projector ----------------.
    input_ids -> token embeddings -> merge at <image> slots -> x, positions [b, s]

`embed_inputs` is all the runtime needs to start; the layer stack, the prune stage between its two
segments, decode and the KV cache live in `ep_jax/runtime/` and know no family.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from ep_jax.config import LlavaConfig
from ep_jax.nn.clip import VisionTower
from ep_jax.nn.layers import RMSNorm, activation, dense, param, stacked
from ep_jax.nn.llama import DecoderLayer, rope


def decoder_layers(make, num_layers: int, rngs: nnx.Rngs, layout: str):
    """The decoder layers in a weight layout: "stacked" (one array per weight with a leading
    layer axis, run under `lax.scan`) or "per_layer" (`nnx.List`, a loop unrolled in the graph);
    see `nn.layers.scan_layers` and `runtime.model.LAYOUTS`."""
    if layout == "stacked":
        return stacked(make, num_layers, rngs)
    if layout == "per_layer":
        return nnx.List([make(rngs) for _ in range(num_layers)])
    raise ValueError(f"layout {layout!r}: choose 'stacked' or 'per_layer'")


class Llava(nnx.Module):
    def __init__(self, cfg: LlavaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs, layout: str = "stacked"):
        self.cfg = cfg
        t = cfg.text
        self.vision = VisionTower(cfg.vision, dtype=dtype, rngs=rngs)
        dv, d = cfg.vision.hidden_size, t.hidden_size
        self.proj1, self.proj1_bias = param(rngs, (dv, d), dtype), param(None, (d,), dtype)
        self.proj2, self.proj2_bias = param(rngs, (d, d), dtype), param(None, (d,), dtype)
        self.embed = param(rngs, (t.vocab_size, d), dtype)
        self.layers = decoder_layers(lambda r: DecoderLayer(t, dtype=dtype, rngs=r), t.num_layers, rngs, layout)
        self.norm = RMSNorm(d, t.rms_norm_eps, dtype)
        if not t.tie_word_embeddings:
            self.lm_head = param(rngs, (d, t.vocab_size), dtype)

    @property
    def num_layers(self) -> int:
        return self.cfg.text.num_layers

    # ------------------------------------------------------------------ embeddings
    def image_features(self, pixels: Float[Array, "i c hh ww"]) -> Float[Array, "i n d"]:
        """Vision tower at `vision_feature_layer`, CLS dropped unless strategy 'full', projected."""
        feats = self.vision(pixels, self.cfg.vision_layers_used)
        if self.cfg.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]
        h = dense(feats, self.proj1[...], "ipv,vd->ipd") + self.proj1_bias[...]
        h = activation(self.cfg.projector_hidden_act)(h)
        return dense(h, self.proj2[...], "ipd,de->ipe") + self.proj2_bias[...]

    def embed_tokens(self, ids: Int[Array, "..."]) -> Float[Array, "... d"]:
        return jnp.take(self.embed[...], ids, axis=0, mode="clip")

    def merge(self, input_ids: Int[Array, "b s"], image_features: Float[Array, "i n d"] | None) -> Float[Array, "b s d"]:
        """Token embeddings with the image features written, in order, at the <image> slots.

        The k-th image slot of the flattened batch takes the k-th feature row (as Hugging Face
        does), so each example can hold any number of images anywhere.
        """
        x = self.embed_tokens(input_ids)
        if image_features is None:
            return x
        is_image = input_ids == self.cfg.image_token_id
        flat = image_features.reshape(-1, image_features.shape[-1]).astype(x.dtype)
        slot = jnp.cumsum(is_image.reshape(-1)) - 1
        merged = jnp.take(flat, jnp.clip(slot, 0, flat.shape[0] - 1), axis=0).reshape(x.shape)
        return jnp.where(is_image[..., None], merged, x)

    def embed_inputs(self, inputs: dict) -> tuple[Float[Array, "b s d"], Int[Array, "b s"]]:
        """(merged embeddings, RoPE positions). Positions count real tokens only, so padding on
        either side changes nothing."""
        pixels = inputs.get("pixel_values")
        x = self.merge(inputs["input_ids"], None if pixels is None else self.image_features(pixels))
        valid = inputs["attention_mask"].astype(bool)
        positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)
        return x, positions

    # ------------------------------------------------------------------ decoder pieces
    def rope(self, x: Float[Array, "b t n h"], positions: Int[Array, "b t"]) -> Float[Array, "b t n h"]:
        return rope(x, positions, self.cfg.text)

    def decode_positions(self, next_position: Int[Array, "b"]) -> Int[Array, "b 1"]:
        return next_position[:, None]

    def logits(self, h: Float[Array, "... d"]) -> Float[Array, "... v"]:
        h = self.norm(h)
        if self.cfg.text.tie_word_embeddings:
            return jnp.einsum("...d,vd->...v", h, self.embed[...], preferred_element_type=jnp.float32)
        return jnp.einsum("...d,dv->...v", h, self.lm_head[...], preferred_element_type=jnp.float32)
