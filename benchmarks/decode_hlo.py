"""Which weights does XLA copy inside the compiled decode step? (explains the 1b decode gap)

    python benchmarks/decode_hlo.py [--config 1b] [--dump FILE]

Compiles the runtime's decode step (`runtime.prefill.decode`) for the bench config from abstract parameters (nothing allocated) and
lists the fusions in the layer loop's body that materialise a slice of a stacked weight
(`dynamic-slice` outputs of at least 64 Ki elements), i.e. a copy of that layer's matrix
made on every layer of every decode step before the matmul reads it. This is the `stacked`
decoder layout (`checkpoint.LAYOUTS`); the `per_layer` layout, which `auto` picks on CPU for
layers of this size, has no layer loop and reads every weight in place
(`benchmarks/decode_layout.py` times both).
"""

from __future__ import annotations

import argparse
import re

import jax
import jax.numpy as jnp
from flax import nnx

from ep_jax.bench_setup import get_config
from ep_jax.families.llava import FAMILY
from ep_jax.runtime.model import abstract_model
from ep_jax.runtime.prefill import decode as decode_step
from ep_jax.runtime.prefill import prefill as run_prefill

_SHAPE = re.compile(r"= f32\[([\d,]+)\]\{[\d,]*\} (?:dynamic-slice|fusion)\(")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="1b")
    p.add_argument("--prompt-len", type=int, default=640)
    p.add_argument("--dump", default=None, help="write the optimised HLO here")
    args = p.parse_args(argv)
    cfg = get_config(args.config)
    graphdef, state = abstract_model(FAMILY, cfg, jnp.float32)
    s, v = args.prompt_len, cfg.vision.image_size

    def prefill(state, ids, pix, mask):
        inputs = {"input_ids": ids, "pixel_values": pix, "attention_mask": mask}
        return run_prefill(nnx.merge(graphdef, state), inputs, None, None, decode_room=64).cache

    def decode(state, tokens, cache):
        return decode_step(nnx.merge(graphdef, state), tokens, cache)

    sds = jax.ShapeDtypeStruct
    cache = jax.eval_shape(prefill, state, sds((1, s), jnp.int32), sds((1, 3, v, v), jnp.float32),
                           sds((1, s), jnp.bool_))
    hlo = jax.jit(decode).lower(state, sds((1,), jnp.int32), cache).compile().as_text()
    if args.dump:
        with open(args.dump, "w") as f:
            f.write(hlo)
    copies = []
    for line in hlo.splitlines():
        m = _SHAPE.search(line)
        if m and "dynamic-slice" in line.split("=", 1)[1][:80] and "while/body" in line:
            dims = [int(d) for d in m.group(1).split(",")]
            n = 1
            for d in dims:
                n *= d
            if n >= 64 * 1024:
                copies.append((line.strip().split(" ")[0], dims, n))
    layers = cfg.text.num_layers
    per_layer = sum(n for _, _, n in copies) * 4
    weights = sum(a.size for a in jax.tree.leaves(state)) * 4
    print(f"{args.config}: the decode loop body materialises {len(copies)} slices of stacked weights / KV cache "
          "per layer:")
    for name, dims, _ in copies:
        print(f"  {name} f32{dims}")
    print(f"= {per_layer / 2**20:.1f} MiB per layer, {layers * per_layer / 2**30:.2f} GiB written and read again per "
          f"token (all parameters: {weights / 2**30:.2f} GiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
