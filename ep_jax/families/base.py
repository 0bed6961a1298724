"""What a model family supplies to the runtime, and the registry that picks one.

A family is the code that knows one kind of Hugging Face checkpoint (`model_type` in its
config.json). The runtime (`ep_jax/runtime/`) runs any family's module: it calls

  module.embed_inputs(inputs) -> (x [b, s, d], positions pytree: [b, s] or [3, b, s])
  module.layers               decoder layers, each with `qkv(h, positions)` and
                              `finish(h, q, keys, values, mask, causal=...)`
  module.norm, module.logits(h), module.rope(x, positions), module.embed_tokens(ids)
  module.decode_positions(next_position [b]) -> positions of one new token
  module.num_layers

and the family object below gives the host side: config, weights, processor and visual spans.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

from ep_jax.errors import CheckpointError


@dataclasses.dataclass(frozen=True)
class Family:
    name: str  # the Hugging Face `model_type`
    config_from_hf: Callable[[dict], Any]  # config.json dict -> the family's config
    config_from_json_dict: Callable[[dict], Any]  # ep_jax checkpoint's saved config -> config
    module: Callable[..., Any]  # (cfg, *, dtype, rngs, layout) -> nnx.Module
    read_hf_weights: Callable[..., dict]  # (src, cfg, shapes, dtype, progress) -> params
    iter_hf_export: Callable[..., Any]  # (params, cfg) -> (hub name, array) pairs
    hf_tensor_count: Callable[[Any], int]  # tensors a Hugging Face checkpoint of cfg holds
    processor: Callable[..., Any]  # (checkpoint dir, cfg) -> the family's Processor
    inputs: Callable[..., tuple]  # (cfg, arrays...) -> (checked inputs dict, VisualSpans)
    decoder_layer_bytes: Callable[[Any, Any], int]  # (cfg, dtype) -> bytes of one decoder layer
    preset_fields: Callable[[Any], dict]  # cfg -> flat fields presets `match` against
    default_template: str = "raw"
    # K when neither the command nor a preset gives one: the paper's setting for the family
    # (LLaVA-1.5 and LLaVA-NeXT 2, Qwen2.5-VL 1)
    default_prune_layer: int = 2
    # () -> the module settings the family's graph reads when it is traced (part of the compile
    # cache's key, so changing one compiles anew)
    graph_settings: Callable[[], tuple] = lambda: ()


FAMILIES: dict[str, Family] = {}
# The families that ship with ep_jax, by model_type: each sub-package registers itself when it is
# imported, which happens the first time its model_type is asked for (a LLaVA user never imports
# the Qwen2.5-VL vision tower).
BUILTIN = {"llava": "ep_jax.families.llava", "llava_next": "ep_jax.families.llava_next",
           "qwen2_5_vl": "ep_jax.families.qwen2_5_vl"}


def register(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


def family_of(hf_config: dict) -> Family:
    """The family of a Hugging Face config.json dict, by its `model_type`."""
    model_type = hf_config.get("model_type") if isinstance(hf_config, dict) else None
    return get(model_type, what="model_type")


def get(name: str, what: str = "model family") -> Family:
    """The family registered as `name` (a Hugging Face `model_type`)."""
    if not isinstance(name, str):
        name = repr(name)
    if name not in FAMILIES and name in BUILTIN:
        importlib.import_module(BUILTIN[name])
    if name not in FAMILIES:
        known = ", ".join(sorted(set(FAMILIES) | set(BUILTIN)))
        raise CheckpointError(f"{what} {name!r} is not supported; ep_jax runs: {known}")
    return FAMILIES[name]
