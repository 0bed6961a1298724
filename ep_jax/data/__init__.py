"""Training and evaluation data for the small shipped model.

The names below are imported lazily so that `python -m ep_jax.data.scenes` does not import
the module twice.
"""

import importlib

__all__ = [
    "ANSWERS",
    "PHOTOS",
    "QUESTION_TYPES",
    "Sample",
    "SceneObject",
    "generate",
    "iterate",
    "make_sample",
    "tokenizer_corpus",
]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("ep_jax.data.scenes"), name)
    raise AttributeError(f"module 'ep_jax.data' has no attribute {name!r}")
