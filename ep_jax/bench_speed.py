"""`python -m ep_jax.bench speed`: measured wall time, pruned next to unpruned, in one run.

Everything runs through the same compiled functions as `ep_jax.generate` (`_prefill`,
`_decode_all`, compiled once per setting by `_compiled`), on the same inputs (a real photo and
the LLaVA-1.5 chat prompt, `bench_setup`). Each number is the median of `runs` timed calls after
`warmup` untimed ones, each call ending in `block_until_ready` (device synchronisation);
compile time is measured separately. The component timings (`profile`) and the isolated
prune-stage timing run pieces of `Llava.prefill` as separate jitted functions on the tensors
the real prefill produces there.
"""

from __future__ import annotations

import dataclasses
import functools
import resource
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ep_jax.bench_setup import DEFAULT_LAYER, Budget, encode
from ep_jax.core import flops
from ep_jax.core.budget import PruneConfig
from ep_jax.core.scorers import pool_spans_scores
from ep_jax.core.select import gather_rows, take_tokens
from ep_jax.runtime import api
from ep_jax.runtime.cache import SegmentCache
from ep_jax.runtime.engine import compile_stats, compiled
from ep_jax.runtime.prefill import PruneStage, causal_mask, prune_stage, run_segment, score_visual, sequence_rows

PAD_ID = 3
NEVER = (-1,)  # no token id is -1: decode always produces max_new tokens (random weights hit EOS)


# ------------------------------------------------------------------------------- timing
def time_calls(fn: Callable[[], Any], runs: int, warmup: int) -> list[float]:
    """Wall seconds of `runs` calls of `fn` (which must block on its result) after `warmup`."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def ms(seconds: list[float]) -> float:
    return 1e3 * statistics.median(seconds)


def _compile(fn, *args):
    """(compiled, seconds): lower + compile ahead of time, like `runtime.engine.compiled`."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def peak_memory() -> tuple[int, str]:
    """(bytes, what they are): the device allocator's peak where it reports one (GPU/TPU),
    else this process's peak resident set size (CPU: the device memory is host memory)."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use (jax memory_stats, process lifetime)"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS (getrusage, process lifetime)"


def xla_memory(compiled) -> dict[str, int] | None:
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if m is None:
        return None
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "generated_code_size_in_bytes")
    return {k: int(getattr(m, k)) for k in keys if hasattr(m, k)}


def xla_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return None if not cost or "flops" not in cost else float(cost["flops"])


# ------------------------------------------------------------------------------- inputs
@dataclasses.dataclass
class Inputs:
    input_ids: np.ndarray
    pixel_values: np.ndarray
    attention_mask: np.ndarray
    num_visual: int
    padding: str = "exact"
    arrays: dict | None = None  # the family's checked inputs
    spans: Any = None  # their visual spans

    @property
    def seq_len(self) -> int:
        return int(self.attention_mask.sum(1).max())

    def extra(self, stage: PruneStage | None) -> dict | None:
        """The per-example prune inputs of a stage: every example keeps `stage.keep`."""
        if stage is None:
            return None
        keep = np.full(len(self.input_ids), stage.keep, np.int32)
        return {"keep": keep, "pool": pool_spans_scores(self.spans, keep) if stage.config.method == "pool" else None}

    def args(self, model, stage: PruneStage | None) -> tuple:
        return (model.state, self.arrays, self.spans, self.extra(stage))


def prepare(model, processor, batch: int, padding: str = "exact") -> Inputs:
    """Host preprocessing (image + prompt -> checked arrays), as `run_generation` does it."""
    enc = encode(processor, batch, padding)
    arrays, spans = model.family.inputs(model.config, enc["input_ids"], enc["pixel_values"], enc["attention_mask"],
                                        dtype=np.dtype(model.dtype))
    return Inputs(arrays["input_ids"], arrays["pixel_values"], arrays["attention_mask"], int(spans.counts().max()),
                  padding, arrays, spans)


def analytic(cfg, seq: int, num_visual: int, layer: int | None, keep: int | None, *, bytes_per_elem: int,
             batch: int = 1) -> dict[str, Any]:
    """What `flops.py` says about one setting (per batch of `batch` identical prompts): the
    reference's decoder-only FLOPs, and the whole prefill's (vision tower + projector added)."""
    text_cfg = cfg.text
    unpruned = flops.prefill_flops(text_cfg, seq)
    pruned = flops.prefill_flops(text_cfg, seq, num_visual, layer, keep)
    vision = flops.vision_flops(cfg)
    return {
        "flops": batch * pruned,
        "flops_reduction": 1 - pruned / unpruned,
        "flops_speedup": unpruned / pruned,
        "vision_flops": batch * vision,
        "flops_reduction_with_vision": 1 - (pruned + vision) / (unpruned + vision),
        "kv_cache_bytes_analytic": batch * flops.kv_cache_bytes(text_cfg, seq, num_visual, layer, keep,
                                                                bytes_per_elem=bytes_per_elem),
    }


def make_stage(model, inputs: Inputs, method: str, layer: int, keep: int) -> PruneStage:
    stage, _ = api.resolve_stage(model, PruneConfig(method=method, layer=layer, keep=keep), inputs.arrays, inputs.spans)
    return stage


# ------------------------------------------------------------------------------- prefill / decode
class _Prefill:
    """One prefill setting, compiled ahead of time; timed calls start from the raw photo and
    prompt (host preprocessing + prefill + first greedy token = time to first token)."""

    def __init__(self, model, processor, inputs: Inputs, stage: PruneStage | None, *, room: int, batch: int):
        self.model, self.processor, self.inputs, self.room, self.batch = model, processor, inputs, room, batch
        self.stage = stage
        before = compile_stats(model)["compile_s"]
        self.compiled = compiled(model, api.prefill_logits, dict(stage=stage, decode_room=room, all_logits=False),
                                 inputs.args(model, stage))
        self.compile_s = compile_stats(model)["compile_s"] - before
        self.first_token = jax.jit(lambda logits: jnp.argmax(logits, -1))
        self.prefill_s: list[float] = []
        self.ttft_s: list[float] = []
        self.out = None

    def call(self, record: bool) -> None:
        t0 = time.perf_counter()
        fresh = prepare(self.model, self.processor, self.batch, self.inputs.padding)  # what a request pays
        t1 = time.perf_counter()
        self.out = self.compiled(*fresh.args(self.model, self.stage))
        self.out[0].block_until_ready()
        t2 = time.perf_counter()
        np.asarray(self.first_token(self.out[0]))
        t3 = time.perf_counter()
        if record:
            self.prefill_s.append(t2 - t1)
            self.ttft_s.append(t3 - t0)

    def result(self) -> dict[str, Any]:
        cache = self.out[1].cache
        room = self.room
        kv_prompt = sum(s.nbytes() * (s.capacity - room) // s.capacity for s in cache.segments)
        return {
            "compile_s": self.compile_s,
            "prefill_ms": ms(self.prefill_s),
            "prefill_ms_runs": [1e3 * t for t in self.prefill_s],
            "prefill_spread": (max(self.prefill_s) - min(self.prefill_s)) / statistics.median(self.prefill_s),
            "ttft_ms": ms(self.ttft_s),
            "ttft_ms_runs": [1e3 * t for t in self.ttft_s],
            "kv_cache_bytes": int(kv_prompt),
            "kv_cache_allocated_bytes": int(cache.nbytes()),
            "xla_memory": xla_memory(self.compiled),
            "xla_flops": xla_flops(self.compiled),
            "prompt_tokens": self.inputs.seq_len,
        }


def measure_prefills(model, processor, inputs: Inputs, stages: list[PruneStage | None], *, room: int, batch: int,
                     runs: int, warmup: int, log: Callable[[str], None] = print) -> list[_Prefill]:
    """Every setting compiled first, then timed round-robin (run i of every setting, then run
    i + 1, ...), so a slow spell of the machine hits all settings alike and the ratios between
    them, the point of the table, stay fair."""
    benches = []
    for stage in stages:
        benches.append(_Prefill(model, processor, inputs, stage, room=room, batch=batch))
        name = "unpruned" if stage is None else f"{stage.config.method} R={stage.keep}"
        log(f"compiled prefill {name} in {benches[-1].compile_s:.1f} s")
    for i in range(warmup + runs):
        for bench in benches:
            bench.call(record=i >= warmup)
    return benches


def _unpruned_callables(model, bench: _Prefill, logits, cache, *, room: int, max_new: int) -> dict[str, Callable]:
    """Blocking calls of the unpruned prefill and decode, for timing beside another framework."""
    args = bench.inputs.args(model, None)
    dargs = (model.state, logits, cache, jax.random.key(0), np.float32(0.0), np.float32(1.0), np.int32(max_new))
    decode = compiled(model, api.decode_all, dict(room=room, top_k=0, greedy=True, eos_ids=NEVER, pad_id=PAD_ID),
                      dargs)
    return {
        "prefill": lambda: bench.compiled(*args)[0].block_until_ready(),
        "decode": lambda: decode(*dargs)[0].block_until_ready(),
    }


def measure_decode(model, logits, cache, *, room: int, max_new: int, batch: int, runs: int,
                   warmup: int) -> dict[str, Any]:
    """Greedy decode of `max_new` tokens (the first comes from the prefill logits), one compiled
    while loop, never stopping early."""
    dargs = (model.state, logits, cache, jax.random.key(0), np.float32(0.0), np.float32(1.0), np.int32(max_new))
    before = compile_stats(model)["compile_s"]
    decode = compiled(model, api.decode_all, dict(room=room, top_k=0, greedy=True, eos_ids=NEVER, pad_id=PAD_ID),
                      dargs)
    compile_s = compile_stats(model)["compile_s"] - before
    steps = []

    def call():
        out, step, _ = decode(*dargs)
        out.block_until_ready()
        steps.append(int(step))

    seconds = time_calls(call, runs, warmup)
    produced = steps[-1]
    per_token = statistics.median(seconds) / (produced - 1)  # the first token came with the prefill
    return {
        "decode_compile_s": compile_s,
        "new_tokens": produced,
        "decode_ms_per_step": 1e3 * per_token,
        "decode_tokens_per_s": batch / per_token,
        "decode_s_runs": seconds,
    }


# ------------------------------------------------------------------------------- pieces of prefill
def _merge(graphdef, state):
    return nnx.merge(graphdef, state)


def _vision(graphdef, state, pixels):
    return _merge(graphdef, state).image_features(pixels)


def _embed(graphdef, state, input_ids, feats, attention_mask):
    m = _merge(graphdef, state)
    x = m.merge(input_ids, feats)
    valid = attention_mask.astype(bool)
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)  # as Llava.embed_inputs
    return x, positions, sequence_rows(valid), valid


def _segment(graphdef, state, x, positions, rows, valid, *, lo, hi, collect, room):
    m = _merge(graphdef, state)
    x, keys, values, proj, _ = run_segment(m, lo, hi, x, positions, causal_mask(rows, valid), collect=collect,
                                           room=room)
    return x, keys, values, proj


def _scores_only(graphdef, state, x, proj, positions, valid, spans, extra, *, stage):
    return score_visual(_merge(graphdef, state), x, proj, positions, valid, spans, stage, extra)


def _prune_stage(graphdef, state, x, proj, positions, valid, spans, extra, *, stage):
    """`runtime.prefill.prune_stage` + gather: everything the pruned prefill adds to the unpruned one."""
    kept, kept_valid, scores = prune_stage(_merge(graphdef, state), x, proj, positions, valid, spans, stage, extra)
    return gather_rows(x, kept), take_tokens(positions, kept), kept, kept_valid, scores


def _caches(keys, values, valid, *, room):
    # The layers already wrote keys/values with the decode room; returning them from a separate
    # jitted call would time a copy the prefill never makes, so only the entry mask comes back.
    cache = SegmentCache.from_prefill(keys, values, valid, room)
    return cache.mask, cache.index


def _head(graphdef, state, x):  # prompts are left padded: the last row is every example's last token
    return _merge(graphdef, state).logits(x[:, -1])


class _Pieces:
    """Jitted pieces of the prefill: each is compiled and run once when added (its output feeds
    the next piece), then all are timed round-robin so that drift hits them alike."""

    def __init__(self):
        self.items: dict[Any, tuple[Any, tuple]] = {}

    def add(self, key, fn, *args):
        compiled, _ = _compile(fn, *args)
        out = compiled(*args)
        jax.block_until_ready(out)
        self.items[key] = (compiled, args)
        return out

    def time(self, runs: int, warmup: int) -> dict[Any, float]:
        seconds: dict[Any, list[float]] = {k: [] for k in self.items}
        for i in range(warmup + runs):
            for key, (compiled, args) in self.items.items():
                t0 = time.perf_counter()
                jax.block_until_ready(compiled(*args))
                if i >= warmup:
                    seconds[key].append(time.perf_counter() - t0)
        return {k: ms(v) for k, v in seconds.items()}


def measure_stage_cost(model, inputs: Inputs, stages: list[PruneStage], *, runs: int, warmup: int) -> list[dict]:
    """The prune stage timed in isolation under jit, on the real layer K-1 tensors of this
    prompt: the scorer alone, and scorer + top-k selection + gather (the whole stage)."""
    pieces = _Pieces()
    g, state = model.graphdef, model.state
    feats = jax.jit(_bind(_vision, g))(state, inputs.pixel_values)
    x, positions, rows, valid = jax.jit(_bind(_embed, g))(state, inputs.input_ids, feats, inputs.attention_mask)
    by_layer: dict[int, tuple] = {}
    for i, stage in enumerate(stages):
        if stage.layer not in by_layer:
            seg = jax.jit(_bind(_segment, g, lo=0, hi=stage.layer, collect=True, room=0))
            by_layer[stage.layer] = seg(state, x, positions, rows, valid)
        hx, _, _, proj = by_layer[stage.layer]
        extra = inputs.extra(stage)
        pieces.add((i, "score"), _bind(_scores_only, g, stage=stage), state, hx, proj, positions, valid, inputs.spans,
                   extra)
        pieces.add((i, "stage"), _bind(_prune_stage, g, stage=stage), state, hx, proj, positions, valid, inputs.spans,
                   extra)
    times = pieces.time(runs, warmup)
    return [{"method": st.config.method, "keep": st.keep, "score_ms": times[(i, "score")],
             "stage_ms": times[(i, "stage")]} for i, st in enumerate(stages)]


def _bind(fn, graphdef, **static):
    def bound(*args):
        return fn(graphdef, *args, **static)

    bound.__name__ = fn.__name__
    return bound


def measure_profiles(model, inputs: Inputs, settings: dict[str, PruneStage | None], *, layer: int, room: int,
                     runs: int, warmup: int) -> dict[str, dict[str, Any]]:
    """Prefill split into its parts, each timed alone (round-robin over every part of every
    setting): vision tower + projector, embedding and merge, layers 0..K-1 (S tokens), the prune
    stage, layers K..L-1 (S' tokens; S without pruning; both write their keys/values into caches
    with the decode room, as the prefill does), KV-cache construction (what is left of it: the
    entry mask) and final norm + LM head of the last token. Decoder GFLOP/s use `flops.py`."""
    pieces = _Pieces()
    g, state = model.graphdef, model.state
    num_layers = model.config.text.num_layers
    seg = lambda lo, hi, collect: _bind(_segment, g, lo=lo, hi=hi, collect=collect, room=room)  # noqa: E731
    cache_fn = functools.partial(_caches, room=room)
    seq = inputs.input_ids.shape[1]  # the rows the layers run on (padding included)
    kept: dict[str, int] = {}
    for name, stage in settings.items():
        feats = pieces.add((name, "vision_tower"), _bind(_vision, g), state, inputs.pixel_values)
        x, positions, rows, valid = pieces.add((name, "embed_merge"), _bind(_embed, g), state, inputs.input_ids,
                                               feats, inputs.attention_mask)
        hx, k1, v1, proj = pieces.add((name, "layers_before_K"), seg(0, layer, stage is not None), state, x,
                                      positions, rows, valid)
        kept[name] = seq
        if stage is not None:
            hx, positions, rows, valid2, _ = pieces.add(
                (name, "prune_stage"), _bind(_prune_stage, g, stage=stage), state, hx, proj, positions, valid,
                inputs.spans, inputs.extra(stage))
            kept[name] = seq - stage.num_visual + stage.keep
        else:
            valid2 = valid
        hx, k2, v2, _ = pieces.add((name, "layers_from_K"), seg(layer, num_layers, False), state, hx, positions,
                                   rows, valid2)
        pieces.add((name, "kv_cache_build"), lambda *a: (cache_fn(*a[:3]), cache_fn(*a[3:])), k1, v1, valid,
                   k2, v2, valid2)
        pieces.add((name, "norm_lm_head"), _bind(_head, g), state, hx)
    times = pieces.time(runs, warmup)
    text = model.config.text
    out = {}
    for name in settings:
        parts = {part: times.get((name, part), 0.0) for part in PARTS}
        before = flops.layer_flops(text, seq) * layer
        after = flops.layer_flops(text, kept[name]) * (num_layers - layer)
        out[name] = {
            "tokens_before_K": seq,
            "tokens_from_K": kept[name],
            "parts_ms": parts,
            "sum_ms": sum(parts.values()),
            "gflops_per_s": {
                "layers_before_K": before / parts["layers_before_K"] / 1e6,
                "layers_from_K": after / parts["layers_from_K"] / 1e6,
            },
        }
    return out


PARTS = ("vision_tower", "embed_merge", "layers_before_K", "prune_stage", "layers_from_K", "kv_cache_build",
         "norm_lm_head")


def measure_vision(model, inputs: Inputs, *, runs: int, warmup: int) -> dict[str, float]:
    compiled, compile_s = _compile(_bind(_vision, model.graphdef), model.state, inputs.pixel_values)
    seconds = time_calls(lambda: compiled(model.state, inputs.pixel_values).block_until_ready(), runs, warmup)
    return {"vision_ms": ms(seconds), "vision_ms_runs": [1e3 * t for t in seconds], "vision_compile_s": compile_s}


# ------------------------------------------------------------------------------- the whole run
def run_speed(model, processor, *, budgets: list[Budget], with_unpruned: bool, methods: list[str], batch: int,
              runs: int, warmup: int, max_new: int, layer: int = DEFAULT_LAYER, profile: bool = True,
              decode: str = "ends", padding: str = "exact", log: Callable[[str], None] = print) -> dict[str, Any]:
    room = api.room_for(max_new)
    inputs = prepare(model, processor, batch, padding)
    seq, n = inputs.seq_len, inputs.num_visual
    itemsize = jnp.dtype(model.dtype).itemsize
    padded = inputs.input_ids.shape[1]
    log(f"prompt: {seq} tokens ({n} visual, {seq - n} text), batch {batch}, padded to {padded}")

    vision = measure_vision(model, inputs, runs=runs, warmup=warmup)
    log(f"vision tower + projector: {vision['vision_ms']:.1f} ms")

    settings: list[tuple[str, Budget | None]] = [("none", None)] if with_unpruned else []
    settings += [(m, b) for b in budgets for m in methods]
    stages = [None if b is None else make_stage(model, inputs, method, layer, b.keep) for method, b in settings]
    benches = measure_prefills(model, processor, inputs, stages, room=room, batch=batch, runs=runs, warmup=warmup,
                               log=log)
    if decode == "all":
        decode_keeps = {None} | {b.keep for b in budgets}
    elif decode == "ends":
        decode_keeps = {None} | ({min(b.keep for b in budgets)} if budgets else set())
    else:
        decode_keeps = set()
    rows: list[dict[str, Any]] = []
    decoded_keeps: set[int | None] = set()
    unpruned_logits = jax_unpruned = None
    for (method, b), bench in zip(settings, benches):
        keep = None if b is None else b.keep
        row: dict[str, Any] = {
            "method": method,
            "budget": "none" if b is None else b.label,
            "avg_keep": None if b is None else b.avg_keep,
            "effective_avg_keep": float(n) if b is None else b.effective_avg,
            "keep": n if b is None else b.keep,
            "layer": None if b is None else layer,
            "tokens_after_prune": seq if b is None else seq - n + b.keep,
            **bench.result(),
            **analytic(model.config, seq, n, None if b is None else layer, keep, bytes_per_elem=itemsize, batch=batch),
        }
        logits, res = bench.out
        if b is None:
            unpruned_logits = np.asarray(logits, np.float32)
            jax_unpruned = _unpruned_callables(model, bench, logits, res.cache, room=room, max_new=max_new)
        # Decode cost depends on R only (same cache shapes for every method): measured once per R.
        if keep in decode_keeps and keep not in decoded_keeps:
            row.update(measure_decode(model, logits, res.cache, room=room, max_new=max_new, batch=batch, runs=runs,
                                      warmup=warmup))
            decoded_keeps.add(keep)
        bench.out = None  # free the cache
        mem, row["peak_memory_source"] = peak_memory()
        row["peak_memory_bytes"] = mem
        rows.append(row)
        log(f"{method:8s} A={row['budget']:>4s} R={row['keep']:4d}: prefill {row['prefill_ms']:9.1f} ms "
            f"(spread {100 * row['prefill_spread']:.0f}%)  ttft {row['ttft_ms']:9.1f} ms"
            + (f"  decode {row['decode_tokens_per_s']:.2f} tok/s" if "decode_tokens_per_s" in row else ""))

    base = next((r for r in rows if r["method"] == "none"), None)
    for r in rows:
        if base is not None:
            r["prefill_speedup"] = base["prefill_ms"] / r["prefill_ms"]
            r["time_reduction"] = 1 - r["prefill_ms"] / base["prefill_ms"]
            r["realised"] = r["time_reduction"] / r["flops_reduction"] if r["flops_reduction"] > 0 else None
            r["realised_with_vision"] = (r["time_reduction"] / r["flops_reduction_with_vision"]
                                         if r["flops_reduction_with_vision"] > 0 else None)

    stages = [make_stage(model, inputs, m, layer, b.keep) for b in budgets for m in methods]
    scoring = measure_stage_cost(model, inputs, stages, runs=runs, warmup=warmup) if stages else []
    for s in scoring:
        row = next(r for r in rows if r["method"] == s["method"] and r["keep"] == s["keep"])
        s["budget"] = row["budget"]
        s["prefill_ms"] = row["prefill_ms"]
        s["score_pct_of_prefill"] = 100 * s["score_ms"] / row["prefill_ms"]
        s["stage_pct_of_prefill"] = 100 * s["stage_ms"] / row["prefill_ms"]
        pool = next((r for r in rows if r["method"] == "pool" and r["keep"] == s["keep"]), None)
        s["prefill_minus_pool_ms"] = None if pool is None else row["prefill_ms"] - pool["prefill_ms"]
        log(f"prune stage {s['method']:8s} R={s['keep']:4d}: scorer {s['score_ms']:.2f} ms, "
            f"stage {s['stage_ms']:.2f} ms = {s['stage_pct_of_prefill']:.2f}% of prefill")

    prof = None
    if profile:
        settings_p: dict[str, PruneStage | None] = {"none": None} if with_unpruned else {}
        if budgets:
            smallest = min(budgets, key=lambda b: b.keep)
            method = "entropy" if "entropy" in methods else methods[0]
            settings_p[f"{method}@{smallest.label}"] = make_stage(model, inputs, method, layer, smallest.keep)
        prof = measure_profiles(model, inputs, settings_p, layer=layer, room=room, runs=runs, warmup=warmup)
        for name, p in prof.items():
            log(f"profile {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in p["parts_ms"].items())
                + f" (sum {p['sum_ms']:.1f} ms)")

    return {
        "prompt": {"tokens": seq, "visual_tokens": n, "text_tokens": seq - n, "batch": batch, "padding": padding,
                   "padded_length": padded},
        "layer": layer,
        "runs": runs,
        "warmup": warmup,
        "max_new_tokens": max_new,
        "decode_measured_for": decode,
        "decode_room": room,
        **vision,
        "rows": rows,
        "scoring": scoring,
        "profile": prof,
        "_inputs": inputs,
        "_unpruned_logits": unpruned_logits,
        "_jax_unpruned": jax_unpruned,
    }
