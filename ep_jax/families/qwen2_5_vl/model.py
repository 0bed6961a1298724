"""The Qwen2.5-VL module: window-attention vision tower + Qwen2 decoder with M-RoPE.

    patches -> vision tower -> merged tokens (window order) --.
    input_ids -> token embeddings -> each <|image_pad|> / <|video_pad|> slot takes merged row
                 `feature_index[b, s]` (images and videos of the batch in one list of grids)
    positions [3, b, s]: transformers' `get_rope_index`, computed on the host (`mrope_positions`)

The decoder is LLaMA's (`nn.llama.DecoderLayer`) with bias on q/k/v only and M-RoPE
(`TextConfig.mrope_section`); embeddings, logits and the layer layouts are LLaVA's.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from ep_jax.families.llava.model import Llava, decoder_layers
from ep_jax.families.qwen2_5_vl.config import Qwen25VLConfig
from ep_jax.families.qwen2_5_vl.vision import VisionTower
from ep_jax.nn.layers import RMSNorm, param
from ep_jax.nn.llama import DecoderLayer


class Qwen25VL(Llava):
    def __init__(self, cfg: Qwen25VLConfig, *, dtype=jnp.float32, rngs: nnx.Rngs, layout: str = "stacked"):
        self.cfg = cfg
        t = cfg.text
        d = t.hidden_size
        self.vision = VisionTower(cfg.vision, dtype=dtype, rngs=rngs)
        self.embed = param(rngs, (t.vocab_size, d), dtype)
        self.layers = decoder_layers(lambda r: DecoderLayer(t, dtype=dtype, rngs=r), t.num_layers, rngs, layout)
        self.norm = RMSNorm(d, t.rms_norm_eps, dtype)
        if not t.tie_word_embeddings:
            self.lm_head = param(rngs, (d, t.vocab_size), dtype)

    def image_features(self, inputs: dict) -> Float[Array, "u d"]:
        return self.vision(inputs["pixel_values"], {k[len("vision_"):]: v for k, v in inputs.items()
                                                    if k.startswith("vision_")})

    def embed_inputs(self, inputs: dict) -> tuple[Float[Array, "b s d"], Int[Array, "3 b s"]]:
        ids = inputs["input_ids"]
        x = self.embed_tokens(ids)
        if inputs.get("pixel_values") is not None:
            feats = self.image_features(inputs).astype(x.dtype)
            rows = jnp.take(feats, inputs["feature_index"], axis=0, mode="clip")
            visual = (ids == self.cfg.image_token_id) | (ids == self.cfg.video_token_id)
            x = jnp.where(visual[..., None], rows, x)
        return x, inputs["mrope_positions"]

    def decode_positions(self, next_position: Int[Array, "b"]) -> Int[Array, "3 b 1"]:
        return jnp.broadcast_to(next_position[None, :, None], (3, next_position.shape[0], 1))
