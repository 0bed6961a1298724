"""Selection: which tokens go on past the prune stage, under static shapes (docs/ALGORITHM.md §5).

`select_kept` turns `[b, n]` scores over the visual slots into the kept sequence rows of every
example: all its text, its own top-`R` visual tokens, the rest masked; `gather_rows` /
`take_tokens` apply it to hidden states, masks and (pytree) positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int


def _sortable_int(scores: Array) -> Array:
    """Order-preserving map float -> signed int of the same width (±inf included)."""
    if scores.dtype == jnp.float64:
        int_dtype = jnp.int64
    else:
        scores, int_dtype = scores.astype(jnp.float32), jnp.int32
    bits = jax.lax.bitcast_convert_type(scores, int_dtype)
    # Negative floats order backwards as sign-magnitude ints: flip their magnitude bits.
    return jnp.where(bits < 0, bits ^ jnp.iinfo(int_dtype).max, bits)


def visual_rank(scores: Float[Array, "b n"], visual_valid: Bool[Array, "b n"]) -> Int[Array, "b n"]:
    """Rank of every visual slot within its example (0 = highest score). Padded slots rank
    below every valid one, NaN scores below every other valid score; equal scores rank the
    earlier slot first."""
    key = _sortable_int(scores)
    info = jnp.iinfo(key.dtype)
    key = jnp.where(jnp.isnan(scores), info.min + 1, key)
    key = jnp.where(visual_valid, key, info.min)
    _, order = jax.lax.top_k(key, key.shape[1])  # descending; ties: lower index first
    b, n = scores.shape
    return jnp.zeros((b, n), jnp.int32).at[jnp.arange(b)[:, None], order].set(jnp.arange(n, dtype=jnp.int32))


def select_kept(
    scores: Float[Array, "b n"],
    visual_positions: Int[Array, "b n"],
    visual_valid: Bool[Array, "b n"],
    token_valid: Bool[Array, "b s"],
    keep: Int[Array, "b"],
    kept_len: int,
) -> tuple[Int[Array, "b k"], Bool[Array, "b k"]]:
    """Kept sequence rows per example, ascending, `[b, kept_len]` (static), and which of them
    hold a real token.

    Every real non-visual token (text) is kept; of example `i`'s valid visual slots the
    `keep[i]` highest-scoring ones are kept (`visual_rank`). The rows are filled up to
    `kept_len` with padding first, then with dropped visual tokens, all masked. `kept_len` must
    hold every example's text plus its `keep[i]` (the runtime chooses it on the host; with one
    `N` and `R` for the whole batch it is `S - N + R`, every padding row included, as before).

    One `lax.top_k` over a whole-sequence key with three tiers (kept > padding > dropped) and a
    sort of the chosen indices back into original order.
    """
    b, n = scores.shape
    if visual_positions.shape != (b, n) or visual_valid.shape != (b, n):
        raise ValueError(
            f"scores {scores.shape}, visual_positions {visual_positions.shape} and visual_valid "
            f"{visual_valid.shape} must all be [b, n]"
        )
    seq_len = token_valid.shape[1]
    if not 0 <= kept_len <= seq_len:
        raise ValueError(f"kept_len={kept_len} outside [0, seq_len={seq_len}]")
    rows = jnp.arange(b)[:, None]
    chosen = visual_valid & (visual_rank(scores, visual_valid) < keep[:, None])
    # Scatter with max so that a padded slot pointing at a real token never changes it.
    is_visual = jnp.zeros((b, seq_len), bool).at[rows, visual_positions].max(visual_valid)
    visual_kept = jnp.zeros((b, seq_len), bool).at[rows, visual_positions].max(chosen)
    kept = token_valid & (~is_visual | visual_kept)
    tier = jnp.where(kept, 2, jnp.where(token_valid, 0, 1)).astype(jnp.int32)
    _, index = jax.lax.top_k(tier, kept_len)
    index = jnp.sort(index, axis=-1).astype(jnp.int32)
    return index, jnp.take_along_axis(kept, index, axis=1)


def gather_rows(x: Float[Array, "b s *rest"], kept: Int[Array, "b k"]) -> Float[Array, "b k *rest"]:
    """`x[i, kept[i]]` for every example: hidden states, masks or q/k/v of the kept tokens."""
    index = kept.reshape(kept.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


def take_tokens(positions, index: Int[Array, "b k"]):
    """Positions (a pytree of arrays whose last two axes are batch and token: `[b, s]`, or
    `[3, b, s]` for M-RoPE) at the given token indices."""
    def take(p):
        return jnp.take_along_axis(p, jnp.broadcast_to(index, p.shape[:-2] + index.shape), axis=-1)

    return jax.tree.map(take, positions)
