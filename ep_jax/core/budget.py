"""Pruning settings and budgets, pure functions (docs/ALGORITHM.md §4).

* `PruneConfig`: what to prune, where, and how much (hashable: a static `jit` argument).
* `budget` / `resolve_keep` / `effective_avg`: the papers' layer-averaged budget `A` (or the
  fraction `keep_ratio` of N) versus the count `R` actually kept from layer `K` on.
* `keep_per_example`: `R` for every example of a batch, each with its own `N`.
"""

from __future__ import annotations

import dataclasses
import math
import operator

import numpy as np

from ep_jax.errors import BudgetError

METHODS = ("entropy", "fastv", "random", "pool", "none")
SOURCES = ("query", "key", "value", "hidden")
MODES = ("gather", "mask")
PRECISIONS = ("float32", "float64")


# --------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """How to prune visual tokens. Frozen and hashable so it can be a static `jit` argument.

    Attributes:
      method: "entropy" (EntropyPrune), "fastv", "random", "pool" (uniform grid stride), or
        "none" (no pruning).
      layer: `K`, the first decoder layer that sees the pruned sequence (scores come from layer
        `K-1`), an int >= 1, or "auto" for the model preset's Entropy Collapse Layer (resolved
        by the caller before `resolve_keep`).
      avg_keep: `A`, the papers' average number of visual tokens per layer (192/128/64).
      keep: `R`, the visual tokens kept from layer `K` on.
      keep_ratio: a layer-averaged fraction of each example's own `N` (0.25 = an average of
        N/4 visual tokens per layer). Give exactly one of `avg_keep` / `keep` / `keep_ratio`.
      source: tensor of layer `K-1` the entropy is computed from: query (reference), key,
        value, or hidden (the layer output through the final RMSNorm).
      trace_normalize: normalise the eigenvalues (option; the reference does not).
      precision: "float32" or "float64" (reference; needs `jax_enable_x64`) for the entropy.
      dim_scale: column cap for the per-token matrix (head dims above it are averaged down).
      seed: PRNG seed of the "random" method.
      mode: "gather" shortens the sequence (the real thing); "mask" keeps the full length and
        masks the pruned keys instead — a verification oracle for the gather path.
    """

    method: str = "entropy"
    layer: int | str = 2
    avg_keep: int | None = None
    keep: int | None = None
    keep_ratio: float | None = None
    source: str = "query"
    trace_normalize: bool = False
    precision: str = "float32"
    dim_scale: int = 128
    seed: int = 0
    mode: str = "gather"

    def __post_init__(self):
        if self.method not in METHODS:
            raise BudgetError(f"PruneConfig.method={self.method!r}; use one of {METHODS}")
        if self.source not in SOURCES:
            raise BudgetError(f"PruneConfig.source={self.source!r}; use one of {SOURCES}")
        if self.mode not in MODES:
            raise BudgetError(f"PruneConfig.mode={self.mode!r}; use one of {MODES}")
        if self.precision not in PRECISIONS:
            raise BudgetError(f"PruneConfig.precision={self.precision!r}; use one of {PRECISIONS}")
        if self.layer != "auto" and not (_is_int(self.layer) and self.layer >= 1):
            raise BudgetError(
                f"PruneConfig.layer={self.layer!r}: K is the first decoder layer that sees the "
                'pruned sequence and must be an int >= 1 (scores come from layer K-1), or "auto" '
                "for the model preset"
            )
        if not (_is_int(self.dim_scale) and self.dim_scale >= 1):
            raise BudgetError(f"PruneConfig.dim_scale={self.dim_scale!r}: use a positive int (128 in the reference)")
        if not _is_int(self.seed):
            raise BudgetError(f"PruneConfig.seed={self.seed!r}: use an int")
        for name in ("avg_keep", "keep"):
            value = getattr(self, name)
            if value is not None and not (_is_int(value) and value >= 0):
                raise BudgetError(f"PruneConfig.{name}={value!r}: use a non-negative int (a token count)")
        if self.keep_ratio is not None and not (
            isinstance(self.keep_ratio, (int, float, np.floating)) and not isinstance(self.keep_ratio, bool)
            and 0.0 <= float(self.keep_ratio) <= 1.0
        ):
            raise BudgetError(f"PruneConfig.keep_ratio={self.keep_ratio!r}: use a fraction in [0, 1] "
                             "(0.25 keeps an average of a quarter of each example's visual tokens per layer)")
        given = (self.avg_keep is not None) + (self.keep is not None) + (self.keep_ratio is not None)
        if self.method != "none" and given != 1:
            raise BudgetError(
                f"PruneConfig(method={self.method!r}) got avg_keep={self.avg_keep!r}, keep={self.keep!r} and "
                f"keep_ratio={self.keep_ratio!r}: give exactly one: avg_keep=A (the papers' average visual "
                "tokens per layer, e.g. 192/128/64), keep=R (visual tokens kept after layer K) or "
                "keep_ratio (a layer-averaged fraction of each example's visual tokens)"
            )
        if self.method == "none" and given > 1:
            raise BudgetError("PruneConfig(method='none'): give at most one of avg_keep/keep/keep_ratio")

    @property
    def enabled(self) -> bool:
        return self.method != "none"


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


# --------------------------------------------------------------------------- budget
def _check_layers(num_layers: int, layer: int) -> None:
    if not _is_int(layer) or layer < 1:
        raise BudgetError(
            f"layer K={layer!r}: must be an int >= 1 (K=0 would prune before any layer has run, "
            "leaving no layer K-1 to score from)"
        )
    if layer >= num_layers:
        raise BudgetError(
            f"layer K={layer} >= num_layers L={num_layers}: no layer would see the pruned "
            f"sequence; choose 1 <= K <= {num_layers - 1}"
        )


def budget(avg_keep: int, num_layers: int, layer: int, num_visual: int) -> int:
    """`R = floor((L·A − K·N) / (L − K))`: visual tokens kept from layer K on (docs/ALGORITHM.md §4).

    The first `K` layers carry all `N` visual tokens; `R` makes the per-layer average equal `A`.
    For L=32, K=2, N=576: A=192 -> 166, A=128 -> 98, A=64 -> 29.

    Raises ValueError when `A > N`, when `K` is outside `[1, L)`, or when the formula is
    negative (the first K layers alone already exceed the average budget).
    """
    avg_keep, num_layers, num_visual = (operator.index(v) for v in (avg_keep, num_layers, num_visual))
    _check_layers(num_layers, layer)
    if avg_keep < 0 or avg_keep > num_visual:
        raise BudgetError(
            f"avg_keep A={avg_keep} is outside [0, N={num_visual}] visual tokens; "
            f"use 0 <= A <= {num_visual}"
        )
    numerator = num_layers * avg_keep - layer * num_visual
    if numerator < 0:
        minimum = math.ceil(layer * num_visual / num_layers)
        raise BudgetError(
            f"avg_keep A={avg_keep} cannot be met with pruning at layer K={layer}: the first "
            f"{layer} of {num_layers} layers carry all {num_visual} visual tokens, which alone "
            f"averages {layer * num_visual / num_layers:.1f} per layer. Use avg_keep >= "
            f"{minimum} or an earlier layer."
        )
    return min(numerator // (num_layers - layer), num_visual)


def effective_avg(keep: int, num_layers: int, layer: int, num_visual: int) -> float:
    """The average visual tokens per layer `A` actually achieved by keeping `R` from layer `K`.

    Inverse of `budget` up to its floor: `(K·N + (L−K)·R) / L`. Report it beside `R`.
    """
    _check_layers(num_layers, layer)
    return (layer * num_visual + (num_layers - layer) * keep) / num_layers


def resolve_keep(cfg: PruneConfig, num_layers: int, num_visual: int) -> int:
    """`R` for this config and one example's `N`: `cfg.keep`, `budget(cfg.avg_keep, ...)` or
    `ratio_budget(cfg.keep_ratio, ...)`.

    `method="none"` keeps all `N`. `cfg.layer` must already be an int (resolve "auto" from the
    model preset first, e.g. `dataclasses.replace(cfg, layer=preset_layer)`).
    """
    if cfg.method == "none":
        return int(num_visual)
    if cfg.layer == "auto":
        raise BudgetError(
            'PruneConfig.layer="auto" must be resolved to the model preset\'s Entropy Collapse '
            "Layer before computing the budget: dataclasses.replace(cfg, layer=K)"
        )
    _check_layers(num_layers, cfg.layer)
    if cfg.keep_ratio is not None:
        return ratio_budget(cfg.keep_ratio, num_layers, cfg.layer, num_visual)
    if cfg.keep is not None:
        if not 0 <= cfg.keep <= num_visual:
            raise BudgetError(
                f"keep R={cfg.keep} is outside [0, N={num_visual}] visual tokens; use "
                f"0 <= keep <= {num_visual} (or avg_keep for the papers' average budget)"
            )
        return int(cfg.keep)
    return budget(cfg.avg_keep, num_layers, cfg.layer, num_visual)


def ratio_budget(ratio: float, num_layers: int, layer: int, num_visual: int) -> int:
    """`R` for a layer-averaged fraction of `N`: `floor(N·(L·ratio − K)/(L − K))` (docs/ALGORITHM.md
    §4), the budget formula with `A = ratio·N` (unrounded). Qwen2.5-VL (L = 28, K = 1): 0.25 keeps
    22.2 % of N after layer 1, 0.125 keeps 9.3 % (the reduction ratios 0.7778 / 0.9074)."""
    _check_layers(num_layers, layer)
    numerator = num_visual * (num_layers * ratio - layer)
    if numerator < 0:
        raise BudgetError(
            f"keep_ratio={ratio} cannot be met with pruning at layer K={layer}: the first {layer} of "
            f"{num_layers} layers carry all visual tokens, already a ratio of {layer / num_layers:.3f}. "
            f"Use keep_ratio >= {layer / num_layers:.3f} or an earlier layer."
        )
    return min(int(math.floor(numerator / (num_layers - layer) + 1e-9)), num_visual)


def keep_per_example(cfg: PruneConfig, num_layers: int, counts) -> np.ndarray:
    """`R` of every example of a batch from its own `N` (`counts`, [b]); an example without
    visual tokens keeps 0. Errors name the example."""
    out = np.zeros(len(counts), np.int32)
    for i, n in enumerate(np.asarray(counts).tolist()):
        if n == 0:
            continue
        try:
            out[i] = resolve_keep(cfg, num_layers, int(n))
        except BudgetError as e:
            raise BudgetError(f"example {i} ({n} visual tokens): {e}") from None
    return out
