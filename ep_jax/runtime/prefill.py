"""Prefill and decode of any family, with THE PRUNE STAGE between two runs of decoder layers.

    model.embed_inputs(inputs) -> x [b, s, d], positions (a pytree: [b, s], or [3, b, s] for M-RoPE)
        -> layers 0..K-1 on all S tokens
        -> PRUNE STAGE (`prune_stage`: score the visual slots from layer K-1, keep each
           example's top R, gather the kept rows of x, positions and the mask)
        -> layers K..L-1 on the kept rows (original positions) -> logits

Everything has static shapes (a masked top-k plus a gather). The model passed in is a family
module (`families/base.py`: `embed_inputs`, `layers` with `qkv`/`finish`, `norm`, `logits`, `rope`,
`embed_tokens`, `decode_positions`); nothing here knows which family it is.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from ep_jax.core.budget import PruneConfig
from ep_jax.core.scorers import SCORERS, ScoreInputs
from ep_jax.core.select import gather_rows, select_kept, take_tokens
from ep_jax.core.spans import VisualSpans
from ep_jax.nn.layers import scan_layers
from ep_jax.nn.partition import active_mesh_shape, constrain
from ep_jax.runtime.cache import KVCache, SegmentCache, shard_entries, write_entry

# observe(layer_index, hidden_in, projections, hidden_out, context) -> a pytree stacked over layers
Observer = Callable[[Any, Array, Any, Array, "LayerContext"], Any]


@dataclasses.dataclass(frozen=True)
class PruneStage:
    """A resolved pruning setting: the static numbers one compiled graph is built for.
    Each example's own R (<= `keep`) comes in as an array."""

    config: PruneConfig
    layer: int  # K: first layer that sees the pruned sequence
    keep: int  # R_max: the largest R of the batch
    num_visual: int  # n: visual slots per example (the static maximum of N)
    kept_len: int  # rows after the prune stage


@dataclasses.dataclass(frozen=True)
class PrefillResult:
    hidden: Float[Array, "b r d"]  # last layer output (before the final norm) of the returned rows
    rows: Int[Array, "b r"]  # original sequence index of each returned row
    row_valid: Bool[Array, "b r"]  # which returned rows hold a real token
    cache: KVCache
    kept_mask: Bool[Array, "b s"]  # tokens that reach the layers after the prune stage
    scores: Float[Array, "b n"] | None  # prune scores of the visual slots (None: no pruning)
    observed: Any = None  # what an observer collected, stacked over layers


jax.tree_util.register_dataclass(
    PrefillResult,
    data_fields=["hidden", "rows", "row_valid", "cache", "kept_mask", "scores", "observed"],
    meta_fields=[],
)


@dataclasses.dataclass(frozen=True)
class LayerContext:
    """What an observer may read besides the layer's own tensors."""

    model: Any
    spans: VisualSpans | None
    valid: Bool[Array, "b s"]


def causal_mask(rows: Int[Array, "b s"], valid: Bool[Array, "b s"]) -> Bool[Array, "b s s"]:
    """Query i sees key j iff j comes no later in the original sequence and j is real."""
    return (rows[:, None, :] <= rows[:, :, None]) & valid[:, None, :]


def sequence_rows(valid: Bool[Array, "b s"]) -> Int[Array, "b s"]:
    return jnp.broadcast_to(jnp.arange(valid.shape[1], dtype=jnp.int32), valid.shape)


def next_positions(positions, valid: Bool[Array, "b s"]) -> Int[Array, "b"]:
    """The position the first generated token takes: one past the largest position of a real
    prompt token (the unpruned count for 1-D RoPE; M-RoPE's `max + 1`)."""
    def leaf_max(p):
        m = jnp.max(jnp.where(valid, p, -1), axis=-1)  # [b], or [3, b]
        return m.reshape(-1, m.shape[-1]).max(0)

    return (functools.reduce(jnp.maximum, map(leaf_max, jax.tree.leaves(positions))) + 1).astype(jnp.int32)


def run_segment(model, lo: int, hi: int, x, positions, mask, *, causal: bool = True, room: int = 0,
                collect: bool = False, observe: Observer | None = None, context: LayerContext | None = None):
    """Layers lo..hi-1 of `model.layers`; returns (x, keys, values, last projections, observed).

    keys/values [l, b, s + room, k, h] (a tuple of l [b, s + room, k, h] in the per-layer
    layout): each layer writes its entries straight into a cache with `room` empty slots for
    decode (padding the stacked cache afterwards would copy it all).
    """
    pad = ((0, 0), (0, room), (0, 0), (0, 0))

    def body(layer, h, i):
        q, k, v, proj = layer.qkv(h, positions)
        out = constrain(layer.finish(h, q, k, v, mask, causal=causal), "batch", None, None)
        seen = None if observe is None else observe(i, h, proj, out, context)
        if room:
            k, v = jnp.pad(k, pad), jnp.pad(v, pad)
        return out, (k, v, proj if collect else None, seen)

    # Keys, values and projections stay one buffer per layer in the per-layer layout; what the
    # observer saw is stacked over layers.
    x, (keys, values, projs, seen) = scan_layers(model.layers, lo, hi, body, x, np.arange(lo, hi),
                                                 stack=(False, False, False, True))
    last = jax.tree.map(lambda a: a[-1], projs, is_leaf=lambda a: isinstance(a, tuple)) if collect else None
    return x, keys, values, last, seen


def prefill(model, inputs: dict[str, Any], spans: VisualSpans | None, stage: PruneStage | None,
            prune_inputs: dict[str, Any] | None = None, decode_room: int = 0,
            observe: Observer | None = None) -> PrefillResult:
    """The prompt through every layer, pruned at `stage.layer` when a stage is given.

    `inputs`: the family's arrays (input_ids, attention_mask, pixel values, ...);
    `prune_inputs`: {"keep": [b] each example's R, "pool": [b, n] host pool scores or None}.
    """
    x, positions = model.embed_inputs(inputs)
    x = constrain(x, "batch", None, None)  # on a mesh: examples over `data` from here on
    valid = inputs["attention_mask"].astype(bool)
    b, s = valid.shape
    num_layers = model.num_layers
    rows = sequence_rows(valid)
    next_position = next_positions(positions, valid)
    context = LayerContext(model, spans, valid)

    layer = num_layers if stage is None else stage.layer
    x, keys, values, proj, seen = run_segment(model, 0, layer, x, positions, causal_mask(rows, valid),
                                              room=decode_room, collect=stage is not None,
                                              observe=observe, context=context)
    segments = [SegmentCache.from_prefill(keys, values, valid, decode_room)]
    kept_mask, row_valid, scores = valid, valid, None
    observed = [seen]

    if stage is not None:
        kept, kept_valid, scores = prune_stage(model, x, proj, positions, valid, spans, stage, prune_inputs)
        kept_mask = jnp.zeros((b, s), bool).at[jnp.arange(b)[:, None], kept].max(kept_valid)
        if stage.config.mode == "mask":
            # Verification oracle: full length, dropped tokens hidden from every later query.
            row_valid = valid & kept_mask
        else:
            x = constrain(gather_rows(x, kept), "batch", None, None)
            positions = take_tokens(positions, kept)  # original positions: gaps
            rows, row_valid = kept, kept_valid
        context = LayerContext(model, None, row_valid)
        x, keys, values, _, seen = run_segment(model, layer, num_layers, x, positions, causal_mask(rows, row_valid),
                                               room=decode_room, observe=observe, context=context)
        segments.append(SegmentCache.from_prefill(keys, values, row_valid, decode_room))
        observed.append(seen)

    bounds = ((0, layer),) if stage is None else ((0, layer), (layer, num_layers))
    cache = KVCache(tuple(segments), next_position, bounds)
    return PrefillResult(x, rows, row_valid, cache, kept_mask & valid, scores,
                         None if observe is None else tuple(observed))


def prune_stage(model, x, proj, positions, valid, spans: VisualSpans, stage: PruneStage,
                prune_inputs: dict[str, Any]) -> tuple[Int[Array, "b r"], Bool[Array, "b r"], Float[Array, "b n"]]:
    """THE PRUNE STAGE (docs/ALGORITHM.md §5), between layer K-1 and layer K.

    Scores every visual slot from layer K-1's tensors (`proj`: its q/k/v before RoPE; `x`: its
    output), keeps each example's text plus its own top-R visual tokens, and returns the kept
    sequence indices in original order [b, kept_len], which of them are real, and the scores
    [b, n]. Static shapes: a masked top-k, no host round trip.
    """
    # On a mesh each example is scored and selected on the devices that hold it: the scores and
    # the kept indices stay split by example; no sequence moves between `data` shards.
    scores = constrain(score_visual(model, x, proj, positions, valid, spans, stage, prune_inputs), "batch", None)
    kept, kept_valid = select_kept(scores, spans.positions, spans.valid, valid, prune_inputs["keep"], stage.kept_len)
    return constrain(kept, "batch", None), kept_valid, scores


def score_visual(model, x, proj, positions, valid, spans: VisualSpans, stage: PruneStage,
                 prune_inputs: dict[str, Any]) -> Float[Array, "b n"]:
    """The method's scores `[b, n]` of the visual slots from layer K-1's tensors."""
    # Each example is scored whole (all its heads) on one device, the examples spread over every
    # device, so the eigenvalue solves split over the mesh instead of each `model` device
    # repeating the whole batch.
    proj = jax.tree.map(lambda a: constrain(a, "examples", None, None, None), proj)
    inputs = ScoreInputs(
        query=proj.query, key=proj.key, value=proj.value, hidden=model.norm(x), positions=positions,
        attention_mask=valid, visual_positions=spans.positions, visual_valid=spans.valid,
        rope=model.rope, pool=prune_inputs.get("pool"),
    )
    scorer = functools.partial(SCORERS[stage.config.method], cfg=stage.config, keep=stage.keep)
    chunk = _cpu_mesh_chunk(x.shape[0], spans.positions.shape[1])
    if chunk is None or stage.config.method != "entropy":
        return scorer(inputs)
    return _score_in_chunks(scorer, inputs, chunk)


# XLA:CPU on a mesh: LAPACK's batched eigenvalue solver splits a large batch over the thread pool
# that the devices' programs themselves run on; with every device inside it at once (they arrive
# together after a collective) the pool deadlocks. Solving at most this many matrices per call,
# one call after another, keeps each solve on its own thread. GPUs and TPUs are unaffected.
CPU_MESH_SOLVES = 32


def _cpu_mesh_chunk(batch: int, slots: int) -> int | None:
    """Visual slots scored per call on a CPU mesh (None: all at once)."""
    mesh = active_mesh_shape()
    if not mesh or jax.default_backend() != "cpu":
        return None
    devices = int(np.prod(list(mesh.values())))
    data = mesh.get("data", 1)
    per_device = batch // devices if batch % devices == 0 else batch // data if batch % data == 0 else batch
    chunk = max(1, CPU_MESH_SOLVES // max(per_device, 1))
    return None if chunk >= slots else chunk


def _score_in_chunks(scorer, inputs: ScoreInputs, chunk: int) -> Float[Array, "b n"]:
    """A per-token scorer over the visual slots `chunk` at a time, in sequence (`lax.map`)."""
    b, n = inputs.visual_positions.shape
    pad = -n % chunk

    def split(a):  # [b, n] -> [n / chunk, b, chunk]
        a = jnp.pad(a, ((0, 0), (0, pad)))
        return jnp.moveaxis(a.reshape(b, -1, chunk), 1, 0)

    def one(part):
        where, real = part
        return scorer(dataclasses.replace(inputs, visual_positions=where, visual_valid=real))

    scores = jax.lax.map(one, (split(inputs.visual_positions), split(inputs.visual_valid)))
    return jnp.moveaxis(scores, 0, 1).reshape(b, -1)[:, :n]


def last_rows(res: PrefillResult) -> Int[Array, "b"]:
    """Row of every example's last real token (its next-token logits)."""
    index = jnp.arange(res.rows.shape[1])
    return jnp.max(jnp.where(res.row_valid, index, -1), axis=1)


def decode(model, tokens: Int[Array, "b"], cache: KVCache) -> tuple[Float[Array, "b v"], KVCache]:
    """One new token per example through every layer; positions continue from the unpruned
    prompt (the family's rule), each segment attends over its own cache."""
    x = model.embed_tokens(tokens)[:, None]
    positions = model.decode_positions(cache.next_position)
    new_segments = []
    for (lo, hi), seg in zip(cache.bounds, cache.segments):
        idx = seg.index
        written = jnp.arange(seg.capacity) == idx
        key_mask = seg.mask | written[None, :]

        def body(layer, carry, i, idx=idx, key_mask=key_mask):
            h, keys, values = carry
            q, k, v, _ = layer.qkv(h, positions)
            keys = shard_entries(write_entry(keys, i, k, idx))
            values = shard_entries(write_entry(values, i, v, idx))
            h = layer.finish(h, q, keys[i], values[i], key_mask[:, None, :])
            return (h, keys, values), None

        (x, keys, values), _ = scan_layers(model.layers, lo, hi, body, (x, seg.keys, seg.values), np.arange(hi - lo))
        new_segments.append(SegmentCache(keys, values, key_mask, idx + 1))
    logits = model.logits(x[:, 0])
    return logits, KVCache(tuple(new_segments), cache.next_position + 1, cache.bounds)
