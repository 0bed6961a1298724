"""Hugging Face interop: the one place that knows HF weight names.

A table maps every HF tensor (hub layout: `language_model.model.*`, `language_model.lm_head.*`,
`vision_tower.vision_model.*`, `multi_modal_projector.*`) to an ep_jax parameter path and a
layout change. Per-layer tensors are stacked on a leading layer axis in ep_jax. Reading streams
tensor by tensor, shard by shard, into preallocated stacked arrays, so the peak memory is the
converted model plus one tensor.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ep_jax.config import LlavaConfig


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, naming the offending files/tensors."""


# transformers 5 saves under other prefixes than the hub checkpoints; all map to the hub one.
_PREFIXES = (
    ("language_model.lm_head.", "language_model.lm_head."),
    ("lm_head.", "language_model.lm_head."),
    ("model.language_model.", "language_model.model."),
    ("language_model.model.", "language_model.model."),
    ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("vision_tower.vision_model.", "vision_tower.vision_model."),
    ("vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("multi_modal_projector.", "multi_modal_projector."),
)
# Buffers some checkpoints carry that hold no learned weights.
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|embeddings\.position_ids)$")


def hub_name(key: str) -> str | None:
    """The hub-layout name of a checkpoint key (None for ignorable buffers)."""
    if _IGNORED.search(key):
        return None
    for old, new in _PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    return key  # unknown: reported as unexpected by the loader


# ---------------------------------------------------------------------- layout changes
# Each kind converts an HF tensor to the ep_jax layout (`load`) and back (`save`); `hf_shape`
# gives the HF shape expected for an ep_jax shape, for error messages.
@dataclasses.dataclass(frozen=True)
class _Kind:
    load: Callable[[np.ndarray, tuple], np.ndarray]
    save: Callable[[np.ndarray], np.ndarray]
    hf_shape: Callable[[tuple], tuple]


_KINDS = {
    "copy": _Kind(lambda a, s: a, lambda a: a, lambda s: s),
    # nn.Linear weight [out, in] -> [in, out]
    "linear": _Kind(lambda a, s: a.T, lambda a: a.T, lambda s: (s[1], s[0])),
    # q/k/v projection [heads*hd, d] -> [d, heads, hd]
    "heads_in": _Kind(
        lambda a, s: a.T.reshape(s), lambda a: a.reshape(a.shape[0], -1).T, lambda s: (s[1] * s[2], s[0])
    ),
    # output projection [d, heads*hd] -> [heads, hd, d]
    "heads_out": _Kind(
        lambda a, s: a.T.reshape(s), lambda a: a.reshape(-1, a.shape[-1]).T, lambda s: (s[2], s[0] * s[1])
    ),
    # q/k/v bias [heads*hd] -> [heads, hd]
    "head_bias": _Kind(lambda a, s: a.reshape(s), lambda a: a.reshape(-1), lambda s: (s[0] * s[1],)),
    # patch conv [d, c, p, p] -> [c, p, p, d]
    "conv": _Kind(
        lambda a, s: a.transpose(1, 2, 3, 0), lambda a: a.transpose(3, 0, 1, 2), lambda s: (s[3], s[0], s[1], s[2])
    ),
}


@dataclasses.dataclass(frozen=True)
class Entry:
    hf: str  # hub-layout name; "{i}" for the layer index of stacked tensors
    path: tuple[str, ...]  # ep_jax parameter path
    kind: str
    num_layers: int = 0  # > 0: stacked over this many layers


def weight_table(cfg: LlavaConfig) -> list[Entry]:
    t, v = cfg.text, cfg.vision
    vt = "vision_tower.vision_model."
    vl = vt + "encoder.layers.{i}."
    tl = "language_model.model.layers.{i}."
    e: list[Entry] = [
        Entry(vt + "embeddings.patch_embedding.weight", ("vision", "patch"), "conv"),
        Entry(vt + "embeddings.class_embedding", ("vision", "cls"), "copy"),
        Entry(vt + "embeddings.position_embedding.weight", ("vision", "pos"), "copy"),
        Entry(vt + "pre_layrnorm.weight", ("vision", "pre_norm", "scale"), "copy"),
        Entry(vt + "pre_layrnorm.bias", ("vision", "pre_norm", "bias"), "copy"),
        Entry(vt + "post_layernorm.weight", ("vision", "post_norm", "scale"), "copy"),
        Entry(vt + "post_layernorm.bias", ("vision", "post_norm", "bias"), "copy"),
        Entry("multi_modal_projector.linear_1.weight", ("proj1",), "linear"),
        Entry("multi_modal_projector.linear_1.bias", ("proj1_bias",), "copy"),
        Entry("multi_modal_projector.linear_2.weight", ("proj2",), "linear"),
        Entry("multi_modal_projector.linear_2.bias", ("proj2_bias",), "copy"),
        Entry("language_model.model.embed_tokens.weight", ("embed",), "copy"),
        Entry("language_model.model.norm.weight", ("norm", "scale"), "copy"),
    ]
    if not t.tie_word_embeddings:
        e.append(Entry("language_model.lm_head.weight", ("lm_head",), "linear"))
    nv, nt = v.num_layers, t.num_layers
    for ours, theirs in (("norm1", "layer_norm1"), ("norm2", "layer_norm2")):
        for p, q in (("scale", "weight"), ("bias", "bias")):
            e.append(Entry(vl + f"{theirs}.{q}", ("vision", "layers", ours, p), "copy", nv))
    for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj")):
        e.append(Entry(vl + f"self_attn.{theirs}.weight", ("vision", "layers", ours), "heads_in", nv))
        e.append(Entry(vl + f"self_attn.{theirs}.bias", ("vision", "layers", ours + "_bias"), "head_bias", nv))
    e += [
        Entry(vl + "self_attn.out_proj.weight", ("vision", "layers", "o"), "heads_out", nv),
        Entry(vl + "self_attn.out_proj.bias", ("vision", "layers", "o_bias"), "copy", nv),
        Entry(vl + "mlp.fc1.weight", ("vision", "layers", "fc1"), "linear", nv),
        Entry(vl + "mlp.fc1.bias", ("vision", "layers", "fc1_bias"), "copy", nv),
        Entry(vl + "mlp.fc2.weight", ("vision", "layers", "fc2"), "linear", nv),
        Entry(vl + "mlp.fc2.bias", ("vision", "layers", "fc2_bias"), "copy", nv),
        Entry(tl + "input_layernorm.weight", ("layers", "input_norm", "scale"), "copy", nt),
        Entry(tl + "post_attention_layernorm.weight", ("layers", "post_norm", "scale"), "copy", nt),
    ]
    for ours in ("q", "k", "v"):
        e.append(Entry(tl + f"self_attn.{ours}_proj.weight", ("layers", "attn", ours), "heads_in", nt))
        if t.attention_bias:
            e.append(Entry(tl + f"self_attn.{ours}_proj.bias", ("layers", "attn", ours + "_bias"), "head_bias", nt))
    e.append(Entry(tl + "self_attn.o_proj.weight", ("layers", "attn", "o"), "heads_out", nt))
    if t.attention_bias:
        e.append(Entry(tl + "self_attn.o_proj.bias", ("layers", "attn", "o_bias"), "copy", nt))
    for ours in ("gate", "up", "down"):
        e.append(Entry(tl + f"mlp.{ours}_proj.weight", ("layers", "mlp", ours), "linear", nt))
        if t.mlp_bias:
            e.append(Entry(tl + f"mlp.{ours}_proj.bias", ("layers", "mlp", ours + "_bias"), "copy", nt))
    return e


def _expand(table: list[Entry]) -> dict[str, tuple[Entry, int | None]]:
    """hub name -> (entry, layer index or None)."""
    out = {}
    for entry in table:
        if entry.num_layers:
            for i in range(entry.num_layers):
                out[entry.hf.format(i=i)] = (entry, i)
        else:
            out[entry.hf] = (entry, None)
    return out


def _get(tree: dict, path: tuple[str, ...]):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


# ---------------------------------------------------------------------- reading
def shard_files(src: str | Path) -> list[Path]:
    """The safetensors files of an HF checkpoint directory, from its index when it has one."""
    src = Path(src)
    index = src / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from None
        files = sorted({src / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{src}: shard(s) listed in the index are missing: {', '.join(missing)}")
        return files
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise CheckpointError(
            f"{src} has no *.safetensors weights (PyTorch .bin checkpoints are not supported: "
            "re-save with safetensors)"
        )
    return files


def iter_hf_tensors(src: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """(hub name, numpy array) for every tensor, one at a time."""
    from safetensors import safe_open

    for f in shard_files(src):
        try:
            handle = safe_open(str(f), framework="numpy")
            keys = list(handle.keys())
            # numpy has no bfloat16: such tensors go through the flax (jax) reader instead.
            bf16 = {k for k in keys if handle.get_slice(k).get_dtype() == "BF16"}
            handle_bf16 = safe_open(str(f), framework="flax") if bf16 else None
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise CheckpointError(f"cannot read shard {f}: {e} (re-download or re-convert it)") from None
        for key in keys:
            name = hub_name(key)
            if name is None:
                continue
            try:
                arr = np.asarray(handle_bf16.get_tensor(key)) if key in bf16 else handle.get_tensor(key)
            except Exception as e:
                raise CheckpointError(f"cannot read tensor {key} in {f}: {e}") from None
            yield name, arr


def read_hf_weights(
    src: str | Path,
    cfg: LlavaConfig,
    shapes: dict,
    dtype,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Stream an HF checkpoint into a nested dict of numpy arrays in the ep_jax layout.

    `shapes` is the nested dict of ep_jax parameter shapes (from the abstract model). Missing,
    unexpected and mis-shaped tensors are all collected and reported in one error.
    """
    table = weight_table(cfg)
    by_name = _expand(table)
    params: dict = {}
    for entry in table:
        _set(params, entry.path, np.empty(_get(shapes, entry.path), dtype=dtype))
    seen, unexpected, misshaped = set(), [], []
    for name, arr in iter_hf_tensors(src):
        if name not in by_name:
            unexpected.append(name)
            continue
        entry, layer = by_name[name]
        target = _get(params, entry.path)
        slot_shape = target.shape[1:] if layer is not None else target.shape
        kind = _KINDS[entry.kind]
        if tuple(arr.shape) != kind.hf_shape(slot_shape) and not (
            entry.kind == "copy" and arr.size == int(np.prod(slot_shape))
        ):
            misshaped.append(f"{name}: {tuple(arr.shape)}, expected {kind.hf_shape(slot_shape)}")
            seen.add(name)  # present, reported as mis-shaped rather than missing
            continue
        # Assignment casts and copies in one pass: no converted temporary of the tensor.
        value = kind.load(arr, slot_shape)
        if value.shape != slot_shape:  # only "copy" tensors stored flat; a view, no copy
            value = value.reshape(slot_shape)
        if layer is None:
            target[...] = value
        else:
            target[layer] = value
        del arr, value
        seen.add(name)
        if progress is not None:
            progress(name)
    missing = sorted(set(by_name) - seen)
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {_short(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped {len(misshaped)} tensor(s): {_short(misshaped)}")
    if problems:
        raise CheckpointError(f"{src} does not match its config.json: " + "; ".join(problems))
    return params


def _short(items: list[str], n: int = 6) -> str:
    more = f" ... (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


# ---------------------------------------------------------------------- writing
def iter_hf_export(params: dict, cfg: LlavaConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(hub name, numpy array in HF layout) for every ep_jax parameter."""
    for entry in weight_table(cfg):
        value = np.asarray(_get(params, entry.path))
        kind = _KINDS[entry.kind]
        if entry.num_layers:
            for i in range(entry.num_layers):
                yield entry.hf.format(i=i), np.ascontiguousarray(kind.save(value[i]))
        else:
            yield entry.hf, np.ascontiguousarray(kind.save(value))
