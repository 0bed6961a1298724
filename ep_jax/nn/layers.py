"""Building blocks shared by the vision tower and the decoder.

Einsum letters (used in every file under `nn/`):
  B batch, T query length, S key length, N query heads, K kv heads, G query heads per kv
  head, H head dim, D model width, F MLP width, V vocabulary.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float

# Softmax mask value: finite so that a fully masked row (a padding query) gives a uniform
# distribution instead of NaN.
_MASK_VALUE = -1e30


def param(rngs: nnx.Rngs | None, shape, dtype, init: str = "normal", std: float = 0.02) -> nnx.Param:
    """A parameter initialised like Hugging Face does (normal(0, 0.02), ones, zeros)."""
    if init == "ones":
        return nnx.Param(jnp.ones(shape, dtype))
    if init == "zeros" or rngs is None:
        return nnx.Param(jnp.zeros(shape, dtype))
    return nnx.Param((std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype))


def stacked(make: Callable[[nnx.Rngs], nnx.Module], num: int, rngs: nnx.Rngs) -> nnx.Module:
    """`num` copies of a module with every parameter stacked on a leading layer axis.

    One module holds all layers so a `lax.scan` can run them: compile time does not grow
    with depth.
    """

    @nnx.split_rngs(splits=num)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
        return make(rngs)

    return create(rngs)


def scan_layers(layers: nnx.Module, lo: int, hi: int, body, carry, xs=None, *, stack: bool = True, offset=0):
    """Run `body(layer, carry, x) -> (carry, y)` over the layers `lo..hi-1`.

    Two weight layouts (`layout` of `Llava`):
    - stacked (one module, every parameter with a leading layer axis): a `lax.scan`, so compile
      time does not grow with depth. Each step indexes its layer out of the full stack: slicing
      `[lo:hi]` first would copy that part of the weights on every call. On XLA:CPU the indexed
      slice is still copied before each matmul reads it (`benchmarks/decode_hlo.py`).
    - per layer (`nnx.List` of modules, one buffer per weight): a Python loop, unrolled in the
      graph; each matmul reads its weights in place, compile time grows with depth.
    `xs` is sliced along its leading axis (pass NumPy for Python-int steps in the loop). The
    `y`s come back stacked on a leading axis, or with `stack=False` in the per-layer layout as
    tuples of per-layer arrays (kept separate so each layer's KV cache is its own buffer);
    `stack` may also be a tuple of bools, one per element of a tuple `y`. `offset` is added to
    the layer indices: layers `lo + offset ..` (traced: stacked layout only).
    """
    if isinstance(layers, nnx.List):
        lo, hi = lo + offset, hi + offset
        ys = []
        for j, i in enumerate(range(lo, hi)):
            carry, y = body(layers[i], carry, None if xs is None else jax.tree.map(lambda a: a[j], xs))
            ys.append(y)
        return carry, _combine(ys, stack)

    graphdef, state = nnx.split(layers)

    def step(carry, inputs):
        i, x = inputs
        layer_state = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), state)
        return body(nnx.merge(graphdef, layer_state), carry, x)

    return jax.lax.scan(step, carry, (jnp.arange(lo, hi) + offset, xs))


def _combine(ys: list, stack):
    if isinstance(stack, bool):
        return jax.tree.map(lambda *a: jnp.stack(a) if stack else a, *ys)
    return tuple(_combine([y[k] for y in ys], flag) for k, flag in enumerate(stack))


def dense(x: Array, w: Array, spec: str) -> Array:
    """einsum with float32 accumulation, result in the input dtype."""
    return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def attend(
    q: Float[Array, "b t n h"],
    k: Float[Array, "b s k h"],
    v: Float[Array, "b s k h"],
    mask: Bool[Array, "b t s"] | None,
) -> Float[Array, "b t n h"]:
    """Scaled dot-product attention with grouped kv heads: the one attention in ep_jax."""
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    g = n // kv_heads
    if t == 1:  # a single decode query: faster token-major, as is
        logits = jnp.einsum("btkgh,bskh->bkgts", q.reshape(b, t, kv_heads, g, h), k,
                            preferred_element_type=jnp.float32)
        mask = None if mask is None else mask[:, None, None]
    else:
        # A prompt: heads-major operands with one batch axis (example x kv head; the query heads
        # of a kv head stacked along the rows), so both matmuls are plain 3-D batched matmuls,
        # which XLA:CPU runs faster than from the token-major layout (`benchmarks/attention.py`)
        # and, in Qwen2.5-VL's vision tower (hundreds of windows a layer), than with 5-D operands.
        q3 = jnp.transpose(q.reshape(b, t, kv_heads, g, h), (0, 2, 3, 1, 4)).reshape(b * kv_heads, g * t, h)
        k, v = (jnp.swapaxes(a, 1, 2).reshape(b * kv_heads, s, h) for a in (k, v))
        logits = jnp.einsum("bqh,bsh->bqs", q3, k, preferred_element_type=jnp.float32)
        if mask is not None:
            mask = jnp.broadcast_to(mask[:, None, None], (b, kv_heads, g, t, s)).reshape(b * kv_heads, g * t, s)
    logits = logits * (h**-0.5)
    if mask is not None:
        logits = jnp.where(mask, logits, _MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    if t == 1:
        out = jnp.einsum("bkgts,bskh->btkgh", probs, v, preferred_element_type=jnp.float32)
    else:
        out = jnp.einsum("bqs,bsh->bqh", probs, v, preferred_element_type=jnp.float32)
        out = jnp.transpose(out.reshape(b, kv_heads, g, t, h), (0, 3, 1, 2, 4))
    return out.astype(q.dtype).reshape(b, t, n, h)


def attend_causal(
    q: Float[Array, "b t n h"],
    k: Float[Array, "b t k h"],
    v: Float[Array, "b t k h"],
    mask: Bool[Array, "b t t"],
    block: int = 160,
) -> Float[Array, "b t n h"]:
    """`attend` for a prompt whose mask is causal in array order (query i never sees a key
    after position i: the decoder's prefill, where rows hold increasing sequence indices, also
    after pruning). Queries go in blocks of `block`, each against the keys up to its last row,
    so the fully masked upper blocks are never computed (40 % of the score matrix at 635
    tokens; timed by `benchmarks/attention.py`). Static shapes: the blocks are unrolled."""
    t = q.shape[1]
    if t <= block:
        return attend(q, k, v, mask)
    outs = []
    for start in range(0, t, block):
        end = min(start + block, t)
        outs.append(attend(q[:, start:end], k[:, :end], v[:, :end], mask[:, start:end, :end]))
    return jnp.concatenate(outs, axis=1)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[Array], Array]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"activation {name!r} is not supported; known: {sorted(ACTIVATIONS)}") from None


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.scale = param(None, (dim,), dtype, "ones")
        self.bias = param(None, (dim,), dtype, "zeros")
        self.eps = eps

    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.scale = param(None, (dim,), dtype, "ones")
        self.eps = eps

    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
        # As Hugging Face LLaMA: normalise in float32, cast back, then scale.
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
        return self.scale[...] * y.astype(x.dtype)
