"""Matrix entropy, pure `jnp` (docs/ALGORITHM.md §2 and §3).

Two quantities live here:

* `token_entropy` — the EntropyPrune score of one token: its query (or key, value, hidden)
  vector viewed as a `heads x head_dim` matrix, scored by the entropy of the spectrum of its
  head-by-head Gram matrix. Higher means the heads carry more diverse information.
* `set_entropy` — the matrix entropy of a *set* of tokens (e.g. all visual tokens at one layer),
  used to find the Entropy Collapse Layer.

Both rely on the dual-Gram identity: `Z Zᵀ` and `Zᵀ Z` share their non-zero eigenvalues, so
the eigen-decomposition runs on whichever side is smaller (`heads x heads` = 32x32 instead of
128x128 for LLaVA-7B, a 64x cheaper cubic step).

No model is needed: any `[..., N, H·d_h]` array can be scored. Every function is a pure
function of its arrays and static keyword arguments, so it works under `jit` and `vmap`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

EIG_FLOOR = 1e-10
"""Eigenvalues are clamped below at this value before `λ ln λ` (reference behaviour)."""

_PRECISIONS = ("float32", "float64")


def _compute_dtype(precision: str) -> jnp.dtype:
    if precision not in _PRECISIONS:
        raise ValueError(f"precision={precision!r}; use one of {_PRECISIONS}")
    if precision == "float32":
        return jnp.float32
    # `canonicalize_dtype` honours both the global flag and the `jax.enable_x64()` context.
    if jax.dtypes.canonicalize_dtype(jnp.float64) != jnp.float64:
        raise ValueError(
            'precision="float64" needs 64-bit JAX: call jax.config.update("jax_enable_x64", True) '
            "before any JAX work, set JAX_ENABLE_X64=1 in the environment, or use the "
            'default precision="float32".'
        )
    return jnp.float64


def _gram(a: Array, b: Array, subscripts: str) -> Array:
    # HIGHEST: on GPU the default float32 matmul may run in TF32 (10-bit mantissa), which
    # would perturb the small eigenvalues that decide near-ties.
    return jnp.einsum(subscripts, a, b, precision=jax.lax.Precision.HIGHEST)


def token_entropy(
    states: Float[Array, "... n hd"],
    num_heads: int,
    *,
    dim_scale: int = 128,
    trace_normalize: bool = False,
    precision: str = "float32",
) -> Float[Array, "... n"]:
    """Token-wise matrix entropy: the EntropyPrune score of every token (docs/ALGORITHM.md §2).

    Each token's vector (last axis, length `num_heads * d_h`) is viewed as `Z` of shape
    `[num_heads, d_h]` (row = head). If `d_h > dim_scale`, adjacent channel groups of
    `d_h / dim_scale` columns are averaged down to `dim_scale` columns. Then:

    1. centre: subtract the mean row (each column centred across heads);
    2. dual Gram `G = Z Zᵀ / num_heads` (`num_heads x num_heads`, the cheap side);
    3. eigenvalues `λ` of `G`, clamped below at `1e-10`;
    4. `E = -Σ λ ln λ / ln(num_heads)`.

    Faithful to the reference by default: `λ` is *not* trace-normalised, so `E` depends on the
    scale of the vector and can be negative. `trace_normalize=True` divides `λ` by `Σλ` (after
    clamping) first, giving the textbook von Neumann entropy in `[0, 1]` — an option, not the
    default.

    RoPE rotates every head of a token by the same orthogonal matrix, so `G` — and `E` — is
    the same before and after RoPE whenever no channel averaging happens (`d_h <= dim_scale`).

    Args:
      states: `[..., N, num_heads * d_h]`, any float dtype.
      num_heads: rows of `Z` (query heads for queries/hidden, kv heads for keys/values). >= 2.
      dim_scale: column cap; `d_h` must be divisible by it when `d_h > dim_scale`.
      trace_normalize: normalise the spectrum to sum 1 (option; off in the reference).
      precision: "float32" (default) or "float64" for the Gram matrix and eigenvalues, as the
        reference does. "float64" needs `jax_enable_x64`.

    Returns:
      `[..., N]` scores in the compute dtype: float32, or float64 with `precision="float64"`
      (kept in float64 so that ranking reproduces the reference's float64 ties exactly).
    """
    num_heads = int(num_heads)
    if num_heads < 2:
        raise ValueError(
            f"num_heads={num_heads}: token entropy normalises by ln(num_heads) and needs >= 2 rows"
        )
    width = states.shape[-1]
    if width % num_heads:
        raise ValueError(
            f"last axis {width} is not divisible by num_heads={num_heads}; "
            "pass the number of heads the vector was projected for (kv heads for keys/values)"
        )
    head_dim = width // num_heads
    dtype = _compute_dtype(precision)

    z = states.reshape(*states.shape[:-1], num_heads, head_dim).astype(dtype)
    if head_dim > dim_scale:
        if head_dim % dim_scale:
            raise ValueError(
                f"head_dim={head_dim} > dim_scale={dim_scale} but not divisible by it; "
                "choose a dim_scale that divides the head dimension"
            )
        group = head_dim // dim_scale
        z = z.reshape(*z.shape[:-1], dim_scale, group).mean(axis=-1)

    z = z - z.mean(axis=-2, keepdims=True)
    gram = _gram(z, z, "...hd,...gd->...hg") / num_heads
    eigenvalues = jnp.maximum(jnp.linalg.eigvalsh(gram), EIG_FLOOR)
    if trace_normalize:
        eigenvalues = eigenvalues / eigenvalues.sum(axis=-1, keepdims=True)
    return -(eigenvalues * jnp.log(eigenvalues)).sum(axis=-1) / math.log(num_heads)


def set_entropy(
    tokens: Float[Array, "... n d"],
    *,
    trace_normalize: bool = True,
    mask: Bool[Array, "... n"] | None = None,
    side: str = "auto",
) -> Float[Array, "..."]:
    """Matrix entropy of a set of tokens (docs/ALGORITHM.md §3, for the Entropy Collapse Layer).

    The `N` tokens (rows) are centred over tokens, and the spectrum of their covariance is read
    from the smaller Gram side: `X Xᵀ / n` (`N x N`) when `N <= D`, else `Xᵀ X / n` (`D x D`);
    both sides share their non-zero eigenvalues, so the choice (static, from the shapes) changes
    cost, not the result. `side="tokens"` / `"features"` forces a side (for tests and timing).

    The entropy is `-Σ λ ln λ / ln(m)` where `m` is the size of the Gram matrix a padding-free
    computation would use: `min(n, D)`, with `n` the number of (valid) tokens. With
    `trace_normalize=True` (default) `λ` is divided by `Σλ`, giving a value in `[0, 1]`.
    Eigenvalues below `m_gram · eps · λ_max` are numerical zeros (centring alone removes one
    rank) and count as `0 ln 0 = 0`, so padding and round-off add no spurious entropy.

    Args:
      tokens: `[..., N, D]`.
      trace_normalize: normalise the spectrum to sum 1 (default, the textbook definition).
      mask: optional `[..., N]` bool, True for real tokens. Masked tokens are excluded from the
        mean and their centred rows are zeroed, so they add only zero eigenvalues: the result
        equals `set_entropy` of the valid tokens alone. Fewer than 2 valid tokens give NaN.
      side: "auto" (smaller side), "tokens" (`N x N`) or "features" (`D x D`).

    Returns:
      `[...]` entropy per set, float32 (float64 if the input is float64).
    """
    n, d = tokens.shape[-2], tokens.shape[-1]
    if side == "auto":
        side = "tokens" if n <= d else "features"
    if side not in ("tokens", "features"):
        raise ValueError(f'side={side!r}; use "auto", "tokens" or "features"')
    dtype = jnp.promote_types(tokens.dtype, jnp.float32)
    x = tokens.astype(dtype)

    if mask is None:
        weights = jnp.ones(x.shape[:-1], dtype)
    else:
        if mask.shape != x.shape[:-1]:
            raise ValueError(f"mask shape {mask.shape} != tokens shape without features {x.shape[:-1]}")
        weights = mask.astype(dtype)
    count = weights.sum(axis=-1)  # [...]
    mean = (x * weights[..., None]).sum(axis=-2, keepdims=True) / jnp.maximum(count, 1)[..., None, None]
    x = (x - mean) * weights[..., None]

    if side == "tokens":
        gram = _gram(x, x, "...nd,...md->...nm")
    else:
        gram = _gram(x, x, "...nd,...ne->...de")
    gram = gram / jnp.maximum(count, 1)[..., None, None]
    eigenvalues = jnp.linalg.eigvalsh(gram)

    gram_size = gram.shape[-1]
    top = eigenvalues.max(axis=-1, keepdims=True)
    numerical_zero = gram_size * jnp.finfo(dtype).eps * top
    eigenvalues = jnp.where(eigenvalues > numerical_zero, eigenvalues, 0.0)
    if trace_normalize:
        eigenvalues = eigenvalues / jnp.maximum(eigenvalues.sum(axis=-1, keepdims=True), jnp.finfo(dtype).tiny)
    safe = jnp.where(eigenvalues > 0, eigenvalues, 1.0)
    plogp = jnp.where(eigenvalues > 0, eigenvalues * jnp.log(safe), 0.0).sum(axis=-1)

    size = jnp.minimum(count, d)
    entropy = -plogp / jnp.log(jnp.maximum(size, 2))
    return jnp.where(count >= 2, entropy, jnp.nan)
