"""Jitted prefill + decode, the Python API (`forward`, `generate`) and the CLI.

Compiled functions are cached per model, keyed by every static setting and input shape:
prompts are padded to length buckets and decode room to a power of two, so a new prompt or
image of a known bucket reuses the compiled code (`Model.stats["compiles"]` counts them).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
import types
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ep_jax import prune as prune_lib
from ep_jax.cache import KVCache
from ep_jax.checkpoint import Model
from ep_jax.nn.llava import PrefillResult, PruneStage
from ep_jax.sampling import sample


class InputError(ValueError):
    """Model inputs that do not fit the model, with the value and the fix."""


# ---------------------------------------------------------------------- pure functions
def _prefill(graphdef, state, input_ids, pixel_values, attention_mask, *, stage, decode_room, all_logits):
    model = nnx.merge(graphdef, state)
    res = model.prefill(input_ids, pixel_values, attention_mask, stage, decode_room)
    # Prompts are left padded for generation, so the last row is every example's last token.
    logits = model.logits(res.hidden if all_logits else res.hidden[:, -1])
    return logits, res


@dataclasses.dataclass(frozen=True)
class _Decode:
    """What the decode loop carries; immutable, one step makes a new one."""

    step: jax.Array  # tokens produced so far
    token: jax.Array  # [b] last token
    done: jax.Array  # [b] finished (EOS seen)
    cache: KVCache
    key: jax.Array
    out: jax.Array  # [b, room] produced tokens, pad after EOS


jax.tree_util.register_dataclass(_Decode, data_fields=["step", "token", "done", "cache", "key", "out"], meta_fields=[])


def _advance(model, s: _Decode, temperature, top_p, *, top_k, eos_ids, pad_id) -> _Decode:
    logits, cache = model.decode(s.token, s.cache)
    key, sub = jax.random.split(s.key)
    token = jnp.where(s.done, pad_id, sample(logits, sub, temperature, top_p, top_k))
    out = jax.lax.dynamic_update_slice_in_dim(s.out, token[:, None], s.step, axis=1)
    done = s.done | jnp.isin(token, jnp.asarray(eos_ids, jnp.int32))
    return _Decode(s.step + 1, token, done, cache, key, out)


def _first(logits, cache, key, temperature, top_p, *, top_k, eos_ids, pad_id, room) -> _Decode:
    key, sub = jax.random.split(key)
    token = sample(logits, sub, temperature, top_p, top_k)
    out = jnp.full((logits.shape[0], room), pad_id, jnp.int32).at[:, 0].set(token)
    done = jnp.isin(token, jnp.asarray(eos_ids, jnp.int32))
    return _Decode(jnp.asarray(1, jnp.int32), token, done, cache, key, out)


def _decode_all(graphdef, state, logits, cache, key, temperature, top_p, max_new, *, top_k, eos_ids, pad_id, room):
    """Sample the first token from the prefill logits, then decode until EOS or max_new."""
    model = nnx.merge(graphdef, state)
    kw = dict(top_k=top_k, eos_ids=eos_ids, pad_id=pad_id)
    s = _first(logits, cache, key, temperature, top_p, room=room, **kw)
    s = jax.lax.while_loop(
        lambda s: (s.step < max_new) & ~jnp.all(s.done),
        lambda s: _advance(model, s, temperature, top_p, **kw),
        s,
    )
    return s.out, s.step


def _decode_one(graphdef, state, s: _Decode, temperature, top_p, *, top_k, eos_ids, pad_id):
    return _advance(nnx.merge(graphdef, state), s, temperature, top_p, top_k=top_k, eos_ids=eos_ids, pad_id=pad_id)


def _first_only(graphdef, logits, cache, key, temperature, top_p, *, top_k, eos_ids, pad_id, room):
    return _first(logits, cache, key, temperature, top_p, top_k=top_k, eos_ids=eos_ids, pad_id=pad_id, room=room)


# ---------------------------------------------------------------------- compile cache
def _signature(args) -> tuple:
    leaves, tree = jax.tree.flatten(args)
    return tree, tuple((np.shape(x), str(getattr(x, "dtype", type(x)))) for x in leaves)


def _compiled(model: Model, fn: Callable, static: dict, args: tuple, donate: tuple[int, ...] = ()):
    """Ahead-of-time compile `fn` for these static settings and argument shapes, once."""
    key = (fn.__name__, tuple(sorted(static.items())), _signature(args))
    hit = model.compiled.get(key)
    if hit is None:
        t0 = time.perf_counter()
        jitted = jax.jit(functools.partial(fn, model.graphdef, **static), donate_argnums=donate)
        hit = jitted.lower(*args).compile()
        model.compiled[key] = hit
        stats = model.compiled.setdefault("_stats", {"compiles": 0, "compile_s": 0.0})
        stats["compiles"] += 1
        stats["compile_s"] += time.perf_counter() - t0
    return hit


def compile_stats(model: Model) -> dict:
    return dict(model.compiled.get("_stats", {"compiles": 0, "compile_s": 0.0}))


# ---------------------------------------------------------------------- inputs
def resolve_stage(model: Model, prune: prune_lib.PruneConfig | None, num_visual: int,
                  inputs: tuple | None = None) -> PruneStage | None:
    """PruneConfig -> the static (K, R, N) the graph is built for, with clear errors.

    layer="auto" takes K from the model preset; without one, K is measured once on `inputs`
    (input_ids, pixel_values, attention_mask) with `ecl.measure_ecl`, reported on stderr, and
    kept on the model so later calls reuse it (and its compiled graph).
    """
    if prune is None or prune.method == "none":
        return None
    if num_visual == 0:
        raise InputError("pruning needs visual tokens, but the inputs hold no image token")
    if prune.layer == "auto":
        prune = dataclasses.replace(prune, layer=_auto_layer(model, inputs))
    keep = prune_lib.resolve_keep(prune, model.config.text.num_layers, num_visual)
    return PruneStage(config=prune, layer=int(prune.layer), keep=keep, num_visual=num_visual)


def _auto_layer(model: Model, inputs: tuple | None) -> int:
    if model.preset is not None and model.preset.prune_layer is not None:
        return model.preset.prune_layer
    if "measured_layer" not in model.compiled:
        if inputs is None:
            raise InputError("PruneConfig(layer='auto'): this model has no preset K and no inputs to measure it on")
        from ep_jax.ecl import measure_ecl

        result = measure_ecl(model, *inputs)
        if result.layer is None:
            raise InputError(
                f"PruneConfig(layer='auto'): {result.message} Pass an int layer (e.g. layer=2) instead."
            )
        print(f"ep_jax: no preset K for this model; measured the Entropy Collapse Layer on this input: "
              f"{result.message}", file=sys.stderr)
        model.compiled["measured_layer"] = result.layer
    return model.compiled["measured_layer"]


def _check_inputs(model: Model, input_ids, pixel_values, attention_mask):
    cfg = model.config
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise InputError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
    input_ids = input_ids.astype(np.int32)
    if attention_mask is None:
        attention_mask = np.ones_like(input_ids)
    attention_mask = np.asarray(attention_mask).astype(bool)
    if attention_mask.shape != input_ids.shape:
        raise InputError(f"attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}")
    if input_ids.max(initial=0) >= cfg.text.vocab_size or input_ids.min(initial=0) < 0:
        raise InputError(f"input_ids hold ids outside the vocabulary [0, {cfg.text.vocab_size})")
    per_row = (input_ids == cfg.image_token_id).sum(1)
    if len(set(per_row.tolist())) > 1:
        raise InputError(
            f"every example must hold the same number of image tokens (got {per_row.tolist()}); "
            "give each prompt the same number of images"
        )
    num_visual = int(per_row[0])
    n_img = 0 if pixel_values is None else len(pixel_values)
    if num_visual * len(input_ids) != n_img * cfg.image_seq_len:
        raise InputError(
            f"input_ids hold {int(per_row.sum())} image tokens but {n_img} image(s) x {cfg.image_seq_len} "
            "visual tokens were given; expand each <image> to image_seq_len tokens (the Processor does)"
        )
    if pixel_values is not None:
        pixel_values = np.asarray(pixel_values)
        want = (cfg.vision.num_channels, cfg.vision.image_size, cfg.vision.image_size)
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != want:
            raise InputError(f"pixel_values must be [num_images, {want[0]}, {want[1]}, {want[2]}], got {pixel_values.shape}")
        pixel_values = pixel_values.astype(model.dtype)
    return input_ids, pixel_values, attention_mask, num_visual


# ---------------------------------------------------------------------- public API
@dataclasses.dataclass
class ForwardOutput:
    logits: np.ndarray  # [b, s', v] float32
    positions: np.ndarray  # [b, s'] original sequence index of each row
    kept_mask: np.ndarray  # [b, s] tokens kept after the prune stage (all real tokens without pruning)
    scores: np.ndarray | None  # [b, n] prune scores of the visual tokens
    visual_positions: np.ndarray | None  # [b, n]
    stage: PruneStage | None


def forward(model: Model, input_ids, pixel_values=None, attention_mask=None,
            prune: prune_lib.PruneConfig | None = None) -> ForwardOutput:
    """Logits for inputs as Hugging Face's LlavaProcessor returns them (padding on either side).

    With pruning, the rows are the kept tokens (`positions` gives their original index); in the
    "mask" mode all rows are returned.
    """
    input_ids, pixel_values, attention_mask, num_visual = _check_inputs(model, input_ids, pixel_values, attention_mask)
    stage = resolve_stage(model, prune, num_visual, (input_ids, pixel_values, attention_mask))
    args = (model.state, input_ids, pixel_values, attention_mask)
    fn = _compiled(model, _prefill, dict(stage=stage, decode_room=0, all_logits=True), args)
    logits, res = fn(*args)
    as_np = lambda a: None if a is None else np.asarray(a)  # noqa: E731
    return ForwardOutput(np.asarray(logits), np.asarray(res.rows), np.asarray(res.kept_mask),
                         as_np(res.scores), as_np(res.visual_positions), stage)


@dataclasses.dataclass
class Generation:
    texts: list[str]
    token_ids: list[list[int]]
    timings: dict[str, float]
    stage: PruneStage | None
    prefill: PrefillResult  # kept mask, scores, visual positions (for --explain)
    inputs: dict[str, np.ndarray]


def _room(max_new_tokens: int) -> int:
    return max(16, 1 << (max_new_tokens - 1).bit_length())


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
    prune: prune_lib.PruneConfig | None = None,
    template: str = "vicuna_v1",
    on_token: Callable[[list[int]], None] | None = None,
) -> Generation:
    """Everything `generate` does, with timings and the prune stage's outputs."""
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens={max_new_tokens}: need at least 1")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise InputError(f"bad sampling settings temperature={temperature} top_p={top_p} top_k={top_k}: "
                         "need temperature >= 0, 0 < top_p <= 1, top_k >= 0")
    t0 = time.perf_counter()
    proc = model.processor
    max_len = model.config.text.max_position_embeddings
    enc = proc.encode(list(prompts), images, template=template, pad_side="left", max_length=max_len)
    if int(enc["lengths"].max()) + max_new_tokens > max_len:
        raise InputError(
            f"prompt ({int(enc['lengths'].max())} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"model context of {max_len} tokens; lower --max-new-tokens or shorten the prompt"
        )
    pixel_values = enc["pixel_values"] if len(enc["pixel_values"]) else None
    input_ids, pixel_values, attention_mask, num_visual = _check_inputs(
        model, enc["input_ids"], pixel_values, enc["attention_mask"]
    )
    stage = resolve_stage(model, prune, num_visual, (input_ids, pixel_values, attention_mask))
    room = _room(max_new_tokens)
    compile_before = compile_stats(model)["compile_s"]

    args = (model.state, input_ids, pixel_values, attention_mask)
    prefill = _compiled(model, _prefill, dict(stage=stage, decode_room=room, all_logits=False), args)
    t_pre = time.perf_counter()
    preprocess_s = t_pre - t0 - (compile_stats(model)["compile_s"] - compile_before)
    logits, res = prefill(*args)
    logits.block_until_ready()
    prefill_s = time.perf_counter() - t_pre

    key = jax.random.key(seed)
    temp, tp = np.float32(temperature), np.float32(top_p)
    eos = model.config.eos_ids or (-1,)
    statics = dict(top_k=top_k, eos_ids=tuple(eos), pad_id=proc.pad_token_id)
    if on_token is None:
        dargs = (model.state, logits, res.cache, key, temp, tp, np.int32(max_new_tokens))
        decode_all = _compiled(model, _decode_all, dict(room=room, **statics), dargs)
        t_dec = time.perf_counter()
        out, steps = decode_all(*dargs)
        out, steps = np.asarray(out), int(steps)
    else:
        # Streaming: the same step function, one call per token, each token handed over at once.
        fargs = (logits, res.cache, key, temp, tp)
        s = _compiled(model, _first_only, dict(room=room, **statics), fargs)(*fargs)
        sargs = (model.state, s, temp, tp)
        step = _compiled(model, _decode_one, statics, sargs, donate=(1,))
        t_dec = time.perf_counter()
        on_token(np.asarray(s.token).tolist())
        while int(s.step) < max_new_tokens and not bool(jnp.all(s.done)):
            s = step(model.state, s, temp, tp)
            on_token(np.asarray(s.token).tolist())
        out, steps = np.asarray(s.out), int(s.step)
    decode_s = time.perf_counter() - t_dec

    eos_set = set(eos)
    token_ids = [_until_eos(row[:steps].tolist(), eos_set) for row in out]
    texts = [proc.decode(np.asarray(ids, np.int32)) for ids in token_ids]
    timings = {
        "compile_s": compile_stats(model)["compile_s"] - compile_before,
        "preprocess_ms": 1e3 * preprocess_s,
        "prefill_ms": 1e3 * prefill_s,
        "time_to_first_token_ms": 1e3 * (preprocess_s + prefill_s),
        "decode_tokens_per_s": (steps - 1) * len(texts) / decode_s if steps > 1 else 0.0,
        "new_tokens": steps,
    }
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}
    return Generation(texts, token_ids, timings, stage, res, inputs)


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
    prune: prune_lib.PruneConfig | None = None,
    *,
    top_k: int = 0,
    template: str = "vicuna_v1",
    return_ids: bool = False,
):
    """Answer each (image, prompt) pair. Returns a list of strings, or (strings, token ids)."""
    if isinstance(prompts, str):
        prompts = [prompts]
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
    g = run_generation(model, images, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                       top_p=top_p, top_k=top_k, seed=seed, prune=prune, template=template)
    return (g.texts, g.token_ids) if return_ids else g.texts


class _CallableModule(types.ModuleType):
    """`ep_jax.generate` is both this module (`python -m ep_jax.generate`) and the function
    `generate`: importing the submodule rebinds the package attribute to the module, so the
    module itself forwards calls to the function."""

    def __call__(self, *args, **kwargs):
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule


if __name__ == "__main__":
    from ep_jax.cli import main

    sys.exit(main())
