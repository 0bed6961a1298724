"""Qwen2.5-VL's vision tower under static shapes, and its host-side layout (NumPy).

    patches [P, c*t*p*p] --(Conv3d as a matmul)--> [P, d] --(window order)--> blocks
        (2-D rotary, RMSNorm, window attention or full attention by segment masks, gated MLP)
        --> 2x2 patch merger [P/4, out] (still in window order)

The host (`layout`) computes, for a batch of images of any sizes, every index the graph needs:
the window permutation of the patches, their (h, w) rotary positions, the segment ids of full
attention (one per image) and of window attention (one per window), and where each merged token
lands (the inverse of the window order). P is padded to a bucket: padding patches form one
segment of their own and are never read back.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from ep_jax.config import TextConfig
from ep_jax.families.qwen2_5_vl.config import QwenVisionConfig
from ep_jax.nn.layers import RMSNorm, attend, dense, param, scan_layers, stacked
from ep_jax.nn.llama import MLP

PATCH_BUCKET = 1024  # patches of a batch are padded to a multiple of this: 4 x the slot bucket (256
# merged tokens), so both buckets change together (50 random photo sizes: 5 graphs, 26.5 % patch padding;
# 256 would give 17 graphs and 5.9 %)
_PAD_SEGMENT = -1
QUERY_BLOCK = 1024  # vision attention runs queries in blocks of this many: scores [heads, block, P] at a time


def patch_bucket(p: int, bucket: int | None = None) -> int:
    bucket = PATCH_BUCKET if bucket is None else bucket
    return max(bucket, -(-int(p) // bucket) * bucket)


# ---------------------------------------------------------------------- host side
def window_index(grid_thw, cfg: QwenVisionConfig) -> tuple[np.ndarray, np.ndarray]:
    """transformers' `get_vision_window_index` for one image: (merge-unit order [t*h*w/4],
    window id of each merge unit in that order)."""
    t, h, w = (int(x) for x in grid_thw)
    m = cfg.spatial_merge_size
    win = cfg.window_size // m // cfg.patch_size
    gh, gw = h // m, w // m
    index = np.arange(t * gh * gw).reshape(t, gh, gw)
    ph, pw = win - gh % win, win - gw % win
    nh, nw = (gh + ph) // win, (gw + pw) // win
    padded = np.pad(index, ((0, 0), (0, ph), (0, pw)), constant_values=-100)
    padded = padded.reshape(t, nh, win, nw, win).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, win * win)
    window = np.broadcast_to(np.arange(t * nh * nw).reshape(t, nh * nw, 1), padded.shape)
    keep = padded != -100
    return padded[keep], window[keep]


def rotary_positions(grid_thw, m: int) -> np.ndarray:
    """transformers' vision position ids [t*h*w, 2] (h, w), block-major over m x m merge blocks."""
    t, h, w = (int(x) for x in grid_thw)
    hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    shape = (h // m, m, w // m, m)
    hp = hh.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    wp = ww.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    return np.tile(np.stack([hp, wp], 1), (t, 1))


@dataclasses.dataclass(frozen=True)
class VisionLayout:
    perm: np.ndarray  # int32 [P]: patch read at each window-ordered row
    pos: np.ndarray  # int32 [P, 2]: (h, w) rotary positions, window order
    full_segment: np.ndarray  # int32 [P]: image of each row (-1 padding)
    window_segment: np.ndarray  # int32 [P]: window of each row (-1 padding)
    merged_row: np.ndarray  # int32 [tokens]: merged row of each visual token in image order


def layout(grids, cfg: QwenVisionConfig, padded: int) -> VisionLayout:
    """Indices of a batch of images (grid_thw [i, 3], patches in the processor's order)."""
    unit = cfg.merge_unit
    perm, pos, full, window, merged = [], [], [], [], []
    patches = units = windows = 0
    for i, g in enumerate(grids):
        order, win = window_index(g, cfg)
        n = int(np.prod(g))
        rows = (order[:, None] * unit + np.arange(unit)).reshape(-1)
        perm.append(rows + patches)
        pos.append(rotary_positions(g, cfg.spatial_merge_size)[rows])
        full.append(np.full(n, i))
        _, win = np.unique(win, return_inverse=True)
        window.append(np.repeat(win + windows, unit))
        merged.append(np.argsort(order) + units)
        patches, units, windows = patches + n, units + n // unit, windows + int(win.max()) + 1
    pad = padded - patches
    cat = lambda parts, fill: np.concatenate(parts + [fill]).astype(np.int32)  # noqa: E731
    return VisionLayout(
        perm=cat(perm, np.arange(patches, padded)),
        pos=cat(pos, np.zeros((pad, 2), int)),
        full_segment=cat(full, np.full(pad, _PAD_SEGMENT)),
        window_segment=cat(window, np.full(pad, _PAD_SEGMENT)),
        merged_row=cat(merged, np.zeros(0, int)),
    )


# ---------------------------------------------------------------------- graph
def _rotate(x: Float[Array, "p n h"], cos: Float[Array, "p h"], sin: Float[Array, "p h"]) -> Float[Array, "p n h"]:
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], -1)
    return (x32 * cos[:, None] + rotated * sin[:, None]).astype(x.dtype)


class VisionBlock(nnx.Module):
    def __init__(self, cfg: QwenVisionConfig, *, dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.norm1 = RMSNorm(d, 1e-6, dtype)
        self.norm2 = RMSNorm(d, 1e-6, dtype)
        self.qkv, self.qkv_bias = param(rngs, (d, 3 * d), dtype), param(None, (3 * d,), dtype)
        self.proj, self.proj_bias = param(rngs, (d, d), dtype), param(None, (d,), dtype)
        mlp = TextConfig(hidden_size=d, intermediate_size=cfg.intermediate_size, mlp_bias=True,
                         hidden_act=cfg.hidden_act)
        self.mlp = MLP(mlp, dtype=dtype, rngs=rngs)

    def __call__(self, x: Float[Array, "p d"], cos, sin, mask) -> Float[Array, "p d"]:
        p, d = x.shape
        qkv = dense(self.norm1(x), self.qkv[...], "pd,de->pe") + self.qkv_bias[...]
        q, k, v = jnp.moveaxis(qkv.reshape(p, 3, self.num_heads, -1), 1, 0)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        q, k, v, mask = q[None], k[None], v[None], mask[None]
        out = jnp.concatenate([attend(q[:, i:i + QUERY_BLOCK], k, v, mask[:, i:i + QUERY_BLOCK])
                               for i in range(0, p, QUERY_BLOCK)], axis=1)[0].reshape(p, d)
        x = x + dense(out, self.proj[...], "pd,de->pe") + self.proj_bias[...]
        return x + self.mlp(self.norm2(x)[None])[0]


class VisionTower(nnx.Module):
    def __init__(self, cfg: QwenVisionConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        d, c, out = cfg.hidden_size, cfg.merge_unit * cfg.hidden_size, cfg.out_hidden_size
        self.patch = param(rngs, (cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size, d),
                           dtype)
        self.blocks = stacked(lambda r: VisionBlock(cfg, dtype=dtype, rngs=r), cfg.depth, rngs)
        self.merge_norm = RMSNorm(d, 1e-6, dtype)
        self.merge1, self.merge1_bias = param(rngs, (c, c), dtype), param(None, (c,), dtype)
        self.merge2, self.merge2_bias = param(rngs, (c, out), dtype), param(None, (out,), dtype)

    def __call__(self, pixels: Float[Array, "p e"], perm: Int[Array, "p"], pos: Int[Array, "p 2"],
                 full_segment: Int[Array, "p"], window_segment: Int[Array, "p"]) -> Float[Array, "u o"]:
        """Merged visual tokens [P/4, out] in window order (the host maps them back)."""
        cfg = self.cfg
        w = self.patch[...]
        x = dense(pixels.astype(w.dtype), w.reshape(-1, w.shape[-1]), "pe,ed->pd")
        x = jnp.take(x, perm, axis=0)
        hd = cfg.head_dim // 2
        inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
        angles = (pos.astype(jnp.float32)[..., None] * inv_freq).reshape(pos.shape[0], -1)  # [p, hd]: h then w
        angles = jnp.concatenate([angles, angles], -1)
        cos, sin = jnp.cos(angles), jnp.sin(angles)
        full = full_segment[:, None] == full_segment[None, :]
        window = window_segment[:, None] == window_segment[None, :]
        flags = np.isin(np.arange(cfg.depth), cfg.fullatt_block_indexes)

        def body(block, h, is_full):
            return block(h, cos, sin, jnp.where(is_full, full, window)), None

        x, _ = scan_layers(self.blocks, 0, cfg.depth, body, x, flags)
        h = self.merge_norm(x).reshape(-1, cfg.merge_unit * cfg.hidden_size)
        h = jax.nn.gelu(dense(h, self.merge1[...], "uc,ce->ue") + self.merge1_bias[...], approximate=False)
        return dense(h, self.merge2[...], "uc,co->uo") + self.merge2_bias[...]
