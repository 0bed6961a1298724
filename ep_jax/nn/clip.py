"""CLIP ViT vision tower (pre-LN encoder, quick_gelu), as LLaVA uses it.

Einsum letters: B images, P patches (+1 for CLS), N heads, H head dim, D width, F MLP width.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from ep_jax.config import VisionConfig
from ep_jax.nn.layers import LayerNorm, activation, attend, dense, param, scan_layers, stacked


class VisionLayer(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        d, n, h, f = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size
        self.norm1 = LayerNorm(d, cfg.layer_norm_eps, dtype)
        self.q, self.q_bias = param(rngs, (d, n, h), dtype), param(None, (n, h), dtype)
        self.k, self.k_bias = param(rngs, (d, n, h), dtype), param(None, (n, h), dtype)
        self.v, self.v_bias = param(rngs, (d, n, h), dtype), param(None, (n, h), dtype)
        self.o, self.o_bias = param(rngs, (n, h, d), dtype), param(None, (d,), dtype)
        self.norm2 = LayerNorm(d, cfg.layer_norm_eps, dtype)
        self.fc1, self.fc1_bias = param(rngs, (d, f), dtype), param(None, (f,), dtype)
        self.fc2, self.fc2_bias = param(rngs, (f, d), dtype), param(None, (d,), dtype)
        self.act = cfg.hidden_act

    def __call__(self, x: Float[Array, "b p d"]) -> Float[Array, "b p d"]:
        y = self.norm1(x)
        q = dense(y, self.q[...], "bpd,dnh->bpnh") + self.q_bias[...]
        k = dense(y, self.k[...], "bpd,dnh->bpnh") + self.k_bias[...]
        v = dense(y, self.v[...], "bpd,dnh->bpnh") + self.v_bias[...]
        x = x + dense(attend(q, k, v, None), self.o[...], "bpnh,nhd->bpd") + self.o_bias[...]
        y = self.norm2(x)
        y = activation(self.act)(dense(y, self.fc1[...], "bpd,df->bpf") + self.fc1_bias[...])
        return x + dense(y, self.fc2[...], "bpf,fd->bpd") + self.fc2_bias[...]


class VisionTower(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        c, p, d = cfg.num_channels, cfg.patch_size, cfg.hidden_size
        self.patch = param(rngs, (c, p, p, d), dtype)  # a stride-p conv without bias
        self.cls = param(rngs, (d,), dtype)
        self.pos = param(rngs, (cfg.num_patches + 1, d), dtype)
        self.pre_norm = LayerNorm(d, cfg.layer_norm_eps, dtype)
        self.layers = stacked(lambda r: VisionLayer(cfg, dtype=dtype, rngs=r), cfg.num_layers, rngs)
        # Unused by LLaVA (it reads an inner layer) but kept so a round trip to HF is lossless.
        self.post_norm = LayerNorm(d, cfg.layer_norm_eps, dtype)

    def __call__(self, pixels: Float[Array, "b c hh ww"], num_layers: int) -> Float[Array, "b p d"]:
        """Hidden state after `num_layers` encoder layers (0 = the embeddings after pre-LN),
        i.e. Hugging Face's `hidden_states[num_layers]`. CLS token first."""
        cfg = self.cfg
        b, c, hh, ww = pixels.shape
        if (hh, ww) != (cfg.image_size, cfg.image_size) or c != cfg.num_channels:
            raise ValueError(
                f"pixel_values have shape {pixels.shape[1:]}, the vision tower expects "
                f"{(cfg.num_channels, cfg.image_size, cfg.image_size)}"
            )
        g, p = cfg.grid_size, cfg.patch_size
        patches = pixels.astype(self.patch[...].dtype).reshape(b, c, g, p, g, p)
        x = jnp.einsum("bcyixj,cijd->byxd", patches, self.patch[...], preferred_element_type=jnp.float32)
        x = x.reshape(b, g * g, -1).astype(self.patch[...].dtype)
        cls = jnp.broadcast_to(self.cls[...], (b, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.pos[...]
        x = self.pre_norm(x)
        x, _ = scan_layers(self.layers, 0, num_layers, lambda layer, h, _: (layer(h), None), x)
        return x
