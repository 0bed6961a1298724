"""`python -m ep_jax.bench compile`: lowering + compile time of the prefill and of one decode
step, with abstract parameters (`jax.ShapeDtypeStruct`, `checkpoint.abstract_model`): no weight
is allocated, so the 7B graph compiles on a laptop. Two decoder depths show how compile time
grows with the number of layers in each decoder weight layout (`runtime.model.LAYOUTS`): not at all
when the layers run under `lax.scan` (stacked), linearly when the loop is unrolled (per_layer).
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ep_jax.bench_setup import DEFAULT_LAYER, PAD, LLAVA, get_config, resolve_budgets
from ep_jax.core.budget import PruneConfig
from ep_jax.core.spans import VisualSpans
from ep_jax.runtime import api
from ep_jax.runtime.model import DTYPES, abstract_model
from ep_jax.runtime.prefill import PruneStage

TEXT_TOKENS = 60  # the benchmark prompt's text length, about


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


def _timed(fn: Callable, args: tuple) -> tuple[float, float, Any]:
    t0 = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    return t1 - t0, time.perf_counter() - t1, compiled


def compile_times(config: str, num_layers: int, dtype: str, batch: int, stage_budget: int | None,
                  max_new: int = 64, layout: str = "stacked") -> dict[str, Any]:
    """Lower and compile `prefill_logits` and `decode_step` for abstract inputs of the bench prompt shape.

    The pruned prefill keeps the R that `stage_budget` gives at the config's own depth, at every
    depth (a shallower model could not meet the same A)."""
    cfg = get_config(config, num_layers)
    jdtype = DTYPES[dtype]
    graphdef, state = abstract_model(LLAVA, cfg, jdtype, layout)
    n = cfg.image_seq_len
    seq = n + TEXT_TOKENS
    v = cfg.vision
    ids = _sds((batch, seq), jnp.int32)
    pix = _sds((batch, v.num_channels, v.image_size, v.image_size), jdtype)
    mask = _sds((batch, seq), jnp.bool_)
    room = api.room_for(max_new)
    stage = extra = None
    if stage_budget is not None:
        keep = resolve_budgets([stage_budget], get_config(config), DEFAULT_LAYER)[0].keep
        stage = PruneStage(PruneConfig(method="entropy", layer=DEFAULT_LAYER, keep=keep), DEFAULT_LAYER,
                           keep, n, seq - n + keep)
        extra = {"keep": _sds((batch,), jnp.int32), "pool": None}
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": pix}
    spans = VisualSpans(_sds((batch, n), jnp.int32), _sds((batch, n), jnp.bool_), _sds((batch, n), jnp.int32),
                        _sds((batch, n, 3), jnp.int32), _sds((batch, n, 3), jnp.int32))

    prefill = functools.partial(api.prefill_logits, graphdef, stage=stage, decode_room=room, all_logits=False)
    lower_p, compile_p, _ = _timed(prefill, (state, inputs, spans, extra))

    logits, res = jax.eval_shape(prefill, state, inputs, spans, extra)
    statics = dict(top_k=0, greedy=True, eos_ids=(2,), pad_id=PAD)
    key = jax.eval_shape(lambda: jax.random.key(0))
    scalar = _sds((), jnp.float32)
    first = functools.partial(api.first_token, graphdef, room=room, **statics)
    decode_state = jax.eval_shape(first, logits, res.cache, key, scalar, scalar)
    step = functools.partial(api.decode_step, graphdef, **statics)
    lower_d, compile_d, _ = _timed(step, (state, decode_state, scalar, scalar))
    return {
        "config": config,
        "num_layers": num_layers,
        "layout": layout,
        "dtype": dtype,
        "batch": batch,
        "seq_len": seq,
        "prune": None if stage is None else {"method": "entropy", "layer": stage.layer, "keep": stage.keep,
                                             "avg_keep_n576": stage_budget},
        "prefill_lower_s": lower_p,
        "prefill_compile_s": compile_p,
        "decode_step_lower_s": lower_d,
        "decode_step_compile_s": compile_d,
        "abstract_param_bytes": int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize
                                        for x in jax.tree.leaves(state))),
    }


def run_compile(config: str, layer_counts: list[int], dtype: str, batch: int, budget: int | None,
                log: Callable[[str], None] = print, layouts: tuple[str, ...] = ("stacked",)) -> list[dict[str, Any]]:
    out = []
    for layout, num_layers in ((a, n) for a in layouts for n in layer_counts):
        for b in (None, budget) if budget is not None else (None,):
            r = compile_times(config, num_layers, dtype, batch, b, layout=layout)
            out.append(r)
            log(f"{config} {layout} L={num_layers:3d} {'unpruned' if b is None else f'entropy A={b}':>14s}: prefill lower "
                f"{r['prefill_lower_s']:.2f} s + compile {r['prefill_compile_s']:.2f} s; decode step lower "
                f"{r['decode_step_lower_s']:.2f} s + compile {r['decode_step_compile_s']:.2f} s")
    return out


def markdown(rows: list[dict[str, Any]], machine: dict[str, Any], command: str) -> str:
    lines = [
        f"# ep_jax compile time (abstract parameters, nothing allocated) on {machine['device_kind']}",
        "",
        f"Command: `{command}`; jax {machine['jax']}, jaxlib {machine['jaxlib']}.",
        "",
        "| config | layout | layers | prune | seq | prefill lower s | prefill compile s | decode step lower s | "
        "decode step compile s | params (abstract) GiB |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        prune = "none" if r["prune"] is None else f"entropy K={r['prune']['layer']} R={r['prune']['keep']}"
        lines.append(f"| {r['config']} | {r.get('layout', 'stacked')} | {r['num_layers']} | {prune} | {r['seq_len']} | {r['prefill_lower_s']:.2f} | "
                     f"{r['prefill_compile_s']:.2f} | {r['decode_step_lower_s']:.2f} | "
                     f"{r['decode_step_compile_s']:.2f} "
                     f"| {r['abstract_param_bytes'] / 2**30:.2f} |")
    return "\n".join(lines) + "\n"
