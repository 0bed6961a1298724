"""The public runtime: `forward` (logits for processed inputs) and `generate` /
`run_generation` (images or videos + prompts -> answers), for any family.

Compiled functions are cached per model, keyed by every static setting and input shape
(`runtime.engine`): prompts are padded to length buckets, visual tokens to slot counts and
decode room to a power of two, so a new prompt or image of a known bucket reuses the compiled
code (`compile_stats(model)` counts them).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ep_jax.core.budget import PruneConfig, keep_per_example
from ep_jax.core.scorers import pool_spans_scores
from ep_jax.core.spans import VisualSpans
from ep_jax.errors import BudgetError, InputError, NumericalError
from ep_jax.runtime.cache import KVCache
from ep_jax.runtime.engine import compile_stats, compiled
from ep_jax.runtime.model import Model
from ep_jax.runtime.prefill import PrefillResult, PruneStage, decode, last_rows, prefill
from ep_jax.runtime.sampling import sample

# The pruning of `generate` when none is given: the model preset's (see `default_prune`).
PRESET = "preset"
# R_max (the static number of kept visual rows) is rounded up to a multiple of this when the
# visual slots are bucketed, i.e. when N differs from image to image (LLaVA-NeXT).
R_BUCKET = 32
# Kept-row counts are rounded up to these when the visual slots are bucketed (the sequence holds
# fewer visual tokens than slots) or a batch mixes very different visual counts: steps of R_BUCKET
# up to 256 (a short pruned sequence, e.g. a video at 10 %: 221 rows run as 224, not 256), then
# coarser, so a new image or video rarely compiles another graph.
KEPT_BUCKETS = (*range(64, 256, R_BUCKET), 256, 320, 384, 448, 512, 640, 768, 1024, 1536, 2048, 3072, 4096,
                6144, 8192)


# ---------------------------------------------------------------------- pure functions
def prefill_logits(graphdef, state, inputs, spans, prune_inputs, *, stage, decode_room, all_logits, observe=None):
    model = nnx.merge(graphdef, state)
    res = prefill(model, inputs, spans, stage, prune_inputs, decode_room, observe=observe)
    if all_logits:
        return model.logits(res.hidden), res
    last = jnp.take_along_axis(res.hidden, last_rows(res)[:, None, None], axis=1)[:, 0]
    return model.logits(last), res


@dataclasses.dataclass(frozen=True)
class _Decode:
    """What the decode loop carries; immutable, one step makes a new one."""

    step: jax.Array  # tokens produced so far
    token: jax.Array  # [b] last token
    done: jax.Array  # [b] finished (EOS seen)
    cache: KVCache
    key: jax.Array
    out: jax.Array  # [b, room] produced tokens, pad after EOS
    finite: jax.Array  # [b] every logit so far finite


jax.tree_util.register_dataclass(
    _Decode, data_fields=["step", "token", "done", "cache", "key", "out", "finite"], meta_fields=[]
)


def _advance(model, s: _Decode, temperature, top_p, *, top_k, greedy, eos_ids, pad_id) -> _Decode:
    logits, cache = decode(model, s.token, s.cache)
    key, sub = jax.random.split(s.key)
    token = jnp.where(s.done, pad_id, sample(logits, sub, temperature, top_p, top_k, greedy))
    out = jax.lax.dynamic_update_slice_in_dim(s.out, token[:, None], s.step, axis=1)
    done = s.done | jnp.isin(token, jnp.asarray(eos_ids, jnp.int32))
    finite = s.finite & (s.done | jnp.all(jnp.isfinite(logits), axis=-1))
    return _Decode(s.step + 1, token, done, cache, key, out, finite)


def _first(logits, cache, key, temperature, top_p, *, top_k, greedy, eos_ids, pad_id, room) -> _Decode:
    key, sub = jax.random.split(key)
    token = sample(logits, sub, temperature, top_p, top_k, greedy)
    out = jnp.full((logits.shape[0], room), pad_id, jnp.int32).at[:, 0].set(token)
    done = jnp.isin(token, jnp.asarray(eos_ids, jnp.int32))
    finite = jnp.all(jnp.isfinite(logits), axis=-1)
    return _Decode(jnp.asarray(1, jnp.int32), token, done, cache, key, out, finite)


def decode_all(graphdef, state, logits, cache, key, temperature, top_p, max_new, *, room, **kw):
    """Sample the first token from the prefill logits, then decode until EOS or max_new."""
    model = nnx.merge(graphdef, state)
    s = _first(logits, cache, key, temperature, top_p, room=room, **kw)
    s = jax.lax.while_loop(
        lambda s: (s.step < max_new) & ~jnp.all(s.done),
        lambda s: _advance(model, s, temperature, top_p, **kw),
        s,
    )
    return s.out, s.step, s.finite


def decode_step(graphdef, state, s: _Decode, temperature, top_p, **kw):
    return _advance(nnx.merge(graphdef, state), s, temperature, top_p, **kw)


def first_token(graphdef, logits, cache, key, temperature, top_p, **kw):
    return _first(logits, cache, key, temperature, top_p, **kw)


# ---------------------------------------------------------------------- pruning setup
def default_prune(preset) -> PruneConfig | None:
    """The pruning `generate` and the CLI use when none is given: EntropyPrune at the preset's
    K with its default budget (`default_avg_keep` A, or `default_keep_ratio` of each example's
    N); no pruning for a model without a preset (or without a K or a budget)."""
    if preset is None or preset.prune_layer is None:
        return None
    if preset.default_avg_keep is not None:
        return PruneConfig(method="entropy", layer=preset.prune_layer, avg_keep=preset.default_avg_keep)
    ratio = getattr(preset, "default_keep_ratio", None)
    if ratio is not None:
        return PruneConfig(method="entropy", layer=preset.prune_layer, keep_ratio=ratio)
    return None


def resolve_stage(model: Model, prune: PruneConfig | None, inputs: dict, spans: VisualSpans,
                  ) -> tuple[PruneStage | None, dict | None]:
    """PruneConfig -> the static numbers the graph is built for (K, R_max, slots, kept rows)
    and the per-example arrays (each example's R; pool scores), with clear errors.

    layer="auto" takes K from the model preset; without one, K is measured once on these inputs
    (`analysis.ecl.measure_ecl`), reported on stderr, and kept on the model.
    """
    if prune is None or prune.method == "none":
        return None, None
    counts = spans.counts()
    if not counts.any():  # nothing to prune: text-only prompts run the full model
        return None, None
    if prune.layer == "auto":
        prune = dataclasses.replace(prune, layer=_auto_layer(model, inputs, spans))
    num_layers = model.config.text.num_layers
    keep = keep_per_example(prune, num_layers, counts)
    valid = np.asarray(inputs["attention_mask"], bool)
    seq_len, n = valid.shape[1], spans.num_slots
    need = int((valid.sum(1) - counts + keep).max())  # every example's text plus its own R
    r_max = int(keep.max())
    if counts.max() < n:  # visual slots bucketed (N varies by image): bucket R_max too, so that
        r_max = min(-(-r_max // R_BUCKET) * R_BUCKET, n)  # a new image's own R rarely recompiles
    kept_len = seq_len - n + r_max
    if kept_len < need:  # rows with fewer visual tokens than the widest one and long text
        kept_len = min(next((k for k in KEPT_BUCKETS if k >= need), seq_len), seq_len)
    stage = PruneStage(config=prune, layer=int(prune.layer), keep=r_max, num_visual=n, kept_len=kept_len)
    extra = {"keep": keep.astype(np.int32),
             "pool": pool_spans_scores(spans, keep) if prune.method == "pool" else None}
    return stage, extra


def _auto_layer(model: Model, inputs: dict, spans: VisualSpans) -> int:
    if model.preset is not None and model.preset.prune_layer is not None:
        return model.preset.prune_layer
    if "measured_layer" not in model.compiled:
        from ep_jax.analysis.ecl import measure_ecl_prepared  # analysis builds on the runtime: import late

        result = measure_ecl_prepared(model, inputs, spans)
        if result.layer is None:
            raise BudgetError(f"PruneConfig(layer='auto'): {result.message}", fix="pass an int layer (e.g. layer=2)")
        print(f"ep_jax: no preset K for this model; measured the Entropy Collapse Layer on this input: "
              f"{result.message}", file=sys.stderr)
        model.compiled["measured_layer"] = result.layer
    return model.compiled["measured_layer"]


def extra_arrays(enc: dict) -> dict:
    """A processor's outputs besides the three every family takes (LLaVA-NeXT's image_sizes,
    Qwen2.5-VL's image_grid_thw, ...): what `prepare` / `forward` pass on to the family."""
    return {k: v for k, v in enc.items() if k not in ("input_ids", "pixel_values", "attention_mask", "lengths")}


def prepare(model: Model, *arrays, prune: PruneConfig | None = None, **extra):
    """Checked model inputs, visual spans, the prune stage and its per-example arrays. `extra`:
    the family's further processor arrays (LLaVA-NeXT: image_sizes)."""
    inputs, spans = model.family.inputs(model.config, *arrays, dtype=np.dtype(model.dtype), **extra)
    stage, extra = resolve_stage(model, prune, inputs, spans)
    return inputs, spans, stage, extra


# ---------------------------------------------------------------------- public API
@dataclasses.dataclass
class ForwardOutput:
    logits: np.ndarray  # [b, s', v] float32
    positions: np.ndarray  # [b, s'] original sequence index of each row
    kept_mask: np.ndarray  # [b, s] tokens kept after the prune stage (all real tokens without pruning)
    scores: np.ndarray | None  # [b, n] prune scores of the visual slots
    visual_positions: np.ndarray | None  # [b, n]
    stage: PruneStage | None
    row_valid: np.ndarray | None = None  # [b, s'] which rows hold a real token
    spans: VisualSpans | None = None
    keep: np.ndarray | None = None  # [b] each example's R


def forward(model: Model, input_ids, pixel_values=None, attention_mask=None,
            prune: PruneConfig | None = None, **extra) -> ForwardOutput:
    """Logits for inputs as Hugging Face's processor returns them (padding on either side).

    With pruning, the rows are the kept tokens (`positions` gives their original index,
    `row_valid` which rows are real); in the "mask" mode all rows are returned.
    """
    _check_prune(prune, allow_preset=False)
    inputs, spans, stage, extra = prepare(model, input_ids, pixel_values, attention_mask, prune=prune, **extra)
    args = (model.state, inputs, spans, extra)
    fn = compiled(model, prefill_logits, dict(stage=stage, decode_room=0, all_logits=True), args)
    logits, res = fn(*args)
    return ForwardOutput(
        np.asarray(logits), np.asarray(res.rows), np.asarray(res.kept_mask),
        None if res.scores is None else np.asarray(res.scores),
        None if stage is None else np.asarray(spans.positions), stage, np.asarray(res.row_valid), spans,
        None if extra is None else extra["keep"],
    )


@dataclasses.dataclass
class Generation:
    texts: list[str]
    token_ids: list[list[int]]
    timings: dict[str, float]
    stage: PruneStage | None
    prefill: PrefillResult  # kept mask, scores (for --explain)
    inputs: dict[str, np.ndarray]
    spans: VisualSpans | None = None
    keep: np.ndarray | None = None  # [b] each example's R


def room_for(max_new_tokens: int) -> int:
    return max(16, 1 << (max_new_tokens - 1).bit_length())


def check_sampling(max_new_tokens, temperature, top_p, top_k, seed) -> None:
    """Types and ranges of the generation settings, with messages that name the argument."""
    def is_int(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    def is_real(v):
        return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)

    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens={max_new_tokens!r}: need an int >= 1")
    if not is_real(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise InputError(f"temperature={temperature!r}: need a finite number >= 0 (0 = greedy)")
    if not is_real(top_p) or not math.isfinite(top_p) or not 0 < top_p <= 1:
        raise InputError(f"top_p={top_p!r}: need a number in (0, 1]")
    if not is_int(top_k) or top_k < 0:
        raise InputError(f"top_k={top_k!r}: need an int >= 0 (0 = off)")
    if not is_int(seed) or not -(2**63) <= seed < 2**63:
        raise InputError(f"seed={seed!r}: need an int in [-2**63, 2**63)")


def check_prompts(prompts) -> list[str]:
    """A list of prompt strings that encode as UTF-8, or an error naming the bad one."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise InputError(f"prompts must be a string or a non-empty list of strings, got {prompts!r:.80}")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise InputError(f"prompt {i} is a {type(p).__name__}, not a string: {p!r:.80}")
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InputError(f"prompt {i} is not valid text (byte {p[e.start]!r} at position {e.start} is not "
                             "UTF-8)", fix="pass the prompt as UTF-8") from None
    return list(prompts)


def _check_prune(prune, allow_preset: bool = True) -> None:
    if prune is None or isinstance(prune, PruneConfig) or (allow_preset and prune == PRESET):
        return
    raise InputError(f"prune={prune!r}: pass an ep_jax.PruneConfig, None (no pruning)"
                     + (f" or {PRESET!r} (the model preset's default)" if allow_preset else ""))


def run_generation(
    model: Model,
    images: Sequence[Any] | None,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    prune: PruneConfig | None | str = PRESET,
    template: str | None = None,
    on_token: Callable[[list[int]], None] | None = None,
    videos: Sequence[Any] | None = None,
    fps: float | None = None,
) -> Generation:
    """Everything `generate` does, with timings and the prune stage's outputs. `videos` (models
    that take video, Qwen2.5-VL): one entry per prompt, a video file, a folder of frames, an
    array [T, H, W, 3] or an `ep_jax.video.Video`, a list of them, or None; sampled at `fps`
    (default 2.0). Their tokens are visual tokens of the example like an image's: one top-R over
    all of them (docs/ALGORITHM.md §8)."""
    prompts = check_prompts(prompts)
    check_sampling(max_new_tokens, temperature, top_p, top_k, seed)
    _check_prune(prune)
    if prune == PRESET:
        prune = default_prune(model.preset)
    t0 = time.perf_counter()
    proc = model.processor  # loaded once per model
    t_tok = time.perf_counter()
    template = template or getattr(model.preset, "template", None) or model.family.default_template
    max_len = model.config.text.max_position_embeddings
    enc = proc.encode(prompts, images, template=template, pad_side="left", max_length=max_len,
                      **_video_kwargs(proc, videos, fps))
    if int(enc["lengths"].max()) + max_new_tokens > max_len:
        raise InputError(
            f"prompt ({int(enc['lengths'].max())} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"model context of {max_len} tokens; lower --max-new-tokens or shorten the prompt"
        )
    pixel_values = enc["pixel_values"] if len(enc["pixel_values"]) else None
    more = extra_arrays(enc)
    inputs, spans, stage, extra = prepare(model, enc["input_ids"], pixel_values, enc["attention_mask"], prune=prune,
                                          **more)
    room = room_for(max_new_tokens)
    compile_before = compile_stats(model)["compile_s"]

    args = (model.state, inputs, spans, extra)
    t_pre0 = time.perf_counter()
    prefill_fn = compiled(model, prefill_logits, dict(stage=stage, decode_room=room, all_logits=False), args)
    t_pre = time.perf_counter()
    logits, res = prefill_fn(*args)
    logits.block_until_ready()
    prefill_s = time.perf_counter() - t_pre

    key = jax.random.key(seed)
    temp, tp = np.float32(temperature), np.float32(top_p)
    eos = model.config.eos_ids or (-1,)
    statics = dict(top_k=int(top_k), greedy=temperature == 0, eos_ids=tuple(eos), pad_id=proc.pad_token_id)
    if on_token is None:
        dargs = (model.state, logits, res.cache, key, temp, tp, np.int32(max_new_tokens))
        run_decode = compiled(model, decode_all, dict(room=room, **statics), dargs)
        t_dec = time.perf_counter()
        out, steps, finite = run_decode(*dargs)
        out, steps, finite = np.asarray(out), int(steps), np.asarray(finite)
        first_token_s = None
    else:
        # Streaming: the same step function, one call per token, each token handed over at once.
        fargs = (logits, res.cache, key, temp, tp)
        s = compiled(model, first_token, dict(room=room, **statics), fargs)(*fargs)
        sargs = (model.state, s, temp, tp)
        step = compiled(model, decode_step, statics, sargs, donate=(1,))
        first_token_s = time.perf_counter() - t_pre
        t_dec = time.perf_counter()
        if not bool(np.all(s.finite)):
            raise _non_finite(np.asarray(s.finite))
        on_token(np.asarray(s.token).tolist())
        while int(s.step) < max_new_tokens and not bool(jnp.all(s.done)):
            s = step(model.state, s, temp, tp)
            if not bool(np.all(s.finite)):
                raise _non_finite(np.asarray(s.finite))
            on_token(np.asarray(s.token).tolist())
        out, steps, finite = np.asarray(s.out), int(s.step), np.asarray(s.finite)
    decode_s = time.perf_counter() - t_dec
    if not finite.all():
        raise _non_finite(finite)

    eos_set = set(eos)
    token_ids = [_until_eos(row[:steps].tolist(), eos_set) for row in out]
    texts = [proc.decode(np.asarray(ids, np.int32)) for ids in token_ids]
    compile_s = compile_stats(model)["compile_s"] - compile_before
    preprocess_s = t_pre0 - t_tok
    timings = {
        "tokenizer_ms": 1e3 * (t_tok - t0),
        "preprocess_ms": 1e3 * preprocess_s,
        "compile_s": compile_s,
        "prefill_ms": 1e3 * prefill_s,
        "time_to_first_token_ms": 1e3 * (preprocess_s + prefill_s if first_token_s is None
                                         else preprocess_s + first_token_s),
        "decode_ms": 1e3 * decode_s,
        "decode_tokens_per_s": (steps - 1) * len(texts) / decode_s if steps > 1 and decode_s > 0 else 0.0,
        "new_tokens": steps,
    }
    return Generation(texts, token_ids, timings, stage, res, inputs, spans, None if extra is None else extra["keep"])


def _video_kwargs(proc, videos, fps) -> dict:
    """What the processor's `encode` takes for videos ({} without videos)."""
    if videos is None and fps is None:
        return {}
    if getattr(proc, "video_processor", None) is None:
        raise InputError("this model takes no video (video inputs need a Qwen2.5-VL model)")
    return {"videos": videos, "fps": fps}


def _non_finite(finite: np.ndarray) -> NumericalError:
    bad = np.flatnonzero(~finite).tolist()
    return NumericalError(f"the model produced NaN or infinite logits for example(s) {bad}",
                          fix="the weights or inputs hold non-finite values; check the checkpoint (convert again) "
                              "or run in float32 (--dtype float32)")


def _until_eos(ids: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in eos:
            return ids[: i + 1]
    return ids


def generate(
    model: Model,
    images: Sequence[Any] | None,
    prompts: Sequence[str] | str,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    prune: PruneConfig | None | str = PRESET,
    *,
    top_k: int = 0,
    template: str | None = None,
    return_ids: bool = False,
    videos: Sequence[Any] | None = None,
    fps: float | None = None,
):
    """Answer each (image, prompt) pair. Returns a list of strings, or (strings, token ids).

    Defaults are the CLI's: the model preset's chat template and pruning (`default_prune`:
    EntropyPrune at the preset's K and budget); `prune=None` runs the full model. `videos` and
    `fps`: as `run_generation` (Qwen2.5-VL; `images` may then be None).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        if videos is not None and not isinstance(videos, (list, tuple)):
            videos = [videos]
    g = run_generation(model, images, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                       top_p=top_p, top_k=top_k, seed=seed, prune=prune, template=template, videos=videos, fps=fps)
    return (g.texts, g.token_ids) if return_ids else g.texts
