"""A loaded model: family, config, the NNX graph definition and its parameter state, the
processor, the preset and the compiled-function cache; and the decoder weight layouts.

Layouts (how the decoder weights sit in memory; checkpoints always store them stacked):
  stacked    one array per weight, leading layer axis; the layers run under `lax.scan`, so
             compile time does not depend on depth. XLA:CPU copies each layer's slice before
             its matmuls read it (`benchmarks/decode_hlo.py`): decode, which reads every weight
             once per token, pays that copy on every step.
  per_layer  one buffer per layer and weight; the layer loop is unrolled in the graph, every
             matmul reads its weights in place; compile time grows with depth.
  auto       per_layer on CPU when one decoder layer holds at least PER_LAYER_MIN_BYTES of
             weights (there the copies dominate decode: the 1b bench config, 49 MiB a layer,
             decodes ~2x faster per_layer, `benchmarks/decode_layout.py`; small layers such as
             the shipped model's 0.8 MiB ones gain nothing and only compile slower), else
             stacked (GPU/TPU: the copy is an XLA:CPU behaviour; not measured on a GPU).
             On a device mesh (`mesh=`), auto is stacked: the per-layer gain is measured on one
             CPU device only.

A model placed on a mesh (`runtime.sharding`) keeps it in `Model.mesh`; its parameters are
sharded arrays and the engine compiles its programs under that mesh.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ep_jax.errors import InputError

LAYOUTS = ("auto", "stacked", "per_layer")
PER_LAYER_MIN_BYTES = 4 << 20
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass
class Model:
    """A loaded model. `family` is a `families.base.Family`; `compiled` caches compiled
    functions per static setting (`runtime.engine`)."""

    family: Any
    config: Any
    graphdef: Any
    state: Any
    path: Path | None = None
    preset: Any = None
    _processor: Any = None
    mesh: Any = None  # a jax.sharding.Mesh when the parameters are sharded (runtime.sharding)
    compiled: dict = dataclasses.field(default_factory=dict)

    @property
    def module(self):
        return nnx.merge(self.graphdef, self.state)

    @property
    def dtype(self):
        return self.state["embed"][...].dtype

    @property
    def processor(self):
        if self._processor is None:
            if self.path is None:
                raise InputError("this model was built in memory and has no tokenizer/processor files")
            self._processor = self.family.processor(self.path, self.config)
        return self._processor

    @property
    def layout(self) -> str:
        return "per_layer" if 0 in self.state["layers"] else "stacked"  # nnx.List: keys 0..l-1

    def params(self) -> dict:
        """Parameters as a nested dict of arrays, decoder weights stacked (the checkpoint layout)."""
        params = nnx.to_pure_dict(self.state)
        if self.layout == "per_layer":
            per = params["layers"]
            params["layers"] = jax.tree.map(lambda *a: jnp.stack(a), *(per[i] for i in range(len(per))))
        return params


def dtype_of(name: str | None, default):
    if name is None:
        return default
    try:
        return DTYPES[name]
    except KeyError:
        raise InputError(f"dtype {name!r} is not supported; choose one of {sorted(DTYPES)}") from None


def resolve_layout(layout: str, family, cfg, dtype, mesh=None) -> str:
    """"auto" -> the layout that suits this backend and model (see the module docstring)."""
    if layout not in LAYOUTS:
        raise InputError(f"layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    if layout == "auto" and mesh is not None:
        return "stacked"
    if layout == "auto":
        big = family.decoder_layer_bytes(cfg, dtype) >= PER_LAYER_MIN_BYTES
        return "per_layer" if big and jax.default_backend() == "cpu" else "stacked"
    return layout


def abstract_model(family, cfg, dtype, layout: str = "stacked") -> tuple[Any, Any]:
    """(graphdef, abstract state) without allocating any parameter."""
    abstract = nnx.eval_shape(lambda: family.module(cfg, dtype=dtype, rngs=nnx.Rngs(0), layout=layout))
    return nnx.split(abstract)


def init_model(family, cfg, dtype=jnp.float32, seed: int = 0) -> Model:
    """A randomly initialised model (benchmarks, training), stacked layout."""
    graphdef, state = nnx.split(family.module(cfg, dtype=dtype, rngs=nnx.Rngs(seed)))
    return Model(family, cfg, graphdef, state)


def from_params(family, cfg, params: dict, dtype, path: Path | None = None, layout: str = "auto",
                mesh=None) -> Model:
    """A Model from checkpoint-layout parameters (decoder weights stacked); `params` is consumed
    when the layout is per_layer. With a `mesh`, each parameter is placed on it by the rules of
    `runtime.sharding` (already sharded arrays, as a sharded restore gives, stay where they are)."""
    layout = resolve_layout(layout, family, cfg, dtype, mesh)
    if layout == "per_layer":
        params = {**params, "layers": _unstack(params["layers"], cfg.text.num_layers)}
    graphdef, state = abstract_model(family, cfg, dtype, layout)
    if mesh is not None:
        from ep_jax.runtime.sharding import shard_params

        params = shard_params(params, mesh)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return Model(family, cfg, graphdef, state, path=path, mesh=mesh)


def with_layout(model: Model, layout: str) -> Model:
    """The same weights in another layout (a new Model; the stacked arrays are split or joined)."""
    layout = resolve_layout(layout, model.family, model.config, model.dtype, model.mesh)
    if layout == model.layout:
        return model
    moved = from_params(model.family, model.config, model.params(), model.dtype, model.path, layout, model.mesh)
    return dataclasses.replace(model, graphdef=moved.graphdef, state=moved.state, compiled={})


def leaf_paths(tree: dict, prefix: tuple = ()):
    """Key paths of every leaf, e.g. ("layers", "attn", "q")."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from leaf_paths(value, (*prefix, key))
        else:
            yield (*prefix, key)


def get_path(tree: dict, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _unstack(stacked: dict, num_layers: int) -> dict:
    """Stacked decoder weights {name: [l, ...]} -> {i: {name: [...]}}, leaf by leaf: each stacked
    array is dropped from `stacked` once split, so memory holds one extra weight at a time."""
    per: dict = {i: {} for i in range(num_layers)}
    for keys in list(leaf_paths(stacked)):
        whole = get_path(stacked, keys)
        set_path(stacked, keys, None)
        for i in range(num_layers):
            set_path(per[i], keys, jnp.array(whole[i]))
        del whole
    return per
