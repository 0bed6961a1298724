"""The KV cache: plain pytrees, one segment per run of layers that share a sequence length.

Without pruning there is one segment (all layers, the prompt's S entries). With pruning at
layer K there are two: layers 0..K-1 over S entries and layers K..L-1 over the S - N + R kept
entries. Each segment has room for the decode steps after its prompt entries.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ep_jax.nn.partition import constrain


# A segment's keys or values: one [l, b, c, k, h] array (stacked layer weights) or a tuple of
# l [b, c, k, h] arrays (per-layer weights, `Llava(layout="per_layer")`), so that each layer's
# decode step updates and reads its own buffer in place.
Entries = Float[Array, "l b c k h"] | tuple[Float[Array, "b c k h"], ...]


def write_entry(entries: Entries, layer, new: Float[Array, "b 1 k h"], index) -> Entries:
    """`entries` with layer `layer`'s (a traced int for stacked, a Python int per layer)
    entry `index` set to `new`."""
    if isinstance(entries, tuple):
        updated = jax.lax.dynamic_update_slice(entries[layer], new.astype(entries[layer].dtype), (0, index, 0, 0))
        return entries[:layer] + (updated,) + entries[layer + 1:]
    return jax.lax.dynamic_update_slice(entries, new[None].astype(entries.dtype), (layer, 0, index, 0, 0))


def _entries_map(fn, entries: Entries) -> Entries:
    return tuple(fn(e, 1) for e in entries) if isinstance(entries, tuple) else fn(entries, 2)


def shard_entries(entries: Entries) -> Entries:
    """Keys or values constrained to the mesh (no-op without one): examples over `data`, kv
    heads over `model` (replicated where the kv heads do not divide the `model` axis)."""
    return _entries_map(lambda e, _: constrain(e, "batch", None, "kv_heads", None), entries)


@dataclasses.dataclass(frozen=True)
class SegmentCache:
    keys: Entries  # RoPE applied
    values: Entries
    mask: Bool[Array, "b c"]  # which entries hold a real token (padding/pruned/unwritten: False)
    index: Int[Array, ""]  # the next entry to write

    @classmethod
    def from_prefill(cls, keys, values, valid: Bool[Array, "b s"], extra: int) -> "SegmentCache":
        """A cache of `s + extra` entries from prefill keys/values [l, b, s or s + extra, k, h]
        (or tuples of per-layer ones; `Llava._run_segment(room=extra)` already leaves the `extra`
        decode entries, so nothing is copied; shorter ones are padded here)."""
        capacity = valid.shape[1] + extra

        def fill(a, axis):
            if a.shape[axis] == capacity:
                return a
            pad = [(0, 0)] * a.ndim
            pad[axis] = (0, capacity - a.shape[axis])
            return jnp.pad(a, pad)

        keys, values = shard_entries(_entries_map(fill, keys)), shard_entries(_entries_map(fill, values))
        return cls(
            keys=keys,
            values=values,
            mask=jnp.pad(valid, [(0, 0), (0, extra)]),
            index=jnp.asarray(valid.shape[1], jnp.int32),
        )

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[1] if isinstance(self.keys, tuple) else self.keys.shape[2]

    def nbytes(self) -> int:
        return sum(a.nbytes for a in jax.tree.leaves((self.keys, self.values)))


@dataclasses.dataclass(frozen=True)
class KVCache:
    segments: tuple[SegmentCache, ...]
    next_position: Int[Array, "b"]  # RoPE position of the next token: continues the unpruned count
    bounds: tuple[tuple[int, int], ...]  # static: the layers (lo, hi) of each segment

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.segments)


jax.tree_util.register_dataclass(SegmentCache, data_fields=["keys", "values", "mask", "index"], meta_fields=[])
jax.tree_util.register_dataclass(KVCache, data_fields=["segments", "next_position"], meta_fields=["bounds"])
