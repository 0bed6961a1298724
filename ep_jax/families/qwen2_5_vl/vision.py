"""Qwen2.5-VL's vision tower under static shapes, and its host-side layout (NumPy).

    patches [P, c*t*p*p] --(Conv3d as a matmul)--> [P, d] --(window order)--> blocks
        (2-D rotary, RMSNorm, window attention or full attention by segment masks, gated MLP)
        --> 2x2 patch merger [P/4, out] (still in window order)

The host (`layout`) computes, for a batch of images and videos of any sizes, every index the
graph needs: the window permutation of the patches, their (h, w) rotary positions, the segment ids
of full attention (one per image, and one per temporal patch of a video: transformers'
`cu_seqlens`), where each merged token lands (the inverse of the window order), how the
full-attention layers run (`key_rows`: the key rows each block of queries reads, all P rows for
images, the mask built per block from the segment ids, never [P, P]; or, for a batch with a
video, `dense_segments`: its frame pairs as a batch of equal segments, each against itself), and
the windows as a batch of equal windows (`dense_windows`: each window's rows, at most 64 for
Qwen2.5-VL, so window attention costs 64 keys a query). P is padded to a bucket: padding
patches never reach a real one and are never read back. The host and the graph read QUERY_BLOCK
and SEGMENT_SCORES from this module at the same time: change them before preparing inputs. The
graph reads them and the others (`graph_settings`) when it is traced; they are part of the
compile cache's key, so a program compiled under other settings is never reused.

On CPU the graph is shaped for XLA:CPU's two-level parallelism (independent ops side by side on
its threads, each op's data best kept in cache): attention segments go in small groups
(CPU_GROUP_SCORES) and each block's MLP in chunks of ROW_CHUNK rows. On every backend each group
of segments rotates its own rows of q and k (ROTATE_IN_GROUPS), and the blocks run as a loop over
the period of the window/full pattern (`block_runs`), so the graph holds one copy of each.
`benchmarks/qwen_video_prefill.py` times the tower with each choice undone.
"""

from __future__ import annotations

import dataclasses
import functools

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
# merged tokens), so for images both buckets change together (50 random photo sizes: 5 graphs, 26.5 % patch padding;
# 256 would give 17 graphs and 5.9 %)
VIDEO_PATCH_BUCKET = 256  # ... and of this when the batch holds a video of several frame pairs
# (`has_frame_pairs`): its graph is already one per frame size (`dense_segments`' shape) and, from 1,024
# patches a frame pair, one per frame-pair count, so the finer bucket adds graphs only for smaller frames,
# and removes up to 768 padding patches
CPU_GROUP_SCORES = 256 * 1024  # on CPU, segment attention runs in groups of at most this many scores per head
# (64 windows a group; frame pairs of 512 patches or more one a group; `segment_attention`), elsewhere of
# SEGMENT_SCORES
ROTATE_IN_GROUPS = True  # segment attention rotates q and k group by group, after gathering them (`segment_attention`)
ROW_CHUNK = 1024  # on CPU, a block's out-projection and MLP run in chunks of this many rows (`VisionBlock`)
_PAD_SEGMENT = -1
QUERY_BLOCK = 1024  # full attention runs queries in blocks of this many: scores [heads, block, W] at a time
KEY_BUCKET = 1024  # a video batch's key band W is rounded up to a multiple of this (`key_rows`)
SEGMENT_SCORES = 4 * 1024 * 1024  # full attention by dense segments (`dense_segments`): at most this many
# scores per head at a time (and segments of at most its square root, 2,048 patches)


def patch_bucket(p: int, bucket: int | None = None, *, video: bool = False) -> int:
    """The padded patch count of a batch of `p` patches: a multiple of `bucket`, by default
    PATCH_BUCKET, or VIDEO_PATCH_BUCKET for a batch with a video (`has_frame_pairs`)."""
    bucket = bucket or (VIDEO_PATCH_BUCKET if video else PATCH_BUCKET)
    return max(bucket, -(-int(p) // bucket) * bucket)


# ---------------------------------------------------------------------- host side
def has_frame_pairs(grids) -> bool:
    """Whether a batch (grid_thw [i, 3]) holds a video of more than one temporal patch: its
    full-attention layers see each frame pair alone, and its patches take VIDEO_PATCH_BUCKET."""
    return any(int(g[0]) > 1 for g in grids)


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
    full_segment: np.ndarray  # int32 [P]: image (video: temporal patch) of each row (< 0: padding)
    merged_row: np.ndarray  # int32 [tokens]: merged row of each visual token in image order
    full_keys: np.ndarray  # int32 [ceil(P / QUERY_BLOCK), W]: the rows each block of queries attends over (full
    # layers by bands; [0, 1] when they go by dense segments)
    full_rows: np.ndarray  # int32 [segments, S]: the rows of each segment (-1: empty; [0, 1] when by bands)
    full_slot: np.ndarray  # int32 [P]: where each row sits in full_rows, flattened ([0] when by bands)
    window_rows: np.ndarray  # int32 [windows, S]: the rows of each window, S = its most patches (-1: empty)
    window_slot: np.ndarray  # int32 [P]: where each row sits in window_rows, flattened


def key_rows(segment: np.ndarray, width: int | None, block: int, bucket: int) -> np.ndarray:
    """int32 [blocks, W]: the key rows of each block of `block` queries. Segments (an image or
    a frame pair of a video for full attention, a window for window attention; each padding row
    alone) are contiguous in window order and no query sees past its own, so a block needs only
    the rows of the segments it touches. W: `width` (a bound on every block's range), else the
    widest range in this batch; rounded up to `bucket`, at most P; each block's W rows are
    shifted to stay inside [0, P)."""
    p = len(segment)
    firsts = range(0, p, block)
    cut = np.flatnonzero(np.diff(segment)) + 1
    starts, ends = np.concatenate([[0], cut]), np.concatenate([cut, [p]])
    owner = np.repeat(np.arange(len(starts)), ends - starts)
    lo = np.array([starts[owner[i]] for i in firsts])
    hi = np.array([ends[owner[min(i + block, p) - 1]] for i in firsts])
    width = int((hi - lo).max()) if width is None else width
    width = min(p, -(-width // bucket) * bucket)
    return (np.minimum(lo, p - width)[:, None] + np.arange(width)).astype(np.int32)


def dense_windows(window: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Window attention as a batch of equal windows: (int32 [windows, size] the rows of each
    window, -1 for an empty slot; int32 [P] the flat slot of each row). Windows are runs of
    equal ids in window order, at most `size` rows each (smaller at an image's edges). The number
    of windows is static per P bucket: P / size x 5/4 (50 random photo sizes need at most 1.25),
    more only for an unusual batch (e.g. very thin images: many small windows), then a multiple
    of 16. Padding rows (ids < 0) get no slot of their own: they read slot 0, a real row's
    output, and are never read back."""
    return _dense_runs(window, size, -(-(len(window) // size) * 5 // 4), 16)


def dense_segments(segment: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Full attention as a batch of equal segments (a video's frame pairs), as `dense_windows`;
    S is the longest segment rounded up to a multiple of 32, the number of segments a multiple of 4."""
    return _dense_runs(segment, None, 0, 4)


def _dense_runs(ids: np.ndarray, size: int | None, count: int, multiple: int) -> tuple[np.ndarray, np.ndarray]:
    """The runs of equal ids >= 0 as the rows of [count, size] (-1 where empty; `count` grows to
    a multiple of `multiple` when there are more runs; `size` None: the longest run rounded up to
    a multiple of 32) and the flat slot of each row (0 for ids < 0)."""
    real = np.flatnonzero(ids >= 0)
    key = ids[real]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    lengths = np.diff(np.r_[starts, len(key)])
    size = -(-int(lengths.max()) // 32) * 32 if size is None else size
    assert lengths.max() <= size, (lengths.max(), size)
    if len(starts) > count:
        count = -(-len(starts) // multiple) * multiple
    owner = np.repeat(np.arange(len(starts)), lengths)
    offset = np.arange(len(key)) - starts[owner]
    rows = np.full((count, size), -1, np.int32)
    rows[owner, offset] = real
    slot = np.zeros(len(ids), np.int32)
    slot[real] = owner * size + offset
    return rows, slot


def _full_attention_layout(full: np.ndarray, video: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(keys, rows, slot) of the full-attention layers. By bands (`key_rows`): every row for
    images (one segment per image: no narrower band; static per P bucket), or for a batch with a
    video, whose frame pairs are segments of their own, the widest range a block of queries
    touches. A batch with a video goes by dense segments instead (`dense_segments`: each frame
    pair against itself only) when those are at most SEGMENT_SCORES scores each and cost fewer
    scores than the bands (32 frames of 20 x 36 patches: 16 x 736^2 against 12 x 1024 x 3072)."""
    none = np.zeros((0, 1), np.int32)
    keys = key_rows(full, None if video else len(full), QUERY_BLOCK, KEY_BUCKET)
    if video:
        rows, slot = dense_segments(full)
        size = rows.shape[1]
        if size * size <= SEGMENT_SCORES and rows.size * size < keys.size * QUERY_BLOCK:
            return none, rows, slot
    return keys, none, np.zeros(0, np.int32)


def layout(grids, cfg: QwenVisionConfig, padded: int) -> VisionLayout:
    """Indices of a batch of images (grid_thw [i, 3], patches in the processor's order)."""
    unit = cfg.merge_unit
    perm, pos, full, window, merged = [], [], [], [], []
    patches = units = windows = frames = 0
    for g in grids:
        order, win = window_index(g, cfg)
        n, t = int(np.prod(g)), int(g[0])
        rows = (order[:, None] * unit + np.arange(unit)).reshape(-1)
        perm.append(rows + patches)
        pos.append(rotary_positions(g, cfg.spatial_merge_size)[rows])
        full.append(np.repeat(order // (n // unit // t) + frames, unit))  # full attention within a frame pair
        _, win = np.unique(win, return_inverse=True)
        window.append(np.repeat(win + windows, unit))
        merged.append(np.argsort(order) + units)
        patches, units, windows, frames = patches + n, units + n // unit, windows + int(win.max()) + 1, frames + t
    pad = padded - patches
    cat = lambda parts, fill: np.concatenate(parts + [fill]).astype(np.int32)  # noqa: E731
    alone = _PAD_SEGMENT - np.arange(pad)  # each padding row its own segment: attends to itself, never read back
    full, window = cat(full, alone), cat(window, alone)
    full_keys, full_rows, full_slot = _full_attention_layout(full, has_frame_pairs(grids))
    window_rows, window_slot = dense_windows(window, (cfg.window_size // cfg.patch_size) ** 2)
    return VisionLayout(
        perm=cat(perm, np.arange(patches, padded)),
        pos=cat(pos, np.zeros((pad, 2), int)),
        full_segment=full,
        merged_row=cat(merged, np.zeros(0, int)),
        full_keys=full_keys,
        full_rows=full_rows,
        full_slot=full_slot,
        window_rows=window_rows,
        window_slot=window_slot,
    )


# ---------------------------------------------------------------------- graph
def graph_settings() -> tuple:
    """The settings of this module the graph reads when it is traced (the family's
    `graph_settings`: part of the compile cache's key)."""
    return QUERY_BLOCK, SEGMENT_SCORES, CPU_GROUP_SCORES, ROW_CHUNK, ROTATE_IN_GROUPS


def _on_cpu() -> bool:
    """Whether the graph is shaped for XLA:CPU (CPU_GROUP_SCORES, ROW_CHUNK; see the module docstring)."""
    return jax.default_backend() == "cpu"


def _rotate(x: Float[Array, "... n h"], cos: Float[Array, "... h"],
            sin: Float[Array, "... h"]) -> Float[Array, "... n h"]:
    """The 2-D rotary embedding of rows x (every head), with each row's own cos and sin."""
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], -1)
    return (x32 * cos[..., None, :] + rotated * sin[..., None, :]).astype(x.dtype)


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

    def __call__(self, x: Float[Array, "p d"], rope, attention) -> Float[Array, "p d"]:
        """`attention(q, k, v, rope) -> out`, each [p, heads, head_dim], q and k not yet rotated
        (`rope`: (cos, sin) [p, head_dim]): `full_attention` or `segment_attention`."""
        p, d = x.shape
        qkv = dense(self.norm1(x), self.qkv[...], "pd,de->pe") + self.qkv_bias[...]
        q, k, v = jnp.moveaxis(qkv.reshape(p, 3, self.num_heads, -1), 1, 0)
        out = attention(q, k, v, rope).reshape(p, d)
        chunk = ROW_CHUNK if _on_cpu() else p
        return jnp.concatenate([self._after_attention(x[i:i + chunk], out[i:i + chunk]) for i in range(0, p, chunk)])

    def _after_attention(self, x: Float[Array, "p d"], out: Float[Array, "p d"]) -> Float[Array, "p d"]:
        """Out-projection, residual, gated MLP: row by row, so on CPU they run in chunks of
        ROW_CHUNK rows, which XLA:CPU runs side by side on its threads, each chunk's MLP
        activations in cache: a faster tower than one [P, d] matmul each (timed by
        `benchmarks/qwen_video_prefill.py`)."""
        x = x + dense(out, self.proj[...], "pd,de->pe") + self.proj_bias[...]
        return x + self.mlp(self.norm2(x)[None])[0]


def full_attention(q, k, v, rope, segment: Int[Array, "p"], keys: Int[Array, "blocks w"],
                   rows: Int[Array, "n s"], slot: Int[Array, "p"]):
    """Attention within segments (an image, a video's frame pair). By dense segments when the
    layout gives them (`rows` not empty: `segment_attention`); else q and k rotated by `rope`,
    and queries in blocks of QUERY_BLOCK, block j against its band of key rows `keys[j]`
    (contiguous: `key_rows`), read as a slice; a band of every row is the array itself."""
    if rows.shape[0]:
        return segment_attention(q, k, v, rope, rows, slot)
    q, k = _rotate(q, *rope), _rotate(k, *rope)
    p, width = q.shape[0], keys.shape[1]
    out = []
    for j, i in enumerate(range(0, p, QUERY_BLOCK)):
        band = (lambda a: a) if width == p else \
            (lambda a, j=j: jax.lax.dynamic_slice_in_dim(a, keys[j, 0], width, axis=0))
        mask = segment[i:i + QUERY_BLOCK, None] == band(segment)[None, :]
        out.append(attend(q[None, i:i + QUERY_BLOCK], band(k)[None], band(v)[None], mask[None]))
    return jnp.concatenate(out, axis=1)[0]


def segment_attention(q, k, v, rope, rows: Int[Array, "n s"], slot: Int[Array, "p"]):
    """Attention within each segment (a window, or a frame pair in the full layers), as a batch
    of equal segments (`dense_windows`, `dense_segments`): q, k, v gathered into [n, S, ...],
    empty slots masked out, the result read back by `slot`. The segments go in groups of at
    most SEGMENT_SCORES scores per head, or on CPU CPU_GROUP_SCORES: XLA:CPU runs small groups
    side by side on its threads with their scores in cache. Each group rotates its own rows of q
    and k (`rope`: (cos, sin) gathered with them), so the rotation, too, runs group by group,
    side by side, where it otherwise ran on every row before the gathers (`ROTATE_IN_GROUPS`;
    both timed by `benchmarks/qwen_video_prefill.py`)."""
    if not ROTATE_IN_GROUPS:
        q, k = _rotate(q, *rope), _rotate(k, *rope)
    size = rows.shape[1]
    budget = CPU_GROUP_SCORES if _on_cpu() else SEGMENT_SCORES
    group = max(1, budget // (size * size))
    take = lambda a, r: jnp.take(a, jnp.maximum(r, 0), axis=0)  # noqa: E731
    out = []
    for i in range(0, rows.shape[0], group):
        r = rows[i:i + group]
        valid = r >= 0
        qr, kr = take(q, r), take(k, r)
        if ROTATE_IN_GROUPS:
            cos, sin = take(rope[0], r), take(rope[1], r)
            qr, kr = _rotate(qr, cos, sin), _rotate(kr, cos, sin)
        o = attend(qr, kr, take(v, r), valid[:, :, None] & valid[:, None, :])
        out.append(o.reshape(-1, *o.shape[2:]))
    return jnp.take(jnp.concatenate(out) if len(out) > 1 else out[0], slot, axis=0)


def block_runs(cfg: QwenVisionConfig) -> tuple[list[tuple[int, int, bool]], int]:
    """The runs of window layers and of full-attention layers, (lo, hi, full) each, of the
    shortest period of the blocks' pattern (Qwen2.5-VL: 7 window blocks and a full one), and how
    many times that period repeats (4): the graph holds one copy of each run, looped over, and
    compiles faster than with every run written out."""
    flags = np.isin(np.arange(cfg.depth), cfg.fullatt_block_indexes)
    size = next(s for s in range(1, cfg.depth + 1)
                if cfg.depth % s == 0 and np.array_equal(np.tile(flags[:s], cfg.depth // s), flags))
    first = flags[:size]
    edges = [0, *(np.flatnonzero(np.diff(first)) + 1).tolist(), size]
    return [(lo, hi, bool(first[lo])) for lo, hi in zip(edges[:-1], edges[1:])], cfg.depth // size


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

    def __call__(self, pixels: Float[Array, "p e"], lay: dict[str, Int[Array, "..."]]) -> Float[Array, "u o"]:
        """Merged visual tokens [P/4, out] in window order (the host maps them back); `lay`: the
        arrays of `VisionLayout` but merged_row (the inputs' `vision_*`, without the prefix)."""
        cfg = self.cfg
        w = self.patch[...]
        x = dense(pixels.astype(w.dtype), w.reshape(-1, w.shape[-1]), "pe,ed->pd")
        x = jnp.take(x, lay["perm"], axis=0)
        hd = cfg.head_dim // 2
        inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
        pos = lay["pos"]
        angles = (pos.astype(jnp.float32)[..., None] * inv_freq).reshape(pos.shape[0], -1)  # [p, hd]: h then w
        angles = jnp.concatenate([angles, angles], -1)
        rope = jnp.cos(angles), jnp.sin(angles)
        full = functools.partial(full_attention, segment=lay["full_segment"], keys=lay["full_keys"],
                                 rows=lay["full_rows"], slot=lay["full_slot"])
        window = functools.partial(segment_attention, rows=lay["window_rows"], slot=lay["window_slot"])
        runs, repeats = block_runs(cfg)

        def period(x, start):
            for lo, hi, is_full in runs:  # runs of window layers and of full layers
                attention = full if is_full else window
                x, _ = scan_layers(self.blocks, lo, hi, lambda block, h, _, a=attention: (block(h, rope, a), None),
                                   x, offset=start)
            return x, None

        x, _ = period(x, 0) if repeats == 1 else jax.lax.scan(period, x, jnp.arange(repeats) * runs[-1][1])
        h = self.merge_norm(x).reshape(-1, cfg.merge_unit * cfg.hidden_size)
        h = jax.nn.gelu(dense(h, self.merge1[...], "uc,ce->ue") + self.merge1_bias[...], approximate=False)
        return dense(h, self.merge2[...], "uc,co->uo") + self.merge2_bias[...]
