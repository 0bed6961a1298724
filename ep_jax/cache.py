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


@dataclasses.dataclass(frozen=True)
class SegmentCache:
    keys: Float[Array, "l b c k h"]  # RoPE applied
    values: Float[Array, "l b c k h"]
    mask: Bool[Array, "b c"]  # which entries hold a real token (padding/pruned/unwritten: False)
    index: Int[Array, ""]  # the next entry to write

    @classmethod
    def from_prefill(cls, keys, values, valid: Bool[Array, "b s"], extra: int) -> "SegmentCache":
        """A cache of `s + extra` entries from prefill keys/values [l, b, s or s + extra, k, h]
        (`Llava._run_segment(room=extra)` already leaves the `extra` decode entries, so nothing
        is copied; shorter ones are padded here)."""
        capacity = valid.shape[1] + extra
        if keys.shape[2] != capacity:
            pad = [(0, 0), (0, 0), (0, capacity - keys.shape[2]), (0, 0), (0, 0)]
            keys, values = jnp.pad(keys, pad), jnp.pad(values, pad)
        return cls(
            keys=keys,
            values=values,
            mask=jnp.pad(valid, [(0, 0), (0, extra)]),
            index=jnp.asarray(valid.shape[1], jnp.int32),
        )

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


@dataclasses.dataclass(frozen=True)
class KVCache:
    segments: tuple[SegmentCache, ...]
    next_position: Int[Array, "b"]  # RoPE position of the next token: continues the unpruned count
    bounds: tuple[tuple[int, int], ...]  # static: the layers (lo, hi) of each segment

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.segments)


jax.tree_util.register_dataclass(SegmentCache, data_fields=["keys", "values", "mask", "index"], meta_fields=[])
jax.tree_util.register_dataclass(KVCache, data_fields=["segments", "next_position"], meta_fields=["bounds"])
