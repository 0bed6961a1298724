"""LLaMA decoder: RoPE, grouped-query attention with a KV cache, SwiGLU MLP.

Einsum letters: B batch, T query length, S key length, N query heads, K kv heads,
H head dim, D model width, F MLP width, V vocabulary (see `layers.py`).

Positions are always passed explicitly: after pruning, kept tokens keep their original
RoPE positions, so positions have gaps and cannot be derived from array indices.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from ep_jax.config import TextConfig
from ep_jax.nn.attention import attention
from ep_jax.nn.layers import RMSNorm, activation, dense, param
from ep_jax.nn.partition import constrain


def rope(x: Float[Array, "b t n h"], positions: Int[Array, "b t"], cfg: TextConfig) -> Float[Array, "b t n h"]:
    """Rotary embedding, Hugging Face `rotate_half` convention, optional linear scaling.
    With `cfg.mrope_section` (M-RoPE, Qwen2-VL), positions are [3, b, t] (temporal, height,
    width) and frequency band i of the sections takes its angles from row i % 3."""
    h = x.shape[-1]
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    pos = positions.astype(jnp.float32)
    if cfg.rope_scaling_factor is not None:
        pos = pos / cfg.rope_scaling_factor
    angles = pos[..., None] * inv_freq  # [b, t, h/2] ([3, b, t, h/2] for M-RoPE)
    if cfg.mrope_section is not None:
        row = np.repeat(np.arange(len(cfg.mrope_section)) % 3, cfg.mrope_section)  # [h/2]
        angles = jnp.moveaxis(angles, 0, -1)[..., np.arange(h // 2), row]  # [b, t, h/2]
    angles = jnp.concatenate([angles, angles], -1)[:, :, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], -1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class Projections:
    """Layer inputs the prune stage can score: q/k/v before RoPE (RoPE does not change
    the token-wise entropy, docs/ALGORITHM.md §2)."""

    query: Float[Array, "b t n h"]
    key: Float[Array, "b t k h"]
    value: Float[Array, "b t k h"]


jax.tree_util.register_dataclass(Projections, data_fields=["query", "key", "value"], meta_fields=[])


class Attention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.cfg = cfg
        self.q = param(rngs, (d, n, h), dtype)
        self.k = param(rngs, (d, k, h), dtype)
        self.v = param(rngs, (d, k, h), dtype)
        self.o = param(rngs, (n, h, d), dtype)
        if cfg.attention_bias:
            self.q_bias = param(None, (n, h), dtype)
            self.k_bias = param(None, (k, h), dtype)
            self.v_bias = param(None, (k, h), dtype)
        if cfg.attention_o_bias:
            self.o_bias = param(None, (d,), dtype)

    def project(self, x: Float[Array, "b t d"]) -> Projections:
        q = dense(x, self.q[...], "btd,dnh->btnh")
        k = dense(x, self.k[...], "btd,dkh->btkh")
        v = dense(x, self.v[...], "btd,dkh->btkh")
        if self.cfg.attention_bias:
            q, k, v = q + self.q_bias[...], k + self.k_bias[...], v + self.v_bias[...]
        return Projections(q, k, v)

    def output(self, attn: Float[Array, "b t n h"]) -> Float[Array, "b t d"]:
        out = dense(attn, self.o[...], "btnh,nhd->btd")
        if self.cfg.attention_o_bias:
            out = out + self.o_bias[...]
        return out


class MLP(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate = param(rngs, (d, f), dtype)
        self.up = param(rngs, (d, f), dtype)
        self.down = param(rngs, (f, d), dtype)
        self.bias = cfg.mlp_bias
        if cfg.mlp_bias:
            self.gate_bias = param(None, (f,), dtype)
            self.up_bias = param(None, (f,), dtype)
            self.down_bias = param(None, (d,), dtype)
        self.act = cfg.hidden_act

    def __call__(self, x: Float[Array, "b t d"]) -> Float[Array, "b t d"]:
        gate = dense(x, self.gate[...], "btd,df->btf")
        up = dense(x, self.up[...], "btd,df->btf")
        if self.bias:
            gate, up = gate + self.gate_bias[...], up + self.up_bias[...]
        out = dense(activation(self.act)(gate) * up, self.down[...], "btf,fd->btd")
        return out + self.down_bias[...] if self.bias else out


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.post_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)

    def qkv(
        self, x: Float[Array, "b t d"], positions: Int[Array, "b t"]
    ) -> tuple[Array, Array, Array, Projections]:
        """Queries and keys with RoPE applied, values, and the raw projections."""
        proj = self.attn.project(self.input_norm(x))
        q = constrain(rope(proj.query, positions, self.cfg), "batch", None, "heads", None)
        k = constrain(rope(proj.key, positions, self.cfg), "batch", None, "kv_heads", None)
        return q, k, constrain(proj.value, "batch", None, "kv_heads", None), proj

    def finish(
        self,
        x: Float[Array, "b t d"],
        q: Float[Array, "b t n h"],
        keys: Float[Array, "b s k h"],
        values: Float[Array, "b s k h"],
        mask: Bool[Array, "b t s"],
        causal: bool = False,
    ) -> Float[Array, "b t d"]:
        """Attention over the given keys (fresh ones in prefill, the cache in decode) + MLP.
        `causal`: the keys are the queries' own tokens and `mask` is causal in array order."""
        x = x + self.attn.output(attention(q, keys, values, mask, causal=causal))
        return x + self.mlp(self.post_norm(x))

    def __call__(
        self, x: Float[Array, "b t d"], positions: Int[Array, "b t"], mask: Bool[Array, "b t t"]
    ) -> tuple[Float[Array, "b t d"], tuple[Array, Array], Projections]:
        """Prefill: the tokens attend to each other. Returns (output, (keys, values), projections)."""
        q, k, v, proj = self.qkv(x, positions)
        return self.finish(x, q, k, v, mask, causal=True), (k, v), proj
