"""Scorers: one signature for every pruning method (docs/ALGORITHM.md §2 and §7).

`ScoreInputs` holds what layer `K-1` offers at the prune point; every scorer maps it to `[b, n]`
scores over the visual slots (higher = keep). Nothing here knows a model family: the runtime
fills a `ScoreInputs` between its two layer segments, and a user can call any scorer on
tensors of their own.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from ep_jax.core.budget import PruneConfig
from ep_jax.core.entropy import token_entropy
from ep_jax.core.select import gather_rows, take_tokens

@dataclasses.dataclass(frozen=True)
class ScoreInputs:
    """Layer `K-1` tensors a scorer may read. Plain (not a pytree): built inside `jit`.

    Fields a method does not need may be None (e.g. `random` reads only `visual_positions`).

    Attributes:
      query: `[b, s, n_heads, head_dim]` layer K-1 queries **before** RoPE.
      key: `[b, s, kv_heads, head_dim]` before RoPE.
      value: `[b, s, kv_heads, head_dim]`.
      hidden: `[b, s, d]` layer K-1 output through the model's final RMSNorm.
      positions: RoPE positions, `[b, s]` (or `[3, b, s]` for M-RoPE: any array whose last two
        axes are batch and token).
      attention_mask: bool `[b, s]`, True for real (non-padding) tokens.
      visual_positions: int `[b, n]` sequence index of each visual slot, ascending, distinct.
      visual_valid: bool `[b, n]`, False for padded image slots.
      rope: `(x [b, s, heads, hd], positions) -> x`, the model's RoPE.
      pool: `[b, n]` host-computed scores of the "pool" method (`pool_spans_scores`).
    """

    query: Float[Array, "b s nh hd"] | None = None
    key: Float[Array, "b s kh hd"] | None = None
    value: Float[Array, "b s kh hd"] | None = None
    hidden: Float[Array, "b s d"] | None = None
    positions: Any = None
    attention_mask: Bool[Array, "b s"] | None = None
    visual_positions: Int[Array, "b n"] | None = None
    visual_valid: Bool[Array, "b n"] | None = None
    rope: Callable[[Array, Any], Array] | None = None
    pool: Float[Array, "b n"] | None = None

    def require(self, method: str, *names: str):
        missing = [name for name in names if getattr(self, name) is None]
        if missing:
            raise ValueError(f"scorer {method!r} needs ScoreInputs fields {missing}, which are None")
        return tuple(getattr(self, name) for name in names)


Scorer = Callable[[ScoreInputs, PruneConfig, int], Float[Array, "b n"]]


def score_entropy(inputs: ScoreInputs, cfg: PruneConfig, keep: int) -> Float[Array, "b n"]:
    """EntropyPrune: token-wise matrix entropy of the visual tokens' `cfg.source` vectors.

    Query rows = query heads (reference); key/value rows = kv heads (GQA); hidden is split into
    as many rows as there are query heads. Pre-RoPE tensors are exact: RoPE leaves `E` unchanged.
    """
    del keep
    (visual_positions,) = inputs.require("entropy", "visual_positions")
    if cfg.source == "hidden":
        hidden, query = inputs.require("entropy/hidden", "hidden", "query")
        states, num_heads = gather_rows(hidden, visual_positions), query.shape[2]
    else:
        (source,) = inputs.require(f"entropy/{cfg.source}", cfg.source)
        visual = gather_rows(source, visual_positions)  # [b, n, heads, hd]
        num_heads = source.shape[2]
        states = visual.reshape(*visual.shape[:2], -1)
    return token_entropy(
        states,
        num_heads,
        dim_scale=cfg.dim_scale,
        trace_normalize=cfg.trace_normalize,
        precision=cfg.precision,
    )


def score_fastv(inputs: ScoreInputs, cfg: PruneConfig, keep: int) -> Float[Array, "b n"]:
    """FastV: attention each visual token receives from the last real token at layer K-1.

    Only that one query row is computed (RoPE'd query against RoPE'd keys, grouped-query aware,
    softmax over the real keys at or before it), never a full `s x s` map. Averaged over heads.
    """
    del cfg, keep
    query, key, positions, attention_mask, visual_positions, rope = inputs.require(
        "fastv", "query", "key", "positions", "attention_mask", "visual_positions", "rope"
    )
    b, s, num_heads, head_dim = query.shape
    kv_heads = key.shape[2]
    if num_heads % kv_heads:
        raise ValueError(f"query heads {num_heads} not a multiple of kv heads {kv_heads}")

    index = jnp.arange(s)
    last = jnp.max(jnp.where(attention_mask, index, -1), axis=-1)  # [b] last real token
    last = jnp.maximum(last, 0)[:, None]  # [b, 1]
    last_query = rope(gather_rows(query, last), take_tokens(positions, last))
    keys = rope(key, positions)

    groups = num_heads // kv_heads
    last_query = last_query.reshape(b, kv_heads, groups, head_dim).astype(jnp.float32)
    logits = jnp.einsum(
        "bkgh,bskh->bkgs", last_query, keys.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    ) / math.sqrt(head_dim)
    # Causality adds nothing here: every real key sits at or before the last real token.
    logits = jnp.where(attention_mask[:, None, None, :], logits, -jnp.inf)
    weights = jax.nn.softmax(logits, axis=-1).mean(axis=(1, 2))  # [b, s]
    return jnp.take_along_axis(weights, visual_positions, axis=1)


def score_random(inputs: ScoreInputs, cfg: PruneConfig, keep: int) -> Float[Array, "b n"]:
    """Random: i.i.d. uniform scores from `cfg.seed` (a floor any method must beat)."""
    del keep
    (visual_positions,) = inputs.require("random", "visual_positions")
    return jax.random.uniform(jax.random.key(cfg.seed), visual_positions.shape, jnp.float32)


def pool_scores(num_visual: int, keep: int) -> np.ndarray:
    """`[n]` scores where exactly `keep` slots, spread evenly over the visual grid, score 1.

    Square `n` (a `g x g` grid): an `a x c` lattice of rows/columns at evenly spaced centres,
    with `a = ceil(sqrt(keep))`, `c = ceil(keep / a)`; the `< a` surplus lattice points are
    dropped evenly along the raster order. Otherwise a 1-D even stride. Static (NumPy).
    """
    side = math.isqrt(num_visual)
    if side * side == num_visual:
        coords = np.stack(np.divmod(np.arange(num_visual), side), axis=1)
        return grid_pool(coords, (side, side), keep)
    if not 0 <= keep <= num_visual:
        raise ValueError(f"keep={keep} outside [0, {num_visual}]")
    scores = np.zeros(num_visual, np.float32)
    scores[_even(num_visual, keep)] = 1.0
    return scores


def grid_pool(coords: np.ndarray, shape: tuple[int, int], keep: int) -> np.ndarray:
    """`[m]` scores over `m` tokens at 2-D cells `coords` [m, 2] of an `h x w` grid: `keep` of
    them, at the points of an evenly spaced lattice (the nearest token where a lattice cell has
    none, e.g. LLaVA-NeXT's un-padded tiles), score 1."""
    m = len(coords)
    if not 0 <= keep <= m:
        raise ValueError(f"keep={keep} outside [0, {m}]")
    scores = np.zeros(m, np.float32)
    if keep == 0:
        return scores
    h, w = shape
    rows = min(math.ceil(math.sqrt(keep * h / max(w, 1))), h) if h != w else math.ceil(math.sqrt(keep))
    rows = max(rows, 1)
    cols = math.ceil(keep / rows)
    lattice = np.stack(np.meshgrid(_even(h, rows) if rows <= h else np.arange(h),
                                   _even(w, cols) if cols <= w else np.arange(w), indexing="ij"), -1).reshape(-1, 2)
    lattice = lattice[_even(len(lattice), keep)] if len(lattice) >= keep else lattice
    index = {tuple(c): k for k, c in enumerate(coords.tolist())}
    chosen: list[int] = []
    taken: set[int] = set()
    for cell in lattice.tolist():
        k = index.get(tuple(cell))
        if k is None or k in taken:  # no token at this cell: the nearest free one
            free = np.array([j for j in range(m) if j not in taken])
            k = int(free[np.argmin(np.abs(coords[free] - np.asarray(cell)).sum(1))])
        chosen.append(k)
        taken.add(k)
    # a lattice smaller than keep (more tokens asked than cells): fill evenly in sequence order
    rest = [j for j in range(m) if j not in taken]
    chosen += [rest[j] for j in _even(len(rest), keep - len(chosen))] if keep > len(chosen) else []
    scores[np.asarray(chosen, np.int64)] = 1.0
    return scores


def _even(total: int, count: int) -> np.ndarray:
    """`count` distinct indices in `[0, total)` at the centres of equal-width bins."""
    return ((np.arange(count) + 0.5) * total / count).astype(np.int64)


def pool_spans_scores(spans, keep: np.ndarray) -> np.ndarray:
    """Host-side "pool" scores `[b, n]` for visual spans (`core.spans.VisualSpans`) and each
    example's `keep` [b]: the example's `R` is shared among its images and their frames in
    proportion to their tokens, and each frame's share is an even lattice over its (h, w) grid
    (`grid_pool`); off-grid tokens (CLS, newlines) are kept last."""
    b, n = np.shape(spans.valid)
    out = np.zeros((b, n), np.float32)
    for i in range(b):
        valid = np.flatnonzero(np.asarray(spans.valid[i]))
        if not len(valid) or keep[i] == 0:
            continue
        coords, image = np.asarray(spans.coords[i])[valid], np.asarray(spans.image[i])[valid]
        on_grid = coords[:, 0] >= 0
        groups = [np.flatnonzero(on_grid & (image == im) & (coords[:, 0] == t))
                  for im in np.unique(image) for t in np.unique(coords[image == im, 0]) if t >= 0]
        groups = [g for g in groups if len(g)]
        shares = _shares([len(g) for g in groups], min(int(keep[i]), int(on_grid.sum())))
        row = np.zeros(len(valid), np.float32)
        for g, share in zip(groups, shares):
            grid = np.asarray(spans.grid[i])[valid[g[0]]]
            row[g] = grid_pool(coords[g, 1:], (int(grid[1]), int(grid[2])), share)
        left = int(keep[i]) - int(row.sum())  # off-grid tokens only when the grid cannot hold R
        if left > 0:
            off = np.flatnonzero(~on_grid)
            row[off[_even(len(off), left)]] = 1.0
        out[i, valid] = row
    return out


def _shares(sizes: list[int], total: int) -> list[int]:
    """`total` split in proportion to `sizes` (largest remainders), never above a size."""
    if not sizes:
        return []
    exact = np.asarray(sizes, np.float64) * total / max(sum(sizes), 1)
    shares = np.floor(exact).astype(int)
    for j in np.argsort(-(exact - shares), kind="stable")[: total - shares.sum()]:
        shares[j] += 1
    return np.minimum(shares, sizes).tolist()


def score_pool(inputs: ScoreInputs, cfg: PruneConfig, keep: int) -> Float[Array, "b n"]:
    """Spatial pooling / uniform stride: an evenly spread `R` of each image's grid. The scores
    depend on the grid only, so they are computed on the host (`pool_spans_scores`)."""
    del cfg, keep
    (pool,) = inputs.require("pool", "pool")
    return pool


SCORERS: dict[str, Scorer] = {
    "entropy": score_entropy,
    "fastv": score_fastv,
    "random": score_random,
    "pool": score_pool,
}


def score(inputs: ScoreInputs, cfg: PruneConfig, keep: int) -> Float[Array, "b n"]:
    """Dispatch to `SCORERS[cfg.method]`."""
    if cfg.method not in SCORERS:
        raise ValueError(f"method {cfg.method!r} has no scorer; scorers: {tuple(SCORERS)}")
    return SCORERS[cfg.method](inputs, cfg, keep)
