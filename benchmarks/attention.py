"""Prompt attention on one decoder layer: ep_jax's `attend` against alternatives, one run.

    python benchmarks/attention.py [--config 1b] [--tokens 635] [--runs 25]

Random queries/keys/values of the bench config's decoder shape, a causal mask, float32. Times
(median of `--runs`, calls alternating): `attend_causal`, what the decoder's prefill runs (query
blocks that skip the fully masked keys), `attend` on the whole score matrix (heads-major
operands), the same math from the token-major layout (what `attend` did before), and PyTorch's
fused causal `scaled_dot_product_attention` when torch is installed. Checks that they agree.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from ep_jax.bench_setup import get_config
from ep_jax.nn.layers import _MASK_VALUE, attend, attend_causal


def token_major(q, k, v, mask):
    b, t, n, h = q.shape
    q = q.reshape(b, t, k.shape[2], n // k.shape[2], h)
    logits = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32) * h**-0.5
    probs = jax.nn.softmax(jnp.where(mask[:, None, None], logits, _MASK_VALUE), axis=-1)
    return jnp.einsum("bkgts,bskh->btkgh", probs, v, preferred_element_type=jnp.float32).reshape(b, t, n, h)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="1b")
    p.add_argument("--tokens", type=int, default=635)
    p.add_argument("--runs", type=int, default=25)
    args = p.parse_args(argv)
    t = get_config(args.config).text
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (1, args.tokens, t.num_heads, t.head_dim))
    k = jax.random.normal(keys[1], (1, args.tokens, t.num_kv_heads, t.head_dim))
    v = jax.random.normal(keys[2], (1, args.tokens, t.num_kv_heads, t.head_dim))
    mask = jnp.tril(jnp.ones((args.tokens, args.tokens), bool))[None]
    fns = {"attend_causal (prefill, query blocks)": jax.jit(attend_causal),
           "attend (full, heads-major)": jax.jit(attend), "token-major (full)": jax.jit(token_major)}
    ref = fns["attend (full, heads-major)"](q, k, v, mask)
    for name, fn in fns.items():
        diff = float(jnp.max(jnp.abs(fn(q, k, v, mask) - ref)))
        assert diff < 1e-4, f"{name} differs from attend by {diff}"
    calls = {name: (lambda fn=fn: jax.block_until_ready(fn(q, k, v, mask))) for name, fn in fns.items()}
    try:
        import torch

        torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
        tq, tk, tv = (torch.from_numpy(np.array(a)).transpose(1, 2).contiguous() for a in (q, k, v))

        def sdpa():
            with torch.inference_mode():
                return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True)

        calls[f"PyTorch SDPA, causal ({torch.get_num_threads()} threads)"] = sdpa
    except ImportError:
        pass
    times = {name: [] for name in calls}
    for name, call in calls.items():
        call()  # warm-up
    for _ in range(args.runs):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t0)
    print(f"{args.config}: {args.tokens} tokens, {t.num_heads} heads x {t.head_dim} ({t.num_kv_heads} kv heads), "
          f"float32, {jax.default_backend()}; median of {args.runs} alternating calls")
    for name, ts in times.items():
        print(f"  {name:40s} {1e3 * np.median(ts):7.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
