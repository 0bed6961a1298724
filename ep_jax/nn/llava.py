"""The whole LLaVA model, with the EntropyPrune stage between two runs of decoder layers.

Prefill, in three steps (embed image, embed text, merge) and two layer segments:

    pixels -> vision tower -> projector ---------------------.
    input_ids -> token embeddings -> merge at <image> slots -> layers 0..K-1 (all S tokens)
        -> PRUNE STAGE (score visual tokens from layer K-1's queries, keep top R, gather)
        -> layers K..L-1 (S - N + R tokens, original positions) -> norm -> logits

Everything has static shapes: the prune stage is a masked top-k plus a gather.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from ep_jax import prune as prune_lib
from ep_jax.cache import KVCache, SegmentCache, write_entry
from ep_jax.config import LlavaConfig
from ep_jax.nn.clip import VisionTower
from ep_jax.nn.layers import RMSNorm, activation, dense, param, scan_layers, stacked
from ep_jax.nn.llama import DecoderLayer, Projections, rope


@dataclasses.dataclass(frozen=True)
class PrefillResult:
    hidden: Float[Array, "b r d"]  # last layer output (before the final norm) of the returned rows
    rows: Int[Array, "b r"]  # original sequence index of each returned row
    cache: KVCache
    kept_mask: Bool[Array, "b s"]  # tokens that reach the layers after the prune stage
    scores: Float[Array, "b n"] | None  # prune scores of the visual slots (None: no pruning)
    visual_positions: Int[Array, "b n"] | None


jax.tree_util.register_dataclass(
    PrefillResult,
    data_fields=["hidden", "rows", "cache", "kept_mask", "scores", "visual_positions"],
    meta_fields=[],
)


@dataclasses.dataclass(frozen=True)
class PruneStage:
    """A resolved pruning setting: the static numbers the compiled graph is built for."""

    config: prune_lib.PruneConfig
    layer: int  # K: first layer that sees the pruned sequence
    keep: int  # R: visual tokens kept
    num_visual: int  # N: visual slots per example


class Llava(nnx.Module):
    def __init__(self, cfg: LlavaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs, layout: str = "stacked"):
        """`layout` of the decoder weights: "stacked" (one array per weight with a leading layer
        axis, the layers run under `lax.scan`) or "per_layer" (`nnx.List` of layers, a loop
        unrolled in the graph); see `layers.scan_layers` and `checkpoint.LAYOUTS`."""
        self.cfg = cfg
        t = cfg.text
        self.vision = VisionTower(cfg.vision, dtype=dtype, rngs=rngs)
        dv, d = cfg.vision.hidden_size, t.hidden_size
        self.proj1, self.proj1_bias = param(rngs, (dv, d), dtype), param(None, (d,), dtype)
        self.proj2, self.proj2_bias = param(rngs, (d, d), dtype), param(None, (d,), dtype)
        self.embed = param(rngs, (t.vocab_size, d), dtype)
        if layout == "stacked":
            self.layers = stacked(lambda r: DecoderLayer(t, dtype=dtype, rngs=r), t.num_layers, rngs)
        elif layout == "per_layer":
            self.layers = nnx.List([DecoderLayer(t, dtype=dtype, rngs=rngs) for _ in range(t.num_layers)])
        else:
            raise ValueError(f"layout {layout!r}: choose 'stacked' or 'per_layer'")
        self.norm = RMSNorm(d, t.rms_norm_eps, dtype)
        if not t.tie_word_embeddings:
            self.lm_head = param(rngs, (d, t.vocab_size), dtype)

    # ------------------------------------------------------------------ embeddings
    def image_features(self, pixels: Float[Array, "i c hh ww"]) -> Float[Array, "i n d"]:
        """Vision tower at `vision_feature_layer`, CLS dropped unless strategy 'full', projected."""
        feats = self.vision(pixels, self.cfg.vision_layers_used)
        if self.cfg.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]
        h = dense(feats, self.proj1.value, "ipv,vd->ipd") + self.proj1_bias.value
        h = activation(self.cfg.projector_hidden_act)(h)
        return dense(h, self.proj2.value, "ipd,de->ipe") + self.proj2_bias.value

    def embed_inputs(
        self, input_ids: Int[Array, "b s"], image_features: Float[Array, "i n d"] | None
    ) -> Float[Array, "b s d"]:
        """Token embeddings with the image features written, in order, at the <image> slots.

        The k-th image slot of the flattened batch takes the k-th feature row (as Hugging Face
        does), so each example can hold its image anywhere and several images per batch work.
        """
        table = self.embed.value
        x = jnp.take(table, input_ids, axis=0, mode="clip")
        if image_features is None:
            return x
        is_image = input_ids == self.cfg.image_token_id
        flat = image_features.reshape(-1, image_features.shape[-1]).astype(x.dtype)
        slot = jnp.cumsum(is_image.reshape(-1)) - 1
        merged = jnp.take(flat, jnp.clip(slot, 0, flat.shape[0] - 1), axis=0).reshape(x.shape)
        return jnp.where(is_image[..., None], merged, x)

    def logits(self, h: Float[Array, "... d"]) -> Float[Array, "... v"]:
        h = self.norm(h)
        if self.cfg.text.tie_word_embeddings:
            return jnp.einsum("...d,vd->...v", h, self.embed.value, preferred_element_type=jnp.float32)
        return jnp.einsum("...d,dv->...v", h, self.lm_head.value, preferred_element_type=jnp.float32)

    # ------------------------------------------------------------------ prefill
    def _run_segment(self, lo, hi, x, positions, mask, *, collect: bool, room: int = 0):
        """Layers lo..hi-1 on the full (or kept) sequence; returns (x, keys, values, last proj).

        keys/values [l, b, s + room, k, h] (a tuple of l [b, s + room, k, h] in the per-layer
        layout): each layer writes its entries straight into a cache with `room` empty slots for
        decode (padding the stacked cache afterwards copies it all).
        """
        pad = ((0, 0), (0, room), (0, 0), (0, 0))

        def body(layer, h, _):
            h, (k, v), proj = layer(h, positions, mask)
            if room:
                k, v = jnp.pad(k, pad), jnp.pad(v, pad)
            return h, (k, v, proj if collect else None)

        x, (keys, values, projs) = scan_layers(self.layers, lo, hi, body, x, stack=False)
        last = jax.tree.map(lambda a: a[-1], projs, is_leaf=lambda a: isinstance(a, tuple)) if collect else None
        return x, keys, values, last

    def prefill(
        self,
        input_ids: Int[Array, "b s"],
        pixel_values: Float[Array, "i c hh ww"] | None,
        attention_mask: Bool[Array, "b s"],
        stage: PruneStage | None,
        decode_room: int = 0,
    ) -> PrefillResult:
        cfg = self.cfg
        b, s = input_ids.shape
        num_layers = cfg.text.num_layers
        feats = None if pixel_values is None else self.image_features(pixel_values)
        x = self.embed_inputs(input_ids, feats)
        valid, positions, rows = prompt_layout(attention_mask)
        next_position = jnp.sum(valid, axis=1).astype(jnp.int32)

        layer = num_layers if stage is None else stage.layer
        mask = _causal(rows, valid)
        x, keys, values, proj = self._run_segment(0, layer, x, positions, mask, collect=stage is not None,
                                                  room=decode_room)
        segments = [SegmentCache.from_prefill(keys, values, valid, decode_room)]
        kept_mask = valid
        scores = visual_positions = None

        if stage is not None:
            kept, scores, visual_positions = self.prune_stage(x, proj, input_ids, positions, valid, stage)
            kept_mask = jnp.zeros((b, s), bool).at[jnp.arange(b)[:, None], kept].set(True)
            if stage.config.mode == "mask":
                # Verification oracle: full length, dropped tokens hidden from every later query.
                kept_valid = valid & kept_mask
            else:
                x = prune_lib.gather_rows(x, kept)
                positions = prune_lib.gather_rows(positions, kept)  # original positions: gaps
                rows = kept
                kept_valid = prune_lib.gather_rows(valid, kept)
            x, keys, values, _ = self._run_segment(
                layer, num_layers, x, positions, _causal(rows, kept_valid), collect=False, room=decode_room
            )
            segments.append(SegmentCache.from_prefill(keys, values, kept_valid, decode_room))

        bounds = ((0, layer),) if stage is None else ((0, layer), (layer, num_layers))
        cache = KVCache(tuple(segments), next_position, bounds)
        return PrefillResult(x, rows, cache, kept_mask & valid, scores, visual_positions)

    def score_inputs(
        self,
        x: Float[Array, "b s d"],
        proj: Projections,
        input_ids: Int[Array, "b s"],
        positions: Int[Array, "b s"],
        valid: Bool[Array, "b s"],
        num_visual: int,
    ) -> prune_lib.ScoreInputs:
        """What every scorer may read at the prune point: layer K-1's q/k/v before RoPE
        (`proj`), its normalised output, and where the `num_visual` image tokens sit."""
        is_visual = input_ids == self.cfg.image_token_id
        visual_positions = jax.vmap(lambda m: jnp.nonzero(m, size=num_visual)[0])(is_visual)
        visual_positions = visual_positions.astype(jnp.int32)
        return prune_lib.ScoreInputs(
            query=proj.query,
            key=proj.key,
            value=proj.value,
            hidden=self.norm(x),
            positions=positions,
            attention_mask=valid,
            visual_positions=visual_positions,
            visual_valid=jnp.take_along_axis(valid, visual_positions, axis=1),
            rope=lambda t, p: rope(t, p, self.cfg.text),
        )

    def prune_stage(
        self,
        x: Float[Array, "b s d"],
        proj: Projections,
        input_ids: Int[Array, "b s"],
        positions: Int[Array, "b s"],
        valid: Bool[Array, "b s"],
        stage: PruneStage,
    ) -> tuple[Int[Array, "b r"], Float[Array, "b n"], Int[Array, "b n"]]:
        """THE PRUNE STAGE (ALGORITHM.md §5), between layer K-1 and layer K.

        Scores every visual token from layer K-1's tensors (`proj`: its q/k/v before RoPE;
        `x`: its output), keeps all text and padding plus the top-R visual tokens, and returns
        the kept sequence indices in original order [b, S - N + R], the scores [b, N] and the
        visual positions [b, N]. Static shapes: a masked top-k, no host round trip.
        """
        inputs = self.score_inputs(x, proj, input_ids, positions, valid, stage.num_visual)
        scores = prune_lib.SCORERS[stage.config.method](inputs, stage.config, stage.keep)
        kept = prune_lib.select_kept(scores, inputs.visual_positions, inputs.visual_valid, x.shape[1], stage.keep)
        return kept, scores, inputs.visual_positions

    # ------------------------------------------------------------------ decode
    def decode(self, tokens: Int[Array, "b"], cache: KVCache) -> tuple[Float[Array, "b v"], KVCache]:
        """One new token per example through every layer; positions continue from the
        unpruned prompt length, each segment attends over its own cache."""
        x = jnp.take(self.embed.value, tokens, axis=0, mode="clip")[:, None]
        positions = cache.next_position[:, None]
        new_segments = []
        for (lo, hi), seg in zip(cache.bounds, cache.segments):
            idx = seg.index
            written = jnp.arange(seg.capacity) == idx
            key_mask = seg.mask | written[None, :]

            def body(layer, carry, i, idx=idx, key_mask=key_mask):
                h, keys, values = carry
                q, k, v, _ = layer.qkv(h, positions)
                keys, values = write_entry(keys, i, k, idx), write_entry(values, i, v, idx)
                h = layer.finish(h, q, keys[i], values[i], key_mask[:, None, :])
                return (h, keys, values), None

            (x, keys, values), _ = scan_layers(
                self.layers, lo, hi, body, (x, seg.keys, seg.values), np.arange(hi - lo)
            )
            new_segments.append(SegmentCache(keys, values, key_mask, idx + 1))
        logits = self.logits(x[:, 0])
        return logits, KVCache(tuple(new_segments), cache.next_position + 1, cache.bounds)


def prompt_layout(attention_mask: Bool[Array, "b s"]) -> tuple[Bool[Array, "b s"], Int[Array, "b s"], Int[Array, "b s"]]:
    """(valid, RoPE positions, sequence rows) of a prompt. Positions count real tokens only, so
    padding on either side changes nothing; rows are the original indices (`_causal` compares
    them, and after pruning they are the kept tokens' indices)."""
    valid = attention_mask.astype(bool)
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)
    rows = jnp.broadcast_to(jnp.arange(valid.shape[1], dtype=jnp.int32), valid.shape)
    return valid, positions, rows


def _causal(rows: Int[Array, "b s"], valid: Bool[Array, "b s"]) -> Bool[Array, "b s s"]:
    """Query i sees key j iff j comes no later in the original sequence and j is real."""
    return (rows[:, None, :] <= rows[:, :, None]) & valid[:, None, :]
