"""The compile cache: every jitted function is compiled ahead of time once per static setting
and input shapes, kept on the model, and counted; and JAX's persistent compilation cache, on by
default, so a second process reuses the first one's compiled code.

A model placed on a device mesh (`Model.mesh`) is compiled under that mesh (`jax.set_mesh`), so
the graph's sharding constraints (`nn.partition.constrain`) apply and XLA partitions it; inputs
given as host arrays are placed as the compiled program expects. The key also holds the mesh
and the attention implementation (`nn.attention.implementation`).

Persistent cache directory: $EP_JAX_COMPILATION_CACHE if set (a path; "0", "off" or "" turns
the cache off), else `$XDG_CACHE_HOME/ep_jax/jax` or `~/.cache/ep_jax/jax`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from ep_jax.nn.attention import implementation as attention_implementation

_PERSISTENT = {"dir": None, "checked": False}


def persistent_cache_dir() -> Path | None:
    """Where compiled programs are persisted (None: off)."""
    env = os.environ.get("EP_JAX_COMPILATION_CACHE")
    if env is not None:
        return None if env.strip().lower() in ("", "0", "off", "false", "no") else Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ep_jax" / "jax"


def enable_persistent_cache() -> Path | None:
    """Turn on JAX's persistent compilation cache (once per process); returns its directory."""
    if _PERSISTENT["checked"]:
        return _PERSISTENT["dir"]
    _PERSISTENT["checked"] = True
    path = persistent_cache_dir()
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"ep_jax: compilation cache off ({path} is not writable: {e.strerror}); "
              "set EP_JAX_COMPILATION_CACHE to another directory", file=sys.stderr)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    _PERSISTENT["dir"] = path
    return path


def _signature(args) -> tuple:
    leaves, tree = jax.tree.flatten(args)
    return tree, tuple((np.shape(x), str(getattr(x, "dtype", type(x)))) for x in leaves)


def compiled(model, fn: Callable, static: dict, args: tuple, donate: tuple[int, ...] = ()):
    """`fn(model.graphdef, *args, **static)` compiled ahead of time for these static settings
    and argument shapes, once per model."""
    mesh = getattr(model, "mesh", None)
    key = (fn.__name__, tuple(sorted(static.items())), _signature(args), mesh, attention_implementation(),
           model.family.graph_settings())
    hit = model.compiled.get(key)
    if hit is None:
        enable_persistent_cache()
        t0 = time.perf_counter()
        jitted = jax.jit(functools.partial(fn, model.graphdef, **static), donate_argnums=donate)
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            hit = jitted.lower(*args).compile()
        model.compiled[key] = hit
        stats = model.compiled.setdefault("_stats", {"compiles": 0, "compile_s": 0.0})
        stats["compiles"] += 1
        stats["compile_s"] += time.perf_counter() - t0
    return hit


def compile_stats(model) -> dict:
    """{"compiles": how many programs this model compiled, "compile_s": seconds spent}."""
    return dict(model.compiled.get("_stats", {"compiles": 0, "compile_s": 0.0}))
