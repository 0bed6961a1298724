"""Several devices: sharded weights, KV cache and pruning on a JAX mesh.

The mesh checks need 8 devices, which on CPU means XLA_FLAGS=--xla_force_host_platform_device_count=8
before jax is imported, while the rest of the suite runs on one device in this process: they run
in subprocesses (`mesh_worker.py`, `restore_probe.py`) and the tests assert on their JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ep_jax
from ep_jax.errors import InputError
from ep_jax.nn import attention
from ep_jax.nn.layers import attend, attend_causal
from ep_jax.nn.partition import partition_spec
from ep_jax.runtime import sharding

HERE = Path(__file__).parent
EIGHT = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
         "EP_JAX_COMPILATION_CACHE": "off", "HF_HUB_OFFLINE": "1"}


def _subprocess(args: list[str], tag: str, timeout: int = 300) -> dict:
    env = {**os.environ, **EIGHT, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(tag + " ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(lines[-1][len(tag) + 1:])


# ---------------------------------------------------------------------- all families on 8 devices
@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_5_vl"])
def test_meshes_match_one_device_and_transformers(family, tmp_path):
    import mesh_worker

    directory, torch_model = mesh_worker.build(family, tmp_path)
    out = tmp_path / "single.npz"
    report = _subprocess([str(HERE / "mesh_worker.py"), family, str(directory), str(out)], "MESH-REPORT")
    assert report["devices"] == 8

    # the one-device run the meshes are compared with matches transformers
    saved = dict(np.load(out))
    valid = saved["attention_mask"].astype(bool)
    want = mesh_worker.torch_logits(torch_model, saved)
    assert np.abs(saved["logits"][valid] - want[valid]).max() <= 1e-4
    assert report["kept_tokens"] < report["real_tokens"] and report["new_tokens"] > 8

    for mesh, got in report["meshes"].items():
        assert got["full"] <= 1e-4 and got["pruned"] <= 1e-4, (mesh, got)
        assert got["kept_equal"] and got["tokens_equal"], mesh
        _check_shards(mesh, got["shards"])
    assert report["meshes"]["data=2,model=4"]["compiles"][0] > 0
    assert report["meshes"]["data=2,model=4"]["compiles"][1] == report["meshes"]["data=2,model=4"]["compiles"][0]


def _check_shards(mesh: str, shards: dict) -> None:
    """Each device holds its share: the split dimension divided by the axis size, or the whole
    array where the dimension does not divide (replicated)."""
    sizes = sharding.parse_mesh(mesh)
    model, data = sizes["model"], sizes["data"]
    split_dim = {"q": 2, "k": 2, "o": 1, "gate": 2, "down": 1, "embed": 0, "lm_head": 1}
    for name, dim in split_dim.items():
        full, (shard,) = shards[name]["full"], shards[name]["shards"]
        want = list(full)
        if model > 1 and full[dim] % model == 0:
            want[dim] = full[dim] // model
        assert shard == want, (mesh, name, full, shard)
    assert shards["gate"]["shards"][0][2] == shards["gate"]["full"][2] // model  # MLP width always splits
    for segment in ("cache0", "cache1"):  # [l, b, c, k, h]: examples over data, kv heads over model
        full, (shard,) = shards[segment]["full"], shards[segment]["shards"]
        kv = full[3] // model if full[3] % model == 0 else full[3]
        assert shard == [full[0], full[1] // data, full[2], kv, full[4]], (mesh, segment, full, shard)


# ---------------------------------------------------------------------- sharded restore memory
def test_sharded_restore_holds_no_unsharded_copy(tmp_path):
    """Restoring a ~255 MiB checkpoint into shards over 8 devices (model=8) peaks like the
    one-device restore (the shards together are one model: every large weight splits 8 ways),
    far below restoring on one device and then placing it (a whole copy on top of the shards)."""
    ckpt = str(tmp_path / "ckpt")
    _subprocess([str(HERE / "restore_probe.py"), "write", ckpt], "PROBE")
    single = _subprocess([str(HERE / "restore_probe.py"), "load", ckpt], "PROBE")
    sharded = _subprocess([str(HERE / "restore_probe.py"), "load", ckpt, "data=1,model=8"], "PROBE")
    naive = _subprocess([str(HERE / "restore_probe.py"), "naive", ckpt, "data=1,model=8"], "PROBE")
    size = sharded["model_mib"]
    assert 200 < size < 400 and sharded["devices"] == 8
    assert sharded["split_fraction"] > 0.95  # the parameter bytes that really split
    assert sharded["max_shard_mib"] <= sharded["largest_param_mib"] / 8
    assert sharded["peak_mib"] < 1.6 * size, sharded
    assert sharded["peak_mib"] < single["peak_mib"] + 0.1 * size, (sharded, single)
    assert naive["peak_mib"] > sharded["peak_mib"] + 0.7 * size, (naive, sharded)  # the probe sees a copy


# ---------------------------------------------------------------------- rules and flags
def test_parse_mesh_and_errors():
    assert sharding.parse_mesh("data=2,model=4") == {"data": 2, "model": 4}
    assert sharding.parse_mesh("model=8") == {"data": 1, "model": 8}
    for bad in ("data=2,data=2", "pipe=2", "model=0", "model", "data=x"):
        with pytest.raises(InputError, match="mesh"):
            sharding.parse_mesh(bad)
    with pytest.raises(InputError, match="needs 8 devices; there are 1"):
        sharding.make_mesh("data=2,model=4")


def test_parameter_rules_split_heads_mlp_and_vocabulary():
    mesh = {"data": 2, "model": 4}
    spec = lambda path, shape: tuple(partition_spec(shape, sharding.param_axes(path), mesh))  # noqa: E731
    assert spec(("layers", "attn", "q"), (32, 4096, 32, 128)) == (None, None, "model", None)
    assert spec(("layers", "attn", "k"), (32, 4096, 8, 128)) == (None, None, "model", None)
    assert spec(("layers", "attn", "k"), (32, 4096, 2, 128)) == (None, None, None, None)  # 2 kv heads: replicated
    assert spec(("layers", "attn", "o"), (32, 32, 128, 4096)) == (None, "model", None, None)
    assert spec(("layers", "mlp", "down"), (32, 11008, 4096)) == (None, "model", None)
    assert spec(("layers", 3, "mlp", "gate"), (4096, 11008)) == (None, "model")  # per-layer layout
    assert spec(("embed",), (32064, 4096)) == ("model", None)
    assert spec(("lm_head",), (4096, 32064)) == (None, "model")
    assert spec(("vision", "layers", "fc1"), (24, 1024, 4096)) == (None, None, "model")
    assert spec(("vision", "blocks", "mlp", "up"), (32, 1280, 3420)) == (None, None, "model")
    assert spec(("layers", "input_norm", "scale"), (32, 4096)) == (None, None)
    assert spec(("vision", "blocks", "qkv"), (32, 1280, 3840)) == (None, None, None)  # fused: replicated
    ex = partition_spec((8, 16, 4, 8), ("examples", None, None, None), {"data": 1, "model": 8})
    assert tuple(ex) == (("data", "model"), None, None, None)
    ex = partition_spec((2, 16, 4, 8), ("examples", None, None, None), {"data": 2, "model": 4})
    assert tuple(ex) == ("data", None, None, None)  # 2 examples: over data only


def test_distributed_initialisation_from_the_environment():
    calls = []
    record = lambda **kw: calls.append(kw)  # noqa: E731
    assert not sharding.initialize_distributed({}, record)
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"}
    assert sharding.initialize_distributed(env, record)
    assert calls[-1] == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2}
    assert sharding.initialize_distributed({"EP_JAX_DISTRIBUTED": "1"}, record) and calls[-1] == {}
    with pytest.raises(InputError, match="JAX_PROCESS_ID"):
        sharding.initialize_distributed({"JAX_COORDINATOR_ADDRESS": "h:1"}, record)
    with pytest.raises(InputError, match="0 <= process id"):
        sharding.initialize_distributed({**env, "JAX_PROCESS_ID": "4"}, record)


# ---------------------------------------------------------------------- attention dispatch
def _qkv(b, t, s, n, k, h, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for shape in ((b, t, n, h), (b, s, k, h), (b, s, k, h))]


def _causal(valid):
    rows = np.arange(valid.shape[1])
    return (rows[None, None, :] <= rows[None, :, None]) & valid[:, None, :]


@pytest.mark.parametrize("kv_heads", [8, 2])
def test_xla_attention_matches_the_cpu_path(kv_heads):
    """jax.nn.dot_product_attention (the implementation cuDNN shares its semantics with) equals
    `layers.attend` / `attend_causal`: grouped kv heads, left padding (fully masked rows), a
    causal prompt longer than one query block, and a decode step over a cache."""
    q, k, v = _qkv(2, 200, 200, 8, kv_heads, 16)
    valid = np.ones((2, 200), bool)
    valid[1, :37] = False
    mask = _causal(valid)
    want = np.asarray(attend_causal(q, k, v, mask))
    previous = attention.set_implementation("xla")
    try:
        got = np.asarray(attention.attention(q, k, v, mask, causal=True))
        q1 = q[:, -1:]
        step = np.asarray(attention.attention(q1, k, v, valid[:, None, :]))
    finally:
        attention.set_implementation(previous)
    # Rows of padding queries (every key masked) hold different finite values: no real row reads them.
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got[valid], want[valid], atol=2e-6, rtol=0)
    np.testing.assert_allclose(step, np.asarray(attend(q1, k, v, valid[:, None, :])), atol=2e-6, rtol=0)
    assert np.abs(want).max() > 0.1


def test_attention_choice_and_errors(monkeypatch):
    q, k, _ = _qkv(1, 4, 4, 4, 2, 16)
    assert attention.choose(q, k, causal=True) == "einsum"  # CPU: the measured path
    monkeypatch.setenv("EP_JAX_ATTENTION", "xla")
    assert attention.choose(q, k, causal=True) == "xla"
    monkeypatch.setenv("EP_JAX_ATTENTION", "cudnn")
    with pytest.raises(ValueError, match="float16/bfloat16"):
        attention.choose(q, k, causal=True)
    monkeypatch.setenv("EP_JAX_ATTENTION", "splash")
    with pytest.raises(ValueError, match="multiple of 128"):
        attention.choose(q, k, causal=True)
    monkeypatch.setenv("EP_JAX_ATTENTION", "flash")
    with pytest.raises(ValueError, match="choose one of"):
        attention.implementation()
    big = np.zeros((1, 256, 4, 128), np.float16)
    assert attention.cudnn_fits(big, big[:, :, :2]) and attention.splash_fits(big, big[:, :, :2], True)
    assert not attention.splash_fits(big, big[:, :, :2], False)


def test_splash_attention_matches_the_cpu_path_in_interpret_mode():
    """The TPU kernel's wrapper (GQA over the MQA kernel, padding as segment ids, scaling) run by
    the Pallas interpreter on CPU against `attend_causal`."""
    q, k, v = _qkv(2, 256, 256, 4, 2, 128, seed=1)
    valid = np.ones((2, 256), bool)
    valid[0, :100] = False
    mask = _causal(valid)
    got = np.asarray(attention.splash(q, k, v, mask, interpret=True))
    want = np.asarray(attend_causal(q, k, v, mask))
    np.testing.assert_allclose(got[valid], want[valid], atol=2e-5, rtol=0)


def test_one_device_model_has_no_mesh():
    model = ep_jax.load()
    assert model.mesh is None and sharding.placement(model)["devices"] == 1


def test_mesh_flag_is_checked_before_anything_loads(tmp_path, capsys):
    from ep_jax.cli import ecl

    image = str(Path(__file__).parent.parent / "examples" / "scene_count_0007.png")
    assert ecl.main(["--image", image, "--mesh", "pipe=2", "--out", str(tmp_path / "a")]) == 2
    assert "mesh 'pipe=2'" in capsys.readouterr().err
    assert ecl.main(["--image", image, "--mesh", "data=2,model=4", "--out", str(tmp_path / "b")]) == 2
    assert "needs 8 devices; there are 1" in capsys.readouterr().err
