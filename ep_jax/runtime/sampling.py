"""Next-token sampling: greedy, temperature, top-k, top-p (nucleus).

`temperature` and `top_p` are traced values (changing them does not recompile); `top_k` sets
a `lax.top_k` size, so it is static. temperature == 0 means greedy; `greedy=True` (static)
builds the argmax alone, with no sampling branch to compile or run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def sample(
    logits: Float[Array, "b v"],
    key: jax.Array,
    temperature: Float[Array, ""] | float = 0.0,
    top_p: Float[Array, ""] | float = 1.0,
    top_k: int = 0,
    greedy: bool = False,
) -> Int[Array, "b"]:
    logits = logits.astype(jnp.float32)
    best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if greedy:
        return best
    scaled = logits / jnp.maximum(jnp.asarray(temperature, jnp.float32), 1e-6)
    if top_k:
        kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]
        scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    scaled = _top_p_filter(scaled, jnp.asarray(top_p, jnp.float32))
    sampled = jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
    return jnp.where(jnp.asarray(temperature) > 0, sampled, best)


def _top_p_filter(logits: Float[Array, "b v"], top_p: Float[Array, ""]) -> Float[Array, "b v"]:
    """Keep the smallest set of tokens whose probability reaches top_p (always >= 1 token)."""
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < top_p
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    return jnp.where(keep, logits, -jnp.inf)
