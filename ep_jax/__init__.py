"""ep_jax: LLaVA-style vision-language models in JAX/Flax with EntropyPrune.

    model = ep_jax.load("path/to/checkpoint")            # ep_jax or Hugging Face directory
    ep_jax.generate(model, [image], ["What is this?"], prune=ep_jax.PruneConfig(avg_keep=64))
    out = ep_jax.forward(model, input_ids, pixel_values, prune=...)

Where pruning happens: `ep_jax/nn/llava.py` (`Llava.prune_stage`, called by `prefill`), with the
scoring and selection in `ep_jax/prune.py` and the matrix entropy in `ep_jax/entropy.py`.
Names are imported lazily so `import ep_jax` (and `python -m ep_jax.generate`) stay light.
"""

import importlib

_EXPORTS = {
    "Model": "checkpoint", "load": "checkpoint", "init_model": "checkpoint",
    "convert_hf": "checkpoint", "export_hf": "checkpoint",
    "LlavaConfig": "config", "TextConfig": "config", "VisionConfig": "config",
    "token_entropy": "entropy", "set_entropy": "entropy",
    "forward": "generate", "generate": "generate", "run_generation": "generate", "ForwardOutput": "generate",
    "PruneConfig": "prune", "budget": "prune", "resolve_keep": "prune",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name == "generate":  # the module, callable as the function (see ep_jax/generate.py)
        return importlib.import_module("ep_jax.generate")
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"ep_jax.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ep_jax' has no attribute {name!r}")
