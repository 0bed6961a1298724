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
from ep_jax.errors import CheckpointError, ConfigError

__all__ = ["CheckpointError", "ConfigError", "check_config_fields", "check_finite", "iter_hf_export", "iter_hf_tensors",
           "parse_config", "read_config", "read_hf_weights", "shard_files", "weight_table"]


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
    ("model.image_newline", "image_newline"),  # LLaVA-NeXT (transformers 5 layout)
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
    # 3-D patch conv [d, c, t, p, p] -> [c, t, p, p, d] (Qwen2-VL's patch embedding)
    "conv3d": _Kind(lambda a, s: a.transpose(1, 2, 3, 4, 0), lambda a: a.transpose(4, 0, 1, 2, 3),
                    lambda s: (s[4], s[0], s[1], s[2], s[3])),
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


# ---------------------------------------------------------------------- config.json
# Fields of config.json that LlavaConfig.from_hf_dict reads, with the JSON types they must have:
# a wrong type there would surface as a TypeError / AttributeError deep inside, or later as a
# nonsensical shape; here it is one ConfigError naming the field.
_POSITIVE_INTS = {
    "vision_config": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                      "patch_size", "num_channels"),
    "text_config": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "max_position_embeddings"),
}
_NUMBERS = {"vision_config": ("layer_norm_eps",), "text_config": ("rms_norm_eps", "rope_theta")}
_STRINGS = {"": ("projector_hidden_act", "vision_feature_select_strategy", "model_type"),
            "vision_config": ("hidden_act", "model_type"), "text_config": ("hidden_act", "model_type")}
_TOKEN_IDS = {"": ("image_token_index", "image_token_id", "pad_token_id", "bos_token_id", "eos_token_id"),
              "text_config": ("pad_token_id", "bos_token_id", "eos_token_id")}


def read_config(path: str | Path) -> tuple[LlavaConfig, dict]:
    """(LlavaConfig, the raw dict) of a Hugging Face config.json; ConfigError naming the file and
    the field for anything malformed (not JSON, a field of the wrong type, a missing sub-field)."""
    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path} not found: a LLaVA checkpoint directory has a config.json") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}", fix="restore it from the original checkpoint") from None
    return parse_config(d, path), d


def parse_config(d, path: str | Path = "config.json") -> LlavaConfig:
    """LlavaConfig of a config.json dict, every field it reads type-checked first: ConfigError
    naming the field instead of a TypeError / AttributeError / KeyError from deep inside."""
    check_config_fields(d, path)
    try:
        return LlavaConfig.from_hf_dict(d)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except KeyError as e:
        raise ConfigError(f"{path}: field {e.args[0]!r} is missing", fix="restore it from the original checkpoint") \
            from None
    except (AttributeError, TypeError, ValueError, ZeroDivisionError) as e:
        raise ConfigError(f"{path} has a malformed field ({type(e).__name__}: {e})",
                          fix="restore it from the original checkpoint") from None


def check_config_fields(d, path: str | Path = "config.json") -> None:
    """ConfigError naming the first field of a config.json dict that has the wrong JSON type."""
    def fail(field: str, value, want: str):
        raise ConfigError(f"{path}: field {field} is {value!r}, expected {want}",
                          fix="fix the field or restore config.json from the original checkpoint")

    if not isinstance(d, dict):
        fail("(top level)", type(d).__name__, "a JSON object")
    for sub in ("vision_config", "text_config"):
        if d.get(sub) is not None and not isinstance(d[sub], dict):
            fail(sub, d[sub], "an object")
    parts = {"": d, "vision_config": d.get("vision_config") or {}, "text_config": d.get("text_config") or {}}

    def name(sub, key):
        return f"{sub}.{key}" if sub else key

    for sub, keys in _POSITIVE_INTS.items():
        for key in keys:
            v = parts[sub].get(key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                fail(name(sub, key), v, "a positive integer")
    for sub, keys in _NUMBERS.items():
        for key in keys:
            v = parts[sub].get(key)
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not np.isfinite(v)):
                fail(name(sub, key), v, "a number")
    for sub, keys in _STRINGS.items():
        for key in keys:
            v = parts[sub].get(key)
            if v is not None and not isinstance(v, str):
                fail(name(sub, key), v, "a string")
    for sub, keys in _TOKEN_IDS.items():
        for key in keys:
            v = parts[sub].get(key)
            ids = v if isinstance(v, list) and key == "eos_token_id" else [v]
            if v is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                fail(name(sub, key), v, "a token id (an integer >= 0)" + (" or a list of them" if key == "eos_token_id" else ""))
    v = d.get("vision_feature_layer")
    if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
        fail("vision_feature_layer", v, "an integer layer index")
    t = parts["text_config"]
    for key in ("rope_scaling", "rope_parameters"):
        r = t.get(key)
        if r is None:
            continue
        if not isinstance(r, dict):
            fail(f"text_config.{key}", r, "an object")
        kind = r.get("rope_type", r.get("type", "default"))
        if kind == "linear" and (not isinstance(r.get("factor"), (int, float)) or isinstance(r.get("factor"), bool)):
            fail(f"text_config.{key}.factor", r.get("factor"), "a number (linear RoPE scaling)")
        if "rope_theta" in r and (not isinstance(r["rope_theta"], (int, float)) or isinstance(r["rope_theta"], bool)):
            fail(f"text_config.{key}.rope_theta", r["rope_theta"], "a number")


# ---------------------------------------------------------------------- finite weights
def check_finite(arr: np.ndarray, name: str, where: str | Path) -> float:
    """The float64 sum of `arr` (one pass, no temporary as large as the array); CheckpointError
    naming the tensor when it holds NaN or inf. The sum doubles as a checksum of the values."""
    with np.errstate(all="ignore"):  # inf - inf is NaN: reported below, no warning
        total = float(np.sum(arr, dtype=np.float64))
    if np.isfinite(total):
        return total
    nan = inf = 0
    flat = arr.reshape(-1)
    for i in range(0, flat.size, 1 << 22):  # counted in blocks: only on the error path
        block = flat[i:i + (1 << 22)]
        nan += int(np.isnan(block).sum())
        inf += int(np.isinf(block).sum())
    if not nan and not inf:  # finite values whose sum overflows (float64 input only): not damaged
        return total
    found = " and ".join(f"{n} {kind} value{'s' if n > 1 else ''}" for n, kind in ((nan, "NaN"), (inf, "inf")) if n)
    raise CheckpointError(f"tensor {name} of checkpoint {where} holds {found} (of {arr.size})",
                          fix="the weights are damaged: re-download the checkpoint or convert it again")


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


def iter_hf_tensors(src: str | Path, name_of: Callable[[str], str | None] = hub_name
                    ) -> Iterator[tuple[str, np.ndarray]]:
    """(hub name, numpy array) for every tensor, one at a time (`name_of`: checkpoint key ->
    the hub name, None to skip; default LLaVA's `hub_name`)."""
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
            name = name_of(key)
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
    table: list[Entry] | None = None,
    name_of: Callable[[str], str | None] = hub_name,
) -> dict:
    """Stream an HF checkpoint into a nested dict of numpy arrays in the ep_jax layout.

    `shapes` is the nested dict of ep_jax parameter shapes (from the abstract model). Missing,
    unexpected and mis-shaped tensors are all collected and reported in one error; a tensor
    holding NaN or inf is named at once (`check_finite`). `table`: another family's weight table
    (default: LLaVA's `weight_table(cfg)`); `name_of`: checkpoint key -> hub name (default `hub_name`).
    """
    table = weight_table(cfg) if table is None else table
    by_name = _expand(table)
    params: dict = {}
    for entry in table:
        _set(params, entry.path, np.empty(_get(shapes, entry.path), dtype=dtype))
    seen, unexpected, misshaped = set(), [], []
    for name, arr in iter_hf_tensors(src, name_of):
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
        # after the cast: a float32 value too large for float16 becomes inf there
        check_finite(target if layer is None else target[layer], name, src)
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
def iter_hf_export(params: dict, cfg: LlavaConfig, table: list[Entry] | None = None
                   ) -> Iterator[tuple[str, np.ndarray]]:
    """(hub name, numpy array in HF layout) for every ep_jax parameter (`table`: as in read_hf_weights)."""
    for entry in weight_table(cfg) if table is None else table:
        value = np.asarray(_get(params, entry.path))
        kind = _KINDS[entry.kind]
        if entry.num_layers:
            for i in range(entry.num_layers):
                yield entry.hf.format(i=i), np.ascontiguousarray(kind.save(value[i]))
        else:
            yield entry.hf, np.ascontiguousarray(kind.save(value))
