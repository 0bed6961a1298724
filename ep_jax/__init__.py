"""ep_jax: vision-language models in JAX/Flax with EntropyPrune.

    model = ep_jax.load()                                 # the shipped model; or a path: an ep_jax
                                                          # checkpoint or a Hugging Face directory
    ep_jax.generate(model, [image], ["What is this?"])    # the preset's template and pruning
    out = ep_jax.forward(model, input_ids, pixel_values, prune=ep_jax.PruneConfig(avg_keep=64))
    model = ep_jax.load(path, mesh="data=2,model=4")      # several devices (runtime/sharding.py)

Where pruning happens: `ep_jax/runtime/prefill.py` (`prune_stage`, called by `prefill` between
the two layer segments), with the scorers in `ep_jax/core/scorers.py`, the selection in
`ep_jax/core/select.py` and the matrix entropy in `ep_jax/core/entropy.py`.

Layout (imports point one way, top to bottom; README "Design notes" has the table):
  errors.py   the error types; core/ pure functions (entropy, budgets, visual spans, scorers,
              selection, FLOPs) and config.py; nn/ family-agnostic layers
  runtime/    prefill + prune stage + decode, sampling, KV cache, compile cache, public API
  processing.py, images.py, image_files.py, tokenizer.py, hf.py, files.py: host-side inputs
  families/   one package per Hugging Face model_type (module, inputs, spans, registry)
  checkpoint.py, presets.py: loading and saving models
  analysis/   Entropy Collapse Layer profile, --explain; cli/ the command lines;
  bench*.py, quality.py, train.py, data/: benchmarks and the shipped model's recipe
Names are imported lazily so `import ep_jax` stays light.
"""

import importlib

_EXPORTS = {
    "Model": "runtime.model", "load": "checkpoint", "convert_hf": "checkpoint", "export_hf": "checkpoint",
    "LlavaConfig": "config", "TextConfig": "config", "VisionConfig": "config",
    "token_entropy": "core.entropy", "set_entropy": "core.entropy",
    "forward": "runtime.api", "generate": "runtime.api", "run_generation": "runtime.api",
    "ForwardOutput": "runtime.api", "Generation": "runtime.api", "default_prune": "runtime.api",
    "compile_stats": "runtime.engine",
    "make_mesh": "runtime.sharding", "shard_model": "runtime.sharding",
    "initialize_distributed": "runtime.sharding",
    "PruneConfig": "core.budget", "budget": "core.budget", "resolve_keep": "core.budget",
    "VisualSpans": "core.spans",
    "EpJaxError": "errors", "InputError": "errors", "BudgetError": "errors", "CheckpointError": "errors",
    "ConfigError": "errors", "OutputPathError": "errors", "NumericalError": "errors", "ProcessingError": "errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"ep_jax.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ep_jax' has no attribute {name!r}")
