"""Pruning policy, pure functions (ALGORITHM.md §4 and §5).

* `PruneConfig` — what to prune, where, and how much (hashable: a static `jit` argument).
* `budget` / `resolve_keep` / `effective_avg` — the papers' average budget `A` versus the
  count `R` actually kept from layer `K` on.
* `ScoreInputs` + `SCORERS` — one signature for every method: layer `K-1` tensors in,
  `[b, n]` scores out (higher = keep).
* `select_kept` / `gather_rows` — static-shape top-k selection of the kept sequence positions
  (all text, the top-`R` visual tokens, original order) and the gather that applies it.

Nothing here knows about the model: the model fills a `ScoreInputs` between its two layer
segments, and a user can call any scorer on tensors of their own.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from ep_jax.entropy import token_entropy

METHODS = ("entropy", "fastv", "random", "pool", "none")
SOURCES = ("query", "key", "value", "hidden")
MODES = ("gather", "mask")
PRECISIONS = ("float32", "float64")


# --------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """How to prune visual tokens. Frozen and hashable so it can be a static `jit` argument.

    Attributes:
      method: "entropy" (EntropyPrune), "fastv", "random", "pool" (uniform grid stride), or
        "none" (no pruning).
      layer: `K`, the first decoder layer that sees the pruned sequence (scores come from layer
        `K-1`), an int >= 1, or "auto" for the model preset's Entropy Collapse Layer (resolved
        by the caller before `resolve_keep`).
      avg_keep: `A`, the papers' average number of visual tokens per layer (192/128/64).
      keep: `R`, the visual tokens kept from layer `K` on. Give exactly one of `avg_keep`/`keep`.
      source: tensor of layer `K-1` the entropy is computed from: query (reference), key,
        value, or hidden (the layer output through the final RMSNorm).
      trace_normalize: normalise the eigenvalues (option; the reference does not).
      precision: "float32" or "float64" (reference; needs `jax_enable_x64`) for the entropy.
      dim_scale: column cap for the per-token matrix (head dims above it are averaged down).
      seed: PRNG seed of the "random" method.
      mode: "gather" shortens the sequence (the real thing); "mask" keeps the full length and
        masks the pruned keys instead — a verification oracle for the gather path.
    """

    method: str = "entropy"
    layer: int | str = 2
    avg_keep: int | None = None
    keep: int | None = None
    source: str = "query"
    trace_normalize: bool = False
    precision: str = "float32"
    dim_scale: int = 128
    seed: int = 0
    mode: str = "gather"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"PruneConfig.method={self.method!r}; use one of {METHODS}")
        if self.source not in SOURCES:
            raise ValueError(f"PruneConfig.source={self.source!r}; use one of {SOURCES}")
        if self.mode not in MODES:
            raise ValueError(f"PruneConfig.mode={self.mode!r}; use one of {MODES}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"PruneConfig.precision={self.precision!r}; use one of {PRECISIONS}")
        if self.layer != "auto" and not (_is_int(self.layer) and self.layer >= 1):
            raise ValueError(
                f"PruneConfig.layer={self.layer!r}: K is the first decoder layer that sees the "
                'pruned sequence and must be an int >= 1 (scores come from layer K-1), or "auto" '
                "for the model preset"
            )
        if not (_is_int(self.dim_scale) and self.dim_scale >= 1):
            raise ValueError(f"PruneConfig.dim_scale={self.dim_scale!r}: use a positive int (128 in the reference)")
        if not _is_int(self.seed):
            raise ValueError(f"PruneConfig.seed={self.seed!r}: use an int")
        for name in ("avg_keep", "keep"):
            value = getattr(self, name)
            if value is not None and not (_is_int(value) and value >= 0):
                raise ValueError(f"PruneConfig.{name}={value!r}: use a non-negative int (a token count)")
        given = (self.avg_keep is not None) + (self.keep is not None)
        if self.method != "none" and given != 1:
            raise ValueError(
                f"PruneConfig(method={self.method!r}) got avg_keep={self.avg_keep!r} and "
                f"keep={self.keep!r}: give exactly one — avg_keep=A (the papers' average visual "
                "tokens per layer, e.g. 192/128/64) or keep=R (visual tokens kept after layer K)"
            )
        if self.method == "none" and given == 2:
            raise ValueError("PruneConfig(method='none'): give at most one of avg_keep/keep")

    @property
    def enabled(self) -> bool:
        return self.method != "none"


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


# --------------------------------------------------------------------------- budget
def _check_layers(num_layers: int, layer: int) -> None:
    if not _is_int(layer) or layer < 1:
        raise ValueError(
            f"layer K={layer!r}: must be an int >= 1 (K=0 would prune before any layer has run, "
            "leaving no layer K-1 to score from)"
        )
    if layer >= num_layers:
        raise ValueError(
            f"layer K={layer} >= num_layers L={num_layers}: no layer would see the pruned "
            f"sequence; choose 1 <= K <= {num_layers - 1}"
        )


def budget(avg_keep: int, num_layers: int, layer: int, num_visual: int) -> int:
    """`R = floor((L·A − K·N) / (L − K))`: visual tokens kept from layer K on (ALGORITHM.md §4).

    The first `K` layers carry all `N` visual tokens; `R` makes the per-layer average equal `A`.
    For L=32, K=2, N=576: A=192 -> 166, A=128 -> 98, A=64 -> 29.

    Raises ValueError when `A > N`, when `K` is outside `[1, L)`, or when the formula is
    negative (the first K layers alone already exceed the average budget).
    """
    avg_keep, num_layers, num_visual = (operator.index(v) for v in (avg_keep, num_layers, num_visual))
    _check_layers(num_layers, layer)
    if avg_keep < 0 or avg_keep > num_visual:
        raise ValueError(
            f"avg_keep A={avg_keep} is outside [0, N={num_visual}] visual tokens; "
            f"use 0 <= A <= {num_visual}"
        )
    numerator = num_layers * avg_keep - layer * num_visual
    if numerator < 0:
        minimum = math.ceil(layer * num_visual / num_layers)
        raise ValueError(
            f"avg_keep A={avg_keep} cannot be met with pruning at layer K={layer}: the first "
            f"{layer} of {num_layers} layers carry all {num_visual} visual tokens, which alone "
            f"averages {layer * num_visual / num_layers:.1f} per layer. Use avg_keep >= "
            f"{minimum} or an earlier layer."
        )
    return min(numerator // (num_layers - layer), num_visual)


def effective_avg(keep: int, num_layers: int, layer: int, num_visual: int) -> float:
    """The average visual tokens per layer `A` actually achieved by keeping `R` from layer `K`.

    Inverse of `budget` up to its floor: `(K·N + (L−K)·R) / L`. Report it beside `R`.
    """
    _check_layers(num_layers, layer)
    return (layer * num_visual + (num_layers - layer) * keep) / num_layers


def resolve_keep(cfg: PruneConfig, num_layers: int, num_visual: int) -> int:
    """`R` for this config and model: `cfg.keep`, or `budget(cfg.avg_keep, ...)`.

    `method="none"` keeps all `N`. `cfg.layer` must already be an int (resolve "auto" from the
    model preset first, e.g. `dataclasses.replace(cfg, layer=preset_layer)`).
    """
    if cfg.method == "none":
        return int(num_visual)
    if cfg.layer == "auto":
        raise ValueError(
            'PruneConfig.layer="auto" must be resolved to the model preset\'s Entropy Collapse '
            "Layer before computing the budget: dataclasses.replace(cfg, layer=K)"
        )
    _check_layers(num_layers, cfg.layer)
    if cfg.keep is not None:
        if not 0 <= cfg.keep <= num_visual:
            raise ValueError(
                f"keep R={cfg.keep} is outside [0, N={num_visual}] visual tokens; use "
                f"0 <= keep <= {num_visual} (or avg_keep for the papers' average budget)"
            )
        return int(cfg.keep)
    return budget(cfg.avg_keep, num_layers, cfg.layer, num_visual)


# --------------------------------------------------------------------------- scoring
@dataclasses.dataclass(frozen=True)
class ScoreInputs:
    """Layer `K-1` tensors a scorer may read. Plain (not a pytree): built inside `jit`.

    Fields a method does not need may be None (e.g. `random` reads only `visual_positions`).

    Attributes:
      query: `[b, s, n_heads, head_dim]` layer K-1 queries **before** RoPE.
      key: `[b, s, kv_heads, head_dim]` before RoPE.
      value: `[b, s, kv_heads, head_dim]`.
      hidden: `[b, s, d]` layer K-1 output through the model's final RMSNorm.
      positions: int `[b, s]` RoPE positions.
      attention_mask: bool `[b, s]`, True for real (non-padding) tokens.
      visual_positions: int `[b, n]` sequence index of each visual slot, ascending, distinct.
      visual_valid: bool `[b, n]`, False for padded image slots.
      rope: `(x [b, s, heads, hd], positions [b, s]) -> x`, the model's RoPE.
    """

    query: Float[Array, "b s nh hd"] | None = None
    key: Float[Array, "b s kh hd"] | None = None
    value: Float[Array, "b s kh hd"] | None = None
    hidden: Float[Array, "b s d"] | None = None
    positions: Int[Array, "b s"] | None = None
    attention_mask: Bool[Array, "b s"] | None = None
    visual_positions: Int[Array, "b n"] | None = None
    visual_valid: Bool[Array, "b n"] | None = None
    rope: Callable[[Array, Array], Array] | None = None

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
    last_query = rope(gather_rows(query, last), jnp.take_along_axis(positions, last, axis=1))
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
    if not 0 <= keep <= num_visual:
        raise ValueError(f"keep={keep} outside [0, {num_visual}]")
    scores = np.zeros(num_visual, np.float32)
    if keep == 0:
        return scores
    side = math.isqrt(num_visual)
    if side * side == num_visual:
        rows = math.ceil(math.sqrt(keep))
        cols = math.ceil(keep / rows)
        row_index = _even(side, rows)
        col_index = _even(side, cols)
        lattice = (row_index[:, None] * side + col_index[None, :]).reshape(-1)
        chosen = lattice[_even(lattice.size, keep)]
    else:
        chosen = _even(num_visual, keep)
    scores[chosen] = 1.0
    return scores


def _even(total: int, count: int) -> np.ndarray:
    """`count` distinct indices in `[0, total)` at the centres of equal-width bins."""
    return ((np.arange(count) + 0.5) * total / count).astype(np.int64)


def score_pool(inputs: ScoreInputs, cfg: PruneConfig, keep: int) -> Float[Array, "b n"]:
    """Spatial pooling / uniform stride: keep an evenly spread `keep` of the visual grid."""
    del cfg
    (visual_positions,) = inputs.require("pool", "visual_positions")
    b, n = visual_positions.shape
    return jnp.broadcast_to(jnp.asarray(pool_scores(n, keep)), (b, n))


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


# --------------------------------------------------------------------------- selection
def _sortable_int(scores: Array) -> Array:
    """Order-preserving map float -> signed int of the same width (±inf included)."""
    if scores.dtype == jnp.float64:
        int_dtype = jnp.int64
    else:
        scores, int_dtype = scores.astype(jnp.float32), jnp.int32
    bits = jax.lax.bitcast_convert_type(scores, int_dtype)
    # Negative floats order backwards as sign-magnitude ints: flip their magnitude bits.
    return jnp.where(bits < 0, bits ^ jnp.iinfo(int_dtype).max, bits)


def select_kept(
    scores: Float[Array, "b n"],
    visual_positions: Int[Array, "b n"],
    visual_valid: Bool[Array, "b n"],
    seq_len: int,
    keep: int,
) -> Int[Array, "b kept"]:
    """Kept sequence positions per example, ascending: `[b, seq_len - n + keep]`, static.

    Every non-visual position (text and padding) is kept; of the visual slots the `keep` with
    the highest scores are kept. Padded visual slots (`visual_valid` False) rank below every
    valid one, NaN scores below every other valid score; equal scores keep the earlier token.

    One `lax.top_k` over a whole-sequence key: non-visual positions get the maximum key, visual
    ones their score mapped order-preservingly to an int (so the lowest tiers can sit below
    `-inf`), and the chosen indices are sorted back into original order.

    `visual_positions` must be distinct within an example (padded slots too, e.g. pointing at
    padding tokens) for exactly `keep` visual slots to survive; a padded slot that repeats a
    valid slot's position never hides it (the scatter keeps the higher rank).
    """
    b, n = scores.shape
    if visual_positions.shape != (b, n) or visual_valid.shape != (b, n):
        raise ValueError(
            f"scores {scores.shape}, visual_positions {visual_positions.shape} and visual_valid "
            f"{visual_valid.shape} must all be [b, n]"
        )
    if not 0 <= keep <= n:
        raise ValueError(f"keep={keep} outside [0, n={n}] visual slots")
    if n > seq_len:
        raise ValueError(f"{n} visual slots do not fit in seq_len={seq_len}")

    key = _sortable_int(scores)
    info = jnp.iinfo(key.dtype)
    key = jnp.where(jnp.isnan(scores), info.min + 1, key)
    key = jnp.where(visual_valid, key, info.min)

    rows = jnp.arange(b)[:, None]
    is_visual = jnp.zeros((b, seq_len), bool).at[rows, visual_positions].set(True)
    visual_key = jnp.full((b, seq_len), info.min, key.dtype).at[rows, visual_positions].max(key)
    sequence_key = jnp.where(is_visual, visual_key, info.max)

    _, kept = jax.lax.top_k(sequence_key, seq_len - n + keep)
    return jnp.sort(kept, axis=-1).astype(jnp.int32)


def gather_rows(x: Float[Array, "b s *rest"], kept: Int[Array, "b k"]) -> Float[Array, "b k *rest"]:
    """`x[i, kept[i]]` for every example: hidden states, positions or masks of the kept tokens."""
    index = kept.reshape(kept.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)
