"""Running a model on several devices: the mesh, where each parameter goes, several hosts.

JAX's own SPMD does the work: parameters are placed with `NamedSharding`s by the rules below,
activations and KV caches carry sharding constraints (`nn.partition.constrain`), and XLA inserts
the collectives. Nothing here writes a collective.

Mesh: two axes, `data` (batch) and `model` (tensor parallel), written "data=2,model=4"
(`parse_mesh`); their product is the number of devices (on several hosts: all of them).

Parameter rules (`PARAM_RULES`, by parameter path; the trailing dimensions are named, leading
stacked-layer axes are replicated): attention heads (q/k/v/o and their biases), MLP width and
vocabulary (embedding, LM head) over `model`, in the decoder and in the vision towers alike;
norms, positions and the rest replicated; everything replicated over `data`. A dimension that
does not divide evenly by its axis is replicated (`nn.partition.partition_spec`): kv heads
fewer than the `model` axis are replicated, as Qwen2.5-VL-72B's 8 on model=16.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from ep_jax.errors import InputError
from ep_jax.nn.partition import partition_spec

MESH_AXES = ("data", "model")

# (regex searched in the "/"-joined parameter path, logical names of the trailing dimensions)
PARAM_RULES: tuple[tuple[str, tuple], ...] = (
    # decoder attention [d, n, h] / [n, h, d] and CLIP's (same names under vision/layers/)
    (r"(^|/)q$", (None, "heads", None)),
    (r"(^|/)(k|v)$", (None, "kv_heads", None)),
    (r"(^|/)o$", ("heads", None, None)),
    (r"(^|/)q_bias$", ("heads", None)),
    (r"(^|/)(k|v)_bias$", ("kv_heads", None)),
    # MLPs: SwiGLU (decoder, Qwen vision), CLIP fc1/fc2, LLaVA projector, Qwen patch merger
    (r"(^|/)(gate|up|fc1|proj1|merge1)$", (None, "mlp")),
    (r"(^|/)(gate|up|fc1|proj1|merge1)_bias$", ("mlp",)),
    (r"(^|/)(down|fc2|proj2|merge2)$", ("mlp", None)),
    # vocabulary
    (r"^embed$", ("vocab", None)),
    (r"^lm_head$", (None, "vocab")),
)


# ---------------------------------------------------------------------------- the mesh
def parse_mesh(text: str) -> dict[str, int]:
    """"data=2,model=4" -> {"data": 2, "model": 4}; a missing axis has size 1."""
    sizes = {name: 1 for name in MESH_AXES}
    seen = set()
    for part in str(text).split(","):
        name, eq, value = part.strip().partition("=")
        name = name.strip()
        if not eq or name not in MESH_AXES or name in seen or not value.strip().isdigit() or int(value) < 1:
            raise InputError(f"mesh {text!r}: expected axes like 'data=2,model=4' (axes {', '.join(MESH_AXES)}, "
                             "each once, sizes >= 1)")
        seen.add(name)
        sizes[name] = int(value)
    return sizes


def make_mesh(spec: str | Mapping[str, int] | Mesh, devices=None) -> Mesh:
    """A (data, model) mesh over all devices (of every host); `spec` as `parse_mesh` reads it."""
    if isinstance(spec, Mesh):
        return spec
    sizes = parse_mesh(spec) if isinstance(spec, str) else {**{n: 1 for n in MESH_AXES}, **dict(spec)}
    devices = jax.devices() if devices is None else list(devices)
    shape = tuple(sizes[n] for n in MESH_AXES)
    if int(np.prod(shape)) != len(devices):
        found = ",".join(f"{n}={sizes[n]}" for n in MESH_AXES)
        raise InputError(f"mesh {found} needs {int(np.prod(shape))} devices; there are {len(devices)} "
                         f"({jax.default_backend()})", fix="make data x model equal the number of devices")
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def describe(mesh: Mesh | None) -> str:
    return "one device" if mesh is None else ",".join(f"{n}={s}" for n, s in mesh.shape.items())


# ---------------------------------------------------------------------------- parameters
def param_axes(path: tuple) -> tuple:
    """Logical names of the trailing dimensions of the parameter at `path` (() = replicated)."""
    joined = "/".join(str(p) for p in path)
    for pattern, axes in PARAM_RULES:
        if re.search(pattern, joined):
            return axes
    return ()


def param_spec(path: tuple, shape, mesh: Mesh) -> PartitionSpec:
    axes = param_axes(path)
    if len(axes) > len(shape):  # e.g. a 1-D parameter that shares a name: keep it whole
        axes = ()
    return partition_spec(tuple(shape), axes, dict(mesh.shape))


def param_shardings(tree, mesh: Mesh):
    """NamedSharding of every leaf of a nested parameter dict (arrays or ShapeDtypeStructs)."""
    def one(path, leaf):
        keys = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
        return NamedSharding(mesh, param_spec(keys, np.shape(leaf), mesh))

    return jax.tree_util.tree_map_with_path(one, tree)


def shard_params(params, mesh: Mesh):
    """Parameters placed on the mesh by the rules (leaf by leaf: one extra leaf at a time)."""
    shardings = param_shardings(params, mesh)
    return jax.tree.map(lambda a, s: jax.device_put(a, s), params, shardings)


def shard_model(model, mesh: Mesh | str | Mapping[str, int]):
    """`model` (a runtime.model.Model) with its parameters placed on `mesh`, in place; its
    compiled programs are dropped (they were built for the old placement)."""
    from flax import nnx

    mesh = make_mesh(mesh)
    pure = nnx.to_pure_dict(model.state)
    nnx.replace_by_pure_dict(model.state, shard_params(pure, mesh))
    model.mesh = mesh
    model.compiled.clear()
    return model


def shard_shapes(array: jax.Array) -> set[tuple[int, ...]]:
    """The shapes of an array's per-device pieces (one shape when it splits evenly)."""
    return {tuple(s.data.shape) for s in array.addressable_shards}


# ---------------------------------------------------------------------------- several hosts
def initialize_distributed(env: Mapping[str, str] | None = None, initialize=None) -> bool:
    """`jax.distributed.initialize()` when the environment asks for several processes; call it
    before anything else touches JAX (the CLI does when `--mesh` is given). Returns whether it
    initialised.

    - JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES, JAX_PROCESS_ID: any
      cluster (several GPU hosts);
    - EP_JAX_DISTRIBUTED=1: JAX detects everything itself (a Cloud TPU pod slice, SLURM, Open MPI).
    """
    env = os.environ if env is None else env
    initialize = jax.distributed.initialize if initialize is None else initialize
    address, count, index = (env.get(k) for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"))
    if address or count or index:
        if not (address and count and index):
            raise InputError("several hosts: set all of JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and "
                             f"JAX_PROCESS_ID (got {address!r}, {count!r}, {index!r})")
        if not (count.isdigit() and index.isdigit() and int(index) < int(count)):
            raise InputError(f"JAX_NUM_PROCESSES={count!r}, JAX_PROCESS_ID={index!r}: need integers, "
                             "0 <= process id < number of processes")
        initialize(coordinator_address=address, num_processes=int(count), process_id=int(index))
        return True
    if env.get("EP_JAX_DISTRIBUTED", "").strip().lower() in ("1", "true", "yes"):
        initialize()
        return True
    return False


def mesh_from_flag(text: str | None) -> Mesh | None:
    """What a `--mesh` flag means: None without one; else several hosts are joined first
    (`initialize_distributed`) and the mesh is built over every device."""
    if text is None:
        return None
    parse_mesh(text)  # a bad flag is refused before anything starts
    if not jax.distributed.is_initialized():
        initialize_distributed()
    return make_mesh(text)




def placement(model) -> dict[str, Any]:
    """A short report of where a model sits: mesh, devices, per-device parameter bytes."""
    leaves = jax.tree.leaves(model.state)
    per_device = sum(next(iter(s.data.nbytes for s in a.addressable_shards)) for a in leaves)
    mesh = getattr(model, "mesh", None)
    return {"mesh": describe(mesh), "devices": 1 if mesh is None else mesh.size,
            "param_bytes_per_device": int(per_device)}
