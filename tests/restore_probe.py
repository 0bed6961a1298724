"""Peak host memory of restoring an ep_jax checkpoint, on one device or into shards over a mesh.
Used by test_mesh.py; each step runs in its own process (a clean baseline):

    python tests/restore_probe.py write DIR          # a random ~260 MiB LLaVA checkpoint
    python tests/restore_probe.py load DIR [MESH]    # prints "PROBE {json}"
    python tests/restore_probe.py naive DIR MESH     # one-device restore, then placed on the mesh

On CPU every device's memory is this process's memory, so the shards of all 8 devices together
are one model; a restore that first built the whole array would hold another copy on top.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from memprobe import PeakSampler, anon_rss_mib, probe_hf_config


def write(dst: Path) -> None:
    import jax
    from flax import nnx

    from ep_jax import checkpoint
    from ep_jax.config import LlavaConfig
    from ep_jax.families import get as get_family
    from ep_jax.runtime.model import abstract_model

    hf_config = probe_hf_config()
    cfg = LlavaConfig.from_hf_dict(hf_config)
    _, state = abstract_model(get_family("llava"), cfg, np.float32)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: 0.02 * rng.standard_normal(a.shape, np.float32), nnx.to_pure_dict(state))
    checkpoint.save(cfg, params, dst, hf_config=hf_config, family="llava")


def load(path: Path, mesh: str | None, naive: bool = False) -> dict:
    import jax
    from flax import nnx

    import ep_jax
    import orbax.checkpoint  # noqa: F401  (imported before the baseline)
    from ep_jax.runtime import sharding

    mesh_obj = sharding.make_mesh(mesh) if mesh else None
    jax.block_until_ready([jax.device_put(np.zeros(1), d) for d in jax.devices()])
    base = anon_rss_mib()
    sampler = PeakSampler()
    if naive:  # what the sharded restore avoids: the whole model on one device first
        model = sharding.shard_model(ep_jax.load(path, layout="stacked"), mesh_obj)
    else:
        model = ep_jax.load(path, mesh=mesh_obj, layout="stacked")
    jax.block_until_ready(jax.tree.leaves(model.state))
    peak = sampler.stop()
    leaves = jax.tree.leaves(nnx.to_pure_dict(model.state))
    total = sum(a.nbytes for a in leaves)
    split = sum(a.nbytes for a in leaves if len({s.data.shape for s in a.addressable_shards} - {a.shape}) > 0)
    shard_bytes = [next(iter(a.addressable_shards)).data.nbytes for a in leaves]
    return {"model_mib": total / 2**20, "peak_mib": peak - base, "split_fraction": split / total,
            "max_shard_mib": max(shard_bytes) / 2**20, "largest_param_mib": max(a.nbytes for a in leaves) / 2**20,
            "devices": len(model.state["embed"][...].sharding.device_set)}


if __name__ == "__main__":
    if sys.argv[1] == "write":
        write(Path(sys.argv[2]))
        print("PROBE {}")
    else:
        mesh = sys.argv[3] if len(sys.argv) > 3 else None
        print("PROBE " + json.dumps(load(Path(sys.argv[2]), mesh, naive=sys.argv[1] == "naive")))
