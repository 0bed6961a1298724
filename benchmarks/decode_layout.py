"""Decode step time: stacked layer weights (what ep_jax runs) vs one buffer per layer.

    python benchmarks/decode_layout.py [--config 1b] [--steps 16]

Builds the bench config with random weights, prefills one prompt, then times `Llava.decode`
(median ms per token over `--steps` greedy steps) two ways: as is (a `lax.scan` that indexes
each layer out of the stacked weights), and with the decoder weights split beforehand into one
array per layer, the layer loop unrolled over them. Checks that both give the same logits.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ep_jax.bench_setup import build_processor, encode, get_config, random_model
from ep_jax.nn import llava as llava_mod


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="1b")
    p.add_argument("--steps", type=int, default=16)
    args = p.parse_args(argv)
    cfg = get_config(args.config)
    model = random_model(cfg, "float32")
    enc = encode(build_processor(cfg), 1)
    g, state = model.graphdef, model.state
    res = jax.jit(lambda st, i, px, m: nnx.merge(g, st).prefill(i, px, m, None, 64))(
        state, enc["input_ids"], enc["pixel_values"], enc["attention_mask"])
    tok = jnp.ones((1,), jnp.int32)

    stacked = jax.jit(lambda st, t, c: nnx.merge(g, st).decode(t, c))

    layers_g, layers_state = nnx.split(nnx.merge(g, state).layers)
    n = cfg.text.num_layers
    per_layer = [jax.tree.map(lambda a, i=i: jnp.array(a[i]), layers_state) for i in range(n)]  # own buffers

    def split_decode(st, per, t, c):
        original = llava_mod.scan_layers

        def unrolled(layers, lo, hi, body, carry, xs=None):
            for j, i in enumerate(range(lo, hi)):
                carry, _ = body(nnx.merge(layers_g, per[i]), carry, None if xs is None else xs[j])
            return carry, None

        llava_mod.scan_layers = unrolled
        try:
            return nnx.merge(g, st).decode(t, c)
        finally:
            llava_mod.scan_layers = original

    split = jax.jit(split_decode)

    def time_it(fn, *a):
        out = fn(*a)
        jax.block_until_ready(out)
        ts = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*a))
            ts.append(time.perf_counter() - t0)
        return out, 1e3 * float(np.median(ts))

    (l1, _), ms1 = time_it(stacked, state, tok, res.cache)
    (l2, _), ms2 = time_it(split, state, per_layer, tok, res.cache)
    diff = float(jnp.max(jnp.abs(l1 - l2)))
    print(f"{args.config}: decode step {ms1:.1f} ms with stacked weights, {ms2:.1f} ms with one buffer per layer "
          f"(ratio {ms1 / ms2:.2f}); logits max |diff| {diff:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
