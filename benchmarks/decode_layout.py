"""Decode and prefill time of the two decoder weight layouts, side by side in one process.

    python benchmarks/decode_layout.py [--config 1b] [--new-tokens 32] [--runs 3]

Builds the bench config with random weights in the `stacked` layout (one array per weight with
a leading layer axis, layers under `lax.scan`) and a `per_layer` copy (`checkpoint.with_layout`:
one buffer per layer, the layer loop unrolled), then, for each, compiles the prefill of the bench
prompt and the greedy decode loop `ep_jax.generate` runs, and times them alternately (stacked,
per_layer, stacked, ...; median of `--runs`). Checks that both produce the same tokens.
See `checkpoint.LAYOUTS` for what `auto` picks.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from ep_jax.runtime import api
from ep_jax.bench_setup import PAD, build_processor, encode, get_config, random_model
from ep_jax.runtime.model import with_layout


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="1b")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args(argv)
    cfg = get_config(args.config)
    stacked = random_model(cfg, "float32", layout="stacked")
    enc = encode(build_processor(cfg), 1)
    arrays, spans = stacked.family.inputs(cfg, enc["input_ids"], enc["pixel_values"], enc["attention_mask"])
    inputs = (arrays, spans, None)
    room = api.room_for(args.new_tokens)
    statics = dict(top_k=0, greedy=True, eos_ids=(-1,), pad_id=PAD, room=room)  # no EOS: every run decodes --new-tokens

    runs = {}
    for model in (stacked, with_layout(stacked, "per_layer")):
        g, state = model.graphdef, model.state
        t0 = time.perf_counter()
        prefill = jax.jit(lambda st, a, sp, ex, g=g: api.prefill_logits(g, st, a, sp, ex, stage=None, decode_room=room,
                                                                        all_logits=False)).lower(state, *inputs).compile()
        t1 = time.perf_counter()
        logits, res = prefill(state, *inputs)
        key = jax.random.key(0)
        decode = jax.jit(lambda st, lg, c, k, g=g: api.decode_all(g, st, lg, c, k, 0.0, 1.0, args.new_tokens,
                                                                   **statics)).lower(state, logits, res.cache,
                                                                                     key).compile()
        t2 = time.perf_counter()
        runs[model.layout] = dict(prefill=prefill, decode=decode, state=state, compile=(t1 - t0, t2 - t1),
                                  prefill_s=[], decode_s=[], tokens=None)

    for _ in range(args.runs):
        for r in runs.values():
            t0 = time.perf_counter()
            logits, res = jax.block_until_ready(r["prefill"](r["state"], *inputs))
            t1 = time.perf_counter()
            tokens, steps, _ = jax.block_until_ready(r["decode"](r["state"], logits, res.cache, jax.random.key(0)))
            t2 = time.perf_counter()
            r["prefill_s"].append(t1 - t0)
            r["decode_s"].append((t2 - t1) / (int(steps) - 1))  # the first token comes from the prefill
            r["tokens"] = np.asarray(tokens)

    print(f"{args.config}, float32, {jax.default_backend()}: median of {args.runs}, {args.new_tokens} new tokens")
    for layout, r in runs.items():
        print(f"  {layout:9s}: prefill {1e3 * np.median(r['prefill_s']):7.1f} ms, decode "
              f"{1e3 * np.median(r['decode_s']):6.1f} ms/token | compile: prefill {r['compile'][0]:.1f} s, "
              f"decode loop {r['compile'][1]:.1f} s")
    s, p_ = runs["stacked"], runs["per_layer"]
    print(f"  stacked / per_layer: prefill {np.median(s['prefill_s']) / np.median(p_['prefill_s']):.2f}, "
          f"decode {np.median(s['decode_s']) / np.median(p_['decode_s']):.2f}; same tokens: "
          f"{bool((s['tokens'] == p_['tokens']).all())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
