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


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


def family_of(hf_config: dict) -> Family:
    """The family of a Hugging Face config.json dict, by its `model_type`."""
    _load_builtin()
    model_type = hf_config.get("model_type") if isinstance(hf_config, dict) else None
    if model_type not in FAMILIES:
        raise CheckpointError(
            f"model_type {model_type!r} is not supported; ep_jax runs: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]


def get(name: str) -> Family:
    _load_builtin()
    if name not in FAMILIES:
        raise CheckpointError(f"unknown model family {name!r}; known: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def _load_builtin() -> None:
    import ep_jax.families.llava  # noqa: F401  (registers itself)
    import ep_jax.families.llava_next  # noqa: F401
    import ep_jax.families.qwen2_5_vl  # noqa: F401
