"""Analytic cost of a prefill, unpruned and pruned (docs/ALGORITHM.md §6). The one place that knows FLOPs.

Per decoder layer with `n` tokens: `FLOPs = 8·n·D² + 4·n²·D + 6·n·D·M` — the reference's
formula (q/k/v/o projections, attention scores and weighted sum, SwiGLU MLP). It assumes full
multi-head attention projections (it does not shrink k/v for grouped-query models) and ignores
norms, embeddings, the LM head and the scorer itself, exactly like the reference, so that the
reductions reported here are comparable with the paper's.

KV cache: `2 · n · H_kv · d_h · bytes_per_elem` per layer.

With pruning at layer `K` keeping `R` of `N` visual tokens, layers `< K` run on `S` tokens and
layers `>= K` on `S − N + R`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ep_jax.config import LlavaConfig, TextConfig
from ep_jax.core.budget import effective_avg


def layer_flops(text_cfg: TextConfig, num_tokens: int) -> int:
    """Prefill FLOPs of one decoder layer on `num_tokens` tokens: `8nD² + 4n²D + 6nDM`."""
    n, d, m = num_tokens, text_cfg.hidden_size, text_cfg.intermediate_size
    return 8 * n * d * d + 4 * n * n * d + 6 * n * d * m


def _tokens_per_layer(
    text_cfg: TextConfig, seq_len: int, num_visual: int, layer: int | None, keep: int | None
) -> list[int]:
    num_layers = text_cfg.num_layers
    if not 0 <= num_visual <= seq_len:
        raise ValueError(f"num_visual={num_visual} outside [0, seq_len={seq_len}]")
    if (layer is None) != (keep is None):
        raise ValueError(
            f"layer={layer!r}, keep={keep!r}: give both (pruned cost) or neither (unpruned cost)"
        )
    if layer is None:
        return [seq_len] * num_layers
    if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer < num_layers:
        raise ValueError(f"layer K={layer!r} outside [1, L={num_layers}): the first pruned layer")
    if not 0 <= keep <= num_visual:
        raise ValueError(f"keep R={keep} outside [0, N={num_visual}]")
    pruned = seq_len - num_visual + keep
    return [seq_len] * layer + [pruned] * (num_layers - layer)


def prefill_flops(
    text_cfg: TextConfig,
    seq_len: int,
    num_visual: int = 0,
    layer: int | None = None,
    keep: int | None = None,
) -> int:
    """Decoder prefill FLOPs over all layers (exact Python int).

    Unpruned unless both `layer` (K) and `keep` (R) are given; then layers `< K` see `seq_len`
    tokens and layers `>= K` see `seq_len − num_visual + keep`.
    """
    return sum(layer_flops(text_cfg, n) for n in _tokens_per_layer(text_cfg, seq_len, num_visual, layer, keep))


def vision_flops(cfg: LlavaConfig, num_images: int = 1) -> int:
    """FLOPs of the part of the prefill pruning cannot touch: the CLIP tower up to the feature
    layer (patch embedding, then per layer `8nD² + 4n²D + 4nDM` on `n` = patches + 1 tokens)
    and the two-matrix projector on the image tokens. Not in the reference's formula; used to
    state the analytic reduction of the whole prefill (vision + decoder) next to it."""
    v = cfg.vision
    n, d, m = v.num_patches + 1, v.hidden_size, v.intermediate_size
    patch_embed = 2 * v.num_patches * (v.num_channels * v.patch_size**2) * d
    per_layer = 8 * n * d * d + 4 * n * n * d + 4 * n * d * m
    tokens, dt = cfg.image_seq_len, cfg.text.hidden_size
    projector = 2 * tokens * d * dt + 2 * tokens * dt * dt
    return num_images * (patch_embed + cfg.vision_layers_used * per_layer + projector)


def window_vision_flops(vision_cfg: Any, grid_thw) -> int:
    """FLOPs of a Qwen2.5-VL-style vision tower (`QwenVisionConfig`) on one image or video of
    `grid_thw` patches: the patch embedding, per block `8PD² + 6PDM` (q/k/v/o, gated MLP) plus
    `4PkD` attention with k = one full window of patches (window blocks, an upper bound at the
    edges) or one frame pair's patches (the `fullatt_block_indexes` blocks), and the 2x2 merger.
    Not in the reference's formula; used to state how much of a prefill pruning cannot touch."""
    v = vision_cfg
    t, h, w = (int(x) for x in grid_thw)
    p, d, m = t * h * w, v.hidden_size, v.intermediate_size
    window = min((v.window_size // v.patch_size) ** 2, h * w)
    full = len(v.fullatt_block_indexes)
    attention = 4 * p * d * ((v.depth - full) * window + full * h * w)
    unit = v.spatial_merge_size ** 2 * d
    merger = 2 * (p // v.spatial_merge_size ** 2) * unit * (unit + v.out_hidden_size)
    return 2 * p * v.patch_dim * d + v.depth * (8 * p * d * d + 6 * p * d * m) + attention + merger


def flops_reduction(
    text_cfg: TextConfig, seq_len: int, num_visual: int, layer: int, keep: int
) -> float:
    """`1 − pruned / unpruned` prefill FLOPs (0.689 means 68.9% fewer FLOPs)."""
    pruned = prefill_flops(text_cfg, seq_len, num_visual, layer, keep)
    return 1.0 - pruned / prefill_flops(text_cfg, seq_len)


def kv_cache_bytes(
    text_cfg: TextConfig,
    seq_len: int,
    num_visual: int = 0,
    layer: int | None = None,
    keep: int | None = None,
    *,
    bytes_per_elem: int = 2,
) -> int:
    """Bytes of the prompt's KV cache: `2 · n · H_kv · d_h · bytes_per_elem` summed over layers.

    Pruning-aware like `prefill_flops`. Default 2 bytes (bfloat16/float16 cache).
    """
    per_token = 2 * text_cfg.num_kv_heads * text_cfg.head_dim * bytes_per_elem
    return sum(n * per_token for n in _tokens_per_layer(text_cfg, seq_len, num_visual, layer, keep))


@dataclasses.dataclass(frozen=True)
class PruneReport:
    """What a prune setting costs and saves for one prompt: print it or `to_dict()` it.

    Both the papers' average budget `A` (effective, after flooring) and the count `R` kept
    from layer `K` on are reported, because the two are easily confused.
    """

    layer: int
    avg_keep: float
    keep: int
    num_visual: int
    num_layers: int
    total_tokens: int
    kept_tokens: int
    flops_unpruned: int
    flops_pruned: int
    flops_reduction: float
    kv_bytes_unpruned: int
    kv_bytes_pruned: int
    requested_avg_keep: int | None = None

    @property
    def kv_bytes_saved(self) -> int:
        return self.kv_bytes_unpruned - self.kv_bytes_pruned

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["kv_bytes_saved"] = self.kv_bytes_saved
        return d

    def __str__(self) -> str:
        requested = "" if self.requested_avg_keep is None else f" (asked {self.requested_avg_keep})"
        return (
            f"K={self.layer} A={self.avg_keep:.1f}{requested} R={self.keep}/{self.num_visual} visual "
            f"| tokens {self.kept_tokens}/{self.total_tokens} after layer {self.layer} "
            f"| prefill FLOPs -{100 * self.flops_reduction:.1f}% "
            f"| KV cache -{self.kv_bytes_saved / 2**20:.1f} MiB "
            f"({100 * self.kv_bytes_saved / max(self.kv_bytes_unpruned, 1):.1f}%)"
        )


def prune_report(
    text_cfg: TextConfig,
    seq_len: int,
    num_visual: int,
    layer: int,
    keep: int,
    *,
    bytes_per_elem: int = 2,
    requested_avg_keep: int | None = None,
) -> PruneReport:
    """Summarise pruning `num_visual` -> `keep` visual tokens at layer `layer` for one prompt."""
    flops_pruned = prefill_flops(text_cfg, seq_len, num_visual, layer, keep)
    flops_unpruned = prefill_flops(text_cfg, seq_len)
    return PruneReport(
        layer=layer,
        avg_keep=effective_avg(keep, text_cfg.num_layers, layer, num_visual),
        keep=keep,
        num_visual=num_visual,
        num_layers=text_cfg.num_layers,
        total_tokens=seq_len,
        kept_tokens=seq_len - num_visual + keep,
        flops_unpruned=flops_unpruned,
        flops_pruned=flops_pruned,
        flops_reduction=1.0 - flops_pruned / flops_unpruned,
        kv_bytes_unpruned=kv_cache_bytes(text_cfg, seq_len, bytes_per_elem=bytes_per_elem),
        kv_bytes_pruned=kv_cache_bytes(text_cfg, seq_len, num_visual, layer, keep, bytes_per_elem=bytes_per_elem),
        requested_avg_keep=requested_avg_keep,
    )
