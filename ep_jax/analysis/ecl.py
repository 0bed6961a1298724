"""The Entropy Collapse Layer: *when* to prune, measured on the user's own model (docs/ALGORITHM.md §3).

Two steps, usable apart:

* `entropy_profile` — one unpruned, jitted forward that records, for every decoder layer, the
  set-wise matrix entropy of the visual tokens' hidden states and the distribution (mean and
  quantiles) of the token-wise EntropyPrune score of that layer. Only `O(L)` scalars per example
  leave the layer scan: no stacked hidden states, no attention maps, no second forward.
* `find_ecl` — the rule that turns the entropy curve into `K` (or into an explicit "no collapse
  found"), with every drop size returned so a user can judge the choice.

`measure_ecl` does both (the runtime calls it for `layer="auto"` when the model has no preset
K); `python -m ep_jax.ecl` (`ep_jax/cli/ecl.py`) runs it over calibration images and writes
`profile.json`, `profile.png` and, with `--write-preset`, the model's preset. The profile is the
runtime's own prefill with an observer on the layer stack (`runtime.prefill.prefill(observe=)`).

Indexing (one convention for both curves)
-----------------------------------------
Index `j` names **the hidden states entering decoder layer `j`**: `j = 0` is the merged input
embeddings (the projector's image features at the visual slots), `j = l + 1` is the output of
layer `l`, and `j = L` is the last layer's output (before the final norm). So

* `set_entropy[j]`, `j = 0..L` (`L + 1` values): matrix entropy of the visual tokens entering
  layer `j`;
* `score_*[j]`, `j = 0..L-1` (`L` values): the token-wise score the prune stage computes from
  layer `j` (its queries, which are a function of the states entering layer `j`) — i.e. the
  scores used when pruning with `K = j + 1`. (With `source="hidden"` it is layer `j`'s output
  through the final norm, as in the prune stage.)

The rule
--------
`drop[j] = set_entropy[j-1] - set_entropy[j]` (`j >= 1`) is how much layer `j - 1` lowers the
entropy; `rel_drop[j] = drop[j] / set_entropy[j-1]`. Among the early candidates
`j = 1..min(max_layer, L-1)` (default `max_layer = max(2, L // 4)`: 8 for 32 layers), take the
largest drop `j*`. If `rel_drop[j*] < min_rel_drop` (default 10%) there is **no collapse**: the
result has `layer=None` and says so instead of guessing. Otherwise every candidate whose drop is
within `tie_tol` (5%) of the largest and that also passes the minimum is tied with it; the
earliest of them is chosen and the tie reported. `K = j`: the collapse happens *inside* layer
`j - 1`, so layer `j` is the first layer that runs on collapsed representations and the first
to see the pruned sequence; its scores come from layer `K - 1`, as the prune stage does.

Example (LLaVA-1.5-7B-like): entropies 0.85 (embeddings), 0.83 (after layer 0), 0.35 (after
layer 1), ... — the largest drop is between `j = 1` and `j = 2` (inside layer 1), so `K = 2`.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ep_jax.core.entropy import set_entropy, token_entropy
from ep_jax.core.select import gather_rows
from ep_jax.errors import InputError
from ep_jax.runtime.engine import compiled
from ep_jax.runtime.prefill import prefill

DEFAULT_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
DEFAULT_MIN_REL_DROP = 0.10
DEFAULT_TIE_TOL = 0.05
DEFAULT_PROMPT = "Describe the image in detail."
SOURCES = ("query", "key", "value", "hidden")
INDEXING = (
    "index j = hidden states entering decoder layer j (0 = input embeddings, L = last layer output); "
    "set_entropy has L+1 values, scores L values (score[j] = layer j's token-wise score, used for K = j+1); "
    "drop[j] = set_entropy[j-1] - set_entropy[j]; K = j of the chosen drop"
)


# ====================================================================== profile
@dataclasses.dataclass
class EntropyProfile:
    """Per-example, per-layer statistics of one unpruned forward (NumPy, float64).

    Attributes:
      set_entropy: `[B, L+1]` visual-token set entropy of the states entering layer j
        (trace-normalised, in [0, 1]; see the module docstring for the indexing).
      score_mean: `[B, L]` mean token-wise score of layer j over the visual tokens.
      score_quantiles: `[B, L, Q]` quantiles of that score at `quantile_levels`.
      quantile_levels: the Q levels.
      num_visual: visual tokens per example.
      source, dim_scale, trace_normalize: how the token-wise score was computed.
    """

    set_entropy: np.ndarray
    score_mean: np.ndarray
    score_quantiles: np.ndarray
    quantile_levels: tuple[float, ...]
    num_visual: int
    source: str = "query"
    dim_scale: int = 128
    trace_normalize: bool = False

    @property
    def num_layers(self) -> int:
        return self.set_entropy.shape[1] - 1

    @property
    def num_examples(self) -> int:
        return self.set_entropy.shape[0]

    def mean_curve(self) -> np.ndarray:
        """`[L+1]` set entropy averaged over examples: the curve `find_ecl` reads."""
        return self.set_entropy.mean(axis=0)

    @staticmethod
    def concatenate(parts: Sequence["EntropyProfile"]) -> "EntropyProfile":
        """Profiles of several batches (same model and settings) as one."""
        if not parts:
            raise ValueError("no profiles to concatenate")
        first = parts[0]
        for p in parts[1:]:
            if (p.num_layers, p.quantile_levels, p.source) != (first.num_layers, first.quantile_levels, first.source):
                raise ValueError("profiles differ in layers, quantile levels or score source")
        return dataclasses.replace(
            first,
            set_entropy=np.concatenate([p.set_entropy for p in parts]),
            score_mean=np.concatenate([p.score_mean for p in parts]),
            score_quantiles=np.concatenate([p.score_quantiles for p in parts]),
        )

    def to_dict(self, per_example: bool = True) -> dict[str, Any]:
        d = {
            "indexing": INDEXING,
            "num_layers": self.num_layers,
            "num_examples": self.num_examples,
            "num_visual": self.num_visual,
            "set_entropy": {"mean": _rounded(self.set_entropy.mean(0)), "std": _rounded(self.set_entropy.std(0))},
            "score": {
                "source": self.source,
                "dim_scale": self.dim_scale,
                "trace_normalize": self.trace_normalize,
                "mean": _rounded(self.score_mean.mean(0)),
                "quantile_levels": list(self.quantile_levels),
                "quantiles": _rounded(self.score_quantiles.mean(0)),
            },
        }
        if per_example:
            d["set_entropy"]["per_example"] = _rounded(self.set_entropy)
            d["score"]["mean_per_example"] = _rounded(self.score_mean)
        return d


def _profile_fn(graphdef, state, inputs, spans, *, quantile_levels, source, dim_scale, trace_normalize,
                precision):
    """The jitted body: the runtime's unpruned prefill with an observer that takes each layer's
    statistics of the visual tokens (masked to each example's own N)."""
    model = nnx.merge(graphdef, state)
    levels = jnp.asarray(quantile_levels, jnp.float32)
    valid = spans.valid

    def at_visual(t):  # [b, s, ...] -> [b, n, ...]
        return gather_rows(t, spans.positions)

    def spread(states, num_heads):  # [b, n, heads*hd] -> mean [b], quantiles [b, Q] over valid slots
        scores = token_entropy(states, num_heads, dim_scale=dim_scale, trace_normalize=trace_normalize,
                               precision=precision).astype(jnp.float32)
        masked = jnp.where(valid, scores, jnp.nan)
        return jnp.nanmean(masked, axis=-1), jnp.nanquantile(masked, levels, axis=-1).T

    def observe(i, h, proj, out, context):
        del i, context
        entropy_in = set_entropy(at_visual(h), mask=valid)
        if source == "hidden":
            states, heads = at_visual(model.norm(out)), proj.query.shape[2]
        else:
            tensor = getattr(proj, source)
            states, heads = at_visual(tensor), tensor.shape[2]
            states = states.reshape(*states.shape[:2], -1)
        mean, quantiles = spread(states, heads)
        return entropy_in, mean, quantiles

    res = prefill(model, inputs, spans, None, observe=observe)
    entropy_in, means, quantiles = res.observed[0]
    entropy = jnp.concatenate([entropy_in, set_entropy(at_visual(res.hidden), mask=valid)[None]], axis=0)
    return entropy.T, means.T, jnp.moveaxis(quantiles, 0, 1)  # [b, L+1], [b, L], [b, L, Q]


def entropy_profile(
    model,
    input_ids,
    pixel_values,
    attention_mask=None,
    *,
    source: str = "query",
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
    dim_scale: int = 128,
    trace_normalize: bool = False,
    precision: str = "float32",
) -> EntropyProfile:
    """Per-layer visual-token entropy statistics of one unpruned forward, per example.

    Args:
      model: an `ep_jax.Model` (compiled code is cached on it: a new image or prompt of the same
        shapes does not recompile).
      input_ids: `[B, S]` with the image slots expanded (as `Processor.encode` returns them).
      pixel_values: the family's pixel values (`[num_images, 3, H, W]` for LLaVA-1.5).
      attention_mask: `[B, S]`, 1 for real tokens (padding on either side), default all ones.
      source: the score source: "query" (the reference), "key", "value", or "hidden".
      quantiles: levels of the token-score quantiles.
      dim_scale, trace_normalize, precision: as `entropy.token_entropy` (reference defaults).

    Returns:
      An `EntropyProfile` (see the module docstring for the indexing).
    """
    inputs, spans = model.family.inputs(model.config, input_ids, pixel_values, attention_mask,
                                        dtype=np.dtype(model.dtype))
    return profile_prepared(model, inputs, spans, source=source, quantiles=quantiles, dim_scale=dim_scale,
                            trace_normalize=trace_normalize, precision=precision)


def profile_prepared(model, inputs: dict, spans, *, source: str = "query",
                     quantiles: Sequence[float] = DEFAULT_QUANTILES, dim_scale: int = 128,
                     trace_normalize: bool = False, precision: str = "float32") -> EntropyProfile:
    """`entropy_profile` of checked inputs and their visual spans (`runtime.api.prepare`)."""
    if source not in SOURCES:
        raise InputError(f"source={source!r}; use one of {SOURCES}")
    levels = tuple(float(q) for q in quantiles)
    if not all(0.0 <= q <= 1.0 for q in levels):
        raise InputError(f"quantiles {levels} must lie in [0, 1]")
    counts = spans.counts()
    if counts.min() < 2:
        raise InputError(
            f"the entropy profile needs images: the inputs hold {counts.tolist()} visual token(s) per example "
            "(give each prompt an image)"
        )
    static = dict(quantile_levels=levels, source=source, dim_scale=int(dim_scale),
                  trace_normalize=bool(trace_normalize), precision=precision)
    args = (model.state, inputs, spans)
    entropy, means, quants = compiled(model, _profile_fn, static, args)(*args)
    return EntropyProfile(
        set_entropy=np.asarray(entropy, np.float64),
        score_mean=np.asarray(means, np.float64),
        score_quantiles=np.asarray(quants, np.float64),
        quantile_levels=levels,
        num_visual=int(counts.max()),
        source=source,
        dim_scale=int(dim_scale),
        trace_normalize=bool(trace_normalize),
    )


# ====================================================================== the rule
@dataclasses.dataclass
class EclResult:
    """What `find_ecl` decided and why.

    Attributes:
      layer: `K`, the first decoder layer on the pruned sequence; None when no collapse was found.
      status: "collapse" (one clear largest drop), "tie" (several drops within `tie_tol` of the
        largest: the earliest is chosen), or "no_collapse" (largest drop below `min_rel_drop`).
      message: one human sentence saying the above with the numbers.
      curve: `[L+1]` the set-entropy curve the rule read (mean over examples).
      drops: `[L+1]` `curve[j-1] - curve[j]` (index 0 is NaN); `drops[K]` is the chosen drop.
      rel_drops: `[L+1]` `drops[j] / curve[j-1]`.
      window: `(first, last)` candidate K values searched (the "early layers").
      best: the candidate with the largest drop (reported also when there is no collapse).
      tied: candidates tied with the largest drop (empty unless status == "tie").
      sharpness: the largest drop divided by the next largest drop in the window (inf when
        every other step rises); how clearly one layer stands out.
      agreement: fraction of examples whose own curve gives the same K (None for one curve).
      per_example: the K each example's own curve gives (None where it finds no collapse).
      min_rel_drop, tie_tol, max_layer: the rule's settings.
      profile: the `EntropyProfile` it came from, when known.
    """

    layer: int | None
    status: str
    message: str
    curve: np.ndarray
    drops: np.ndarray
    rel_drops: np.ndarray
    window: tuple[int, int]
    best: int
    tied: tuple[int, ...]
    sharpness: float
    agreement: float | None
    per_example: tuple[int | None, ...]
    min_rel_drop: float
    tie_tol: float
    max_layer: int
    profile: EntropyProfile | None = None

    @property
    def found(self) -> bool:
        return self.layer is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "status": self.status,
            "message": self.message,
            "rule": {
                "min_rel_drop": self.min_rel_drop, "tie_tol": self.tie_tol, "max_layer": self.max_layer,
                "window": list(self.window), "indexing": INDEXING,
            },
            "best": self.best,
            "tied": list(self.tied),
            "sharpness": self.sharpness if math.isfinite(self.sharpness) else "inf",
            "agreement": self.agreement,
            "per_example": list(self.per_example),
            "curve": _rounded(self.curve),
            "drops": _rounded(self.drops),
            "rel_drops": _rounded(self.rel_drops),
        }


def default_max_layer(num_layers: int) -> int:
    """The last candidate K of the "early layers" window: `max(2, L // 4)` (8 for L = 32)."""
    return max(2, num_layers // 4)


def _decide(curve: np.ndarray, hi: int, min_rel_drop: float, tie_tol: float):
    drops = np.full(curve.shape, np.nan)
    drops[1:] = curve[:-1] - curve[1:]
    rel = np.full(curve.shape, np.nan)
    rel[1:] = drops[1:] / np.maximum(np.abs(curve[:-1]), 1e-12)
    window = np.arange(1, hi + 1)
    best = int(window[np.argmax(drops[window])])  # first maximum: the earliest on exact ties
    if not (drops[best] > 0 and rel[best] >= min_rel_drop):
        return None, "no_collapse", drops, rel, best, ()
    tied = tuple(int(j) for j in window
                 if drops[j] >= drops[best] * (1.0 - tie_tol) and rel[j] >= min_rel_drop)
    if len(tied) > 1:
        return tied[0], "tie", drops, rel, best, tied
    return best, "collapse", drops, rel, best, ()


def find_ecl(
    profile,
    *,
    max_layer: int | None = None,
    min_rel_drop: float = DEFAULT_MIN_REL_DROP,
    tie_tol: float = DEFAULT_TIE_TOL,
) -> EclResult:
    """The Entropy Collapse Layer `K` of a set-entropy profile (rule and indexing: module docstring).

    Args:
      profile: an `EntropyProfile`, or set entropies as an array `[L+1]` (one curve) or
        `[B, L+1]` (per example; the rule reads their mean, agreement counts each example's own K).
        Index j = the hidden states entering layer j.
      max_layer: last candidate K of the early-layer window (default `max(2, L // 4)`), capped at
        L - 1 (a K of L would leave no layer to run pruned).
      min_rel_drop: the smallest relative one-step drop that counts as a collapse.
      tie_tol: drops within this fraction of the largest are tied with it (the earliest wins).

    Returns:
      An `EclResult`; `layer` is None (status "no_collapse") rather than a guess when the
      largest early drop is below `min_rel_drop` or the entropy never falls.
    """
    source = profile if isinstance(profile, EntropyProfile) else None
    values = np.asarray(source.set_entropy if source is not None else profile, np.float64)
    if values.ndim == 1:
        values = values[None]
    if values.ndim != 2:
        raise ValueError(f"profile must be [L+1] or [examples, L+1] set entropies, got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError("the entropy profile holds NaN/inf values (fewer than 2 visual tokens, or overflow); "
                         "check the inputs hold an image and the model runs in float32")
    num_layers = values.shape[1] - 1
    if num_layers < 2:
        raise ValueError(f"a profile of {num_layers} layer(s) has no K to choose: pruning needs 1 <= K <= L-1")
    if not 0.0 <= min_rel_drop < 1.0:
        raise ValueError(f"min_rel_drop={min_rel_drop}: use a fraction in [0, 1) (default {DEFAULT_MIN_REL_DROP})")
    if not 0.0 <= tie_tol < 1.0:
        raise ValueError(f"tie_tol={tie_tol}: use a fraction in [0, 1) (default {DEFAULT_TIE_TOL})")
    if max_layer is None:
        max_layer = default_max_layer(num_layers)
    if not (isinstance(max_layer, (int, np.integer)) and max_layer >= 1):
        raise ValueError(f"max_layer={max_layer!r}: use an int >= 1 (the last candidate K)")
    hi = min(int(max_layer), num_layers - 1)

    curve = values.mean(axis=0)
    layer, status, drops, rel, best, tied = _decide(curve, hi, min_rel_drop, tie_tol)
    per_example = tuple(_decide(row, hi, min_rel_drop, tie_tol)[0] for row in values)
    agreement = None if len(values) == 1 else float(np.mean([k == layer for k in per_example]))
    others = np.delete(drops[1:hi + 1], best - 1)
    next_largest = others.max() if others.size else -np.inf
    sharpness = float(drops[best] / next_largest) if next_largest > 0 else math.inf

    result = EclResult(
        layer=layer, status=status, message="", curve=curve, drops=drops, rel_drops=rel, window=(1, hi),
        best=best, tied=tied, sharpness=sharpness, agreement=agreement, per_example=per_example,
        min_rel_drop=float(min_rel_drop), tie_tol=float(tie_tol), max_layer=int(max_layer), profile=source,
    )
    result.message = _sentence(result, len(values))
    return result


def _sentence(r: EclResult, num_examples: int) -> str:
    lo, hi = r.window
    j = r.best
    step = f"{r.curve[j - 1]:.3f} -> {r.curve[j]:.3f}, inside layer {j - 1}"
    if r.layer is None:
        if not r.drops[j] > 0:
            return (f"No entropy collapse found: the visual tokens' matrix entropy does not fall over the early "
                    f"layers (candidates K = {lo}..{hi}); not guessing a K - pass an explicit prune layer.")
        return (f"No entropy collapse found: among candidates K = {lo}..{hi} the largest drop of the visual tokens' "
                f"matrix entropy is {100 * r.rel_drops[j]:.1f}% ({step}), below the minimum of "
                f"{100 * r.min_rel_drop:g}%; not guessing a K - pass an explicit prune layer or lower the minimum drop.")
    sharp = ("no other early step lowers it" if math.isinf(r.sharpness)
             else f"{r.sharpness:.1f}x the next largest early drop")
    agree = "" if r.agreement is None else (
        f" {round(r.agreement * num_examples)}/{num_examples} examples agree.")
    if r.status == "tie":
        tied = ", ".join(str(k) for k in r.tied)
        return (f"Entropy collapse ambiguous: the drops before K = {tied} are within {100 * r.tie_tol:g}% of the "
                f"largest ({100 * r.rel_drops[j]:.1f}%, {step}); choosing the earliest, K = {r.layer} "
                f"(scores from layer {r.layer - 1}).{agree}")
    return (f"Entropy collapse inside layer {r.layer - 1}: the visual tokens' matrix entropy falls "
            f"{100 * r.rel_drops[j]:.1f}% ({r.curve[j - 1]:.3f} -> {r.curve[j]:.3f}; {sharp}), so pruning starts at K = {r.layer} "
            f"(scores from layer {r.layer - 1}).{agree}")


def measure_ecl(model, input_ids, pixel_values, attention_mask=None, **rule) -> EclResult:
    """Profile these inputs and apply `find_ecl`: `result.layer` is K (None: no collapse, see
    `result.message`). `rule` takes `find_ecl`'s keyword arguments."""
    inputs, spans = model.family.inputs(model.config, input_ids, pixel_values, attention_mask,
                                        dtype=np.dtype(model.dtype))
    return measure_ecl_prepared(model, inputs, spans, **rule)


def measure_ecl_prepared(model, inputs: dict, spans, **rule) -> EclResult:
    """`measure_ecl` of checked inputs and their visual spans (`runtime.api.prepare`)."""
    profile = profile_prepared(model, inputs, spans)
    result = find_ecl(profile, **rule)
    result.profile = profile
    return result


# ====================================================================== many images
def profile_images(model, images, prompt: str = DEFAULT_PROMPT, *, template: str | None = None,
                   batch_size: int = 1, source: str = "query", progress: bool | None = None) -> EntropyProfile:
    """`entropy_profile` over many images, `batch_size` at a time (the last batch is padded with
    repeats so every batch reuses one compiled function); a progress bar for more than 3 images."""
    from tqdm import tqdm

    if batch_size < 1:
        raise InputError(f"batch_size={batch_size}: use an int >= 1")
    images = list(images)
    if not images:
        raise InputError("no images to profile")
    batch_size = min(batch_size, len(images))
    template = template or getattr(model.preset, "template", None) or model.family.default_template
    max_len = model.config.text.max_position_embeddings
    parts = []
    bar = tqdm(total=len(images), unit="img", file=sys.stderr,
               disable=not (len(images) > 3 if progress is None else progress))
    with bar:
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            real = len(chunk)
            chunk = chunk + [chunk[-1]] * (batch_size - real)
            enc = model.processor.encode([prompt] * len(chunk), [[im] for im in chunk], template=template,
                                         pad_side="left", max_length=max_len)
            prof = entropy_profile(model, enc["input_ids"], enc["pixel_values"], enc["attention_mask"], source=source)
            parts.append(dataclasses.replace(prof, set_entropy=prof.set_entropy[:real],
                                             score_mean=prof.score_mean[:real],
                                             score_quantiles=prof.score_quantiles[:real]))
            bar.update(real)
    return EntropyProfile.concatenate(parts)


def _rounded(a) -> Any:
    a = np.asarray(a, np.float64)
    out = np.round(a, 6).tolist()
    return _nan_to_none(out)


def _nan_to_none(x):
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x

