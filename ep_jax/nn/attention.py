"""Which attention kernel runs: the einsum path of `layers.attend` (CPU, the reference), or on
accelerators `jax.nn.dot_product_attention` (cuDNN's fused kernel on GPUs) and the Pallas
splash-attention kernel on TPUs. Same inputs and outputs as `layers.attend`.

Choice (`implementation()`): EP_JAX_ATTENTION=auto|einsum|xla|cudnn|splash or
`set_implementation(name)`; "auto" (default) picks per call:
  GPU  cudnn  when the dtype is float16/bfloat16 and the head dim a multiple of 8 up to 128
              (what cuDNN's fused attention accepts); else einsum
  TPU  splash for a prompt (causal over its own tokens) of a multiple of 128 tokens with a head
              dim that is a multiple of 128, outside a device mesh (the kernel is not
              partitioned by XLA); else xla
  CPU  einsum (`layers.attend` / `attend_causal`, the measured CPU path)
A name asked for explicitly that cannot run these shapes raises ValueError (never a silent
fallback). "xla" runs everywhere: it is how the CPU tests check parity of the dispatch.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from ep_jax.nn.layers import attend, attend_causal
from ep_jax.nn.partition import active_mesh_shape

IMPLEMENTATIONS = ("auto", "einsum", "xla", "cudnn", "splash")
_CHOSEN: dict = {"name": None}
SPLASH_BLOCK = 128


def implementation() -> str:
    """The implementation asked for: `set_implementation`'s, else $EP_JAX_ATTENTION, else auto."""
    name = _CHOSEN["name"] or os.environ.get("EP_JAX_ATTENTION", "auto").strip().lower() or "auto"
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {name!r}: choose one of {', '.join(IMPLEMENTATIONS)}")
    return name


def set_implementation(name: str | None) -> str | None:
    """Ask for an implementation (None: back to $EP_JAX_ATTENTION / auto); returns the previous
    choice. Compiled programs are keyed by it (`runtime.engine`)."""
    if name is not None and name not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {name!r}: choose one of {', '.join(IMPLEMENTATIONS)}")
    previous, _CHOSEN["name"] = _CHOSEN["name"], name
    return previous


def cudnn_fits(q, k) -> bool:
    h = q.shape[-1]
    return q.dtype in (jnp.bfloat16, jnp.float16) and h % 8 == 0 and h <= 128 and k.dtype == q.dtype


def splash_fits(q, k, causal: bool) -> bool:
    t, h = q.shape[1], q.shape[-1]
    return causal and t == k.shape[1] and t % SPLASH_BLOCK == 0 and h % 128 == 0 and not active_mesh_shape()


def choose(q, k, causal: bool) -> str:
    """The implementation that runs for these operands."""
    name = implementation()
    if name == "auto":
        backend = jax.default_backend()
        if backend == "gpu":
            return "cudnn" if cudnn_fits(q, k) else "einsum"
        if backend == "tpu":
            return "splash" if splash_fits(q, k, causal) and _splash_module() is not None else "xla"
        return "einsum"
    if name == "cudnn" and not cudnn_fits(q, k):
        raise ValueError(f"attention 'cudnn' cannot run {q.dtype} with head dim {q.shape[-1]} "
                         "(needs float16/bfloat16, head dim a multiple of 8 up to 128)")
    if name == "splash" and not splash_fits(q, k, causal):
        raise ValueError(f"attention 'splash' cannot run {q.shape[1]} queries x {k.shape[1]} keys, head dim "
                         f"{q.shape[-1]} (needs a causal prompt of a multiple of {SPLASH_BLOCK} tokens, head dim "
                         "a multiple of 128, no device mesh)")
    return name


def dot_product(q: Float[Array, "b t n h"], k: Float[Array, "b s k h"], v: Float[Array, "b s k h"],
                mask: Bool[Array, "b t s"] | None, name: str) -> Float[Array, "b t n h"]:
    """`jax.nn.dot_product_attention` ("xla" or "cudnn"); it groups query heads over kv heads
    itself and masks with the same finite large negative value, so fully masked (padding) rows
    come out as a uniform average, as in `layers.attend`."""
    return jax.nn.dot_product_attention(q, k, v, mask=None if mask is None else mask[:, None], implementation=name)


@functools.cache
def _splash_module():
    try:
        from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel, splash_attention_mask
    except ImportError:
        return None
    return splash_attention_kernel, splash_attention_mask


def splash(q: Float[Array, "b t n h"], k: Float[Array, "b t k h"], v: Float[Array, "b t k h"],
           mask: Bool[Array, "b t t"], interpret: bool = False) -> Float[Array, "b t n h"]:
    """Splash attention for a causal prompt: the kernel's static causal mask and, for padding,
    segment ids (real tokens 1, padding 0). `mask` must be causal in array order (prefill, also
    after pruning), so key j is real iff some query sees it. Query heads share their kv head
    through the MQA kernel, vmapped over kv heads and examples."""
    kernel_mod, mask_mod = _splash_module()
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    group = n // kv_heads
    real = mask.any(axis=1).astype(jnp.int32)  # [b, t]
    heads_mask = mask_mod.MultiHeadMask([mask_mod.CausalMask((t, t))] * group)
    kernel = kernel_mod.make_splash_mqa_single_device(heads_mask, interpret=interpret)
    qg = (q * (h**-0.5)).reshape(b, t, kv_heads, group, h).transpose(0, 2, 3, 1, 4)  # [b, K, G, t, h]
    kt, vt = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [b, K, t, h]

    def one_example(qe, ke, ve, seg):
        ids = kernel_mod.SegmentIds(q=seg, kv=seg)
        return jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh, segment_ids=ids))(qe, ke, ve)

    out = jax.vmap(one_example)(qg, kt, vt, real)  # [b, K, G, t, h]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q.dtype)


def attention(q: Float[Array, "b t n h"], k: Float[Array, "b s k h"], v: Float[Array, "b s k h"],
              mask: Bool[Array, "b t s"] | None, *, causal: bool = False) -> Float[Array, "b t n h"]:
    """`layers.attend` through the chosen kernel. `causal`: the keys are the queries' own tokens
    and `mask` is causal in array order (a prompt)."""
    name = choose(q, k, causal)
    if name == "einsum":
        return (attend_causal if causal else attend)(q, k, v, mask)
    if name == "splash":
        return splash(q, k, v, mask)
    return dot_product(q, k, v, mask, name)
