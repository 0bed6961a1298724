"""Checkpoint safety: destinations written atomically (refusals, --overwrite, Ctrl-C, full disk),
finite weights, damaged parameter files, malformed configs, format-2 checkpoints, error types."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import ep_jax
from ep_jax import checkpoint as ckpt
from ep_jax.files import TEST_DELAY_ENV
from ep_jax import hf
from ep_jax.errors import (BudgetError, CheckpointError, ConfigError, EpJaxError, InputError, OutputPathError,
                           ProcessingError)

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "models" / "scenes-llava-tiny"
UP = "language_model.model.layers.1.mlp.up_proj.weight"
UNREADABLE = r"cannot be read: the files are truncated or corrupt.*; convert again"


def _run(*args, env=None):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=ROOT, env=env)


def _snapshot(d: Path) -> dict:
    """Every file under d with its bytes: what must survive a refused or failed write."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def _error_line(stderr: str) -> str:
    """The one line a script prints for an error; progress lines may precede it, nothing follows."""
    lines = [l for l in stderr.splitlines() if l.strip() and not l.startswith("  ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.fixture(scope="module")
def ep_dir(tiny_dirs, tmp_path_factory):
    """A converted tiny checkpoint (format 3), float32."""
    return ep_jax.convert_hf(tiny_dirs("mha")[0], tmp_path_factory.mktemp("conv") / "ep", progress=False)


@pytest.fixture
def no_reads(monkeypatch):
    """Record every tensor read (HF shards) and checkpoint load: a refusal must come first."""
    reads = []
    real_iter, real_load = hf.iter_hf_tensors, ckpt.load

    def iter_hf_tensors(src, *args, **kwargs):
        reads.append(src)
        return real_iter(src, *args, **kwargs)

    def load(*a, **k):
        reads.append(a[0])
        return real_load(*a, **k)

    monkeypatch.setattr(hf, "iter_hf_tensors", iter_hf_tensors)
    monkeypatch.setattr(ckpt, "load", load)
    return reads


# ------------------------------------------------------------------------------ error types
def test_error_types_are_shared():
    from ep_jax import hf as hf_mod

    assert hf_mod.CheckpointError is CheckpointError
    assert issubclass(ConfigError, CheckpointError) and issubclass(CheckpointError, ValueError)
    assert issubclass(InputError, ValueError) and issubclass(BudgetError, InputError)
    assert issubclass(ProcessingError, InputError) and issubclass(OutputPathError, OSError)
    for cls in (InputError, CheckpointError, ConfigError, BudgetError, OutputPathError, ProcessingError):
        assert issubclass(cls, EpJaxError)
    e = OutputPathError("out exists", fix="pass --overwrite")
    assert str(e) == "out exists; pass --overwrite" and e.fix == "pass --overwrite"
    assert str(CheckpointError("plain")) == "plain" and CheckpointError("plain").fix is None


# ------------------------------------------------------------------------------ destinations
def test_existing_dst_is_refused_and_kept(tiny_dirs, ep_dir, tmp_path, no_reads):
    src = tiny_dirs("mha")[0]
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "mine.txt").write_text("keep me")
    before = _snapshot(dst)
    with pytest.raises(OutputPathError, match=rf"{dst} already exists and is not empty; pass --overwrite "
                                               r"\(overwrite=True\)"):
        ep_jax.convert_hf(src, dst, progress=False)
    with pytest.raises(OutputPathError, match="pass --overwrite"):
        ep_jax.export_hf(ep_dir, dst)
    cfg, _ = hf.read_config(src / "config.json")
    with pytest.raises(OutputPathError, match="already exists"):
        ckpt.save(cfg, {}, dst)
    assert no_reads == []
    r = _run("convert/hf_to_ep.py", src, dst)
    assert r.returncode == 2 and _error_line(r.stderr).startswith(f"error: {dst} already exists")
    assert "--overwrite" in r.stderr
    r = _run("convert/ep_to_hf.py", ep_dir, dst)
    assert r.returncode == 2 and "pass --overwrite" in _error_line(r.stderr)
    assert _snapshot(dst) == before and _leftovers(tmp_path) == []
    # an empty folder is no previous output: written without --overwrite
    (tmp_path / "empty").mkdir()
    ep_jax.convert_hf(src, tmp_path / "empty", progress=False)
    assert (tmp_path / "empty" / "ep_config.json").is_file()


def test_overwrite_replaces_the_whole_folder(tiny_dirs, tmp_path):
    a = shutil.copytree(tiny_dirs("mha")[0], tmp_path / "a")
    shutil.copy(SHIPPED / "preprocessor_config.json", a / "preprocessor_config.json")
    b = tiny_dirs("gqa")[0]  # another model: tied embeddings, no preprocessor_config.json
    dst = tmp_path / "ep"
    ep_jax.convert_hf(a, dst, progress=False)
    (dst / "notes.txt").write_text("stale")
    assert (dst / "preprocessor_config.json").is_file()
    with pytest.raises(OutputPathError):
        ep_jax.convert_hf(b, dst, progress=False)
    r = _run("convert/hf_to_ep.py", b, dst, "--overwrite", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    fresh = ep_jax.convert_hf(b, tmp_path / "fresh", progress=False)
    assert sorted(p.name for p in dst.iterdir()) == sorted(p.name for p in fresh.iterdir())
    assert not (dst / "preprocessor_config.json").exists() and not (dst / "notes.txt").exists()
    assert ep_jax.load(dst).config == ep_jax.load(fresh).config
    assert _leftovers(tmp_path) == []

    # export: a re-export with fewer shards leaves no shard of the previous one
    hf_out = ep_jax.export_hf(ep_jax.load(a), tmp_path / "hf", max_shard_bytes=100_000)
    assert len(list(hf_out.glob("*.safetensors"))) > 2
    r = _run("convert/ep_to_hf.py", dst, hf_out, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in hf_out.glob("*.safetensors")) == ["model-00001-of-00001.safetensors"]
    index = json.loads((hf_out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00001.safetensors"}
    assert not (hf_out / "preprocessor_config.json").exists()
    assert _leftovers(tmp_path) == []


def test_save_over_its_own_folder_keeps_named_files(tmp_path):
    """The training recipe's case: models/<name>/ holds the tokenizer it was trained with (src ==
    dst) and a preset.json to keep; anything else of the old folder goes."""
    import jax

    model = ep_jax.load(SHIPPED, layout="stacked")
    d = tmp_path / "trained"
    d.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "preset.json"):
        shutil.copy(SHIPPED / name, d / name)
    (d / "stale.txt").write_text("old run")
    with pytest.raises(OutputPathError, match="already exists"):
        ckpt.save(model.config, model.params(), d, src=d)
    ckpt.save(model.config, model.params(), d, src=d, hf_config=model.config.to_hf_dict(), overwrite=True,
              keep=("preset.json",))
    assert sorted(p.name for p in d.iterdir()) == sorted(
        ["config.json", "ep_config.json", "params", "preprocessor_config.json", "preset.json", "tokenizer.json",
         "tokenizer_config.json"])
    assert (d / "preset.json").read_bytes() == (SHIPPED / "preset.json").read_bytes()
    again = ep_jax.load(d, layout="stacked")
    for x, y in zip(jax.tree.leaves(model.params()), jax.tree.leaves(again.params())):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert again.processor.image_token_id == model.processor.image_token_id
    assert _leftovers(tmp_path) == []


def test_bad_destinations_are_refused_before_reading(tiny_dirs, ep_dir, tmp_path, monkeypatch, no_reads):
    src = tiny_dirs("mha")[0]
    f = tmp_path / "file.bin"
    f.write_bytes(b"precious")
    with pytest.raises(OutputPathError, match=rf"{f} is a file, not a directory"):
        ep_jax.convert_hf(src, f, progress=False, overwrite=True)
    with pytest.raises(OutputPathError, match=rf"cannot be created: {f} is a file"):
        ep_jax.convert_hf(src, f / "sub" / "out", progress=False)
    with pytest.raises(OutputPathError, match="is a file"):
        ep_jax.export_hf(ep_dir, f, overwrite=True)
    ro = tmp_path / "readonly"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: report the mode bits as a normal user sees them
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **k: Path(p) != ro and real_access(p, mode, **k))
    try:
        with pytest.raises(OutputPathError, match=rf"no write permission in {ro}"):
            ep_jax.convert_hf(src, ro / "out", progress=False)
        with pytest.raises(OutputPathError, match="no write permission"):
            ep_jax.export_hf(ep_dir, ro / "hf")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)
    # a folder holding the source would delete it
    with pytest.raises(OutputPathError, match="holds the source"):
        ep_jax.convert_hf(src, src.parent, progress=False, overwrite=True)
    assert no_reads == [] and f.read_bytes() == b"precious"
    r = _run("convert/hf_to_ep.py", src, f)
    assert r.returncode == 2 and _error_line(r.stderr) == f"error: {f} is a file, not a directory; choose " \
                                                          "another DST (the file was left as it is)"


def test_sigint_during_conversion_leaves_previous_dst(tiny_dirs, tmp_path):
    """A real Ctrl-C (SIGINT) to the script, once the new checkpoint is complete in its temporary
    folder but not yet in place (held there by a test-only delay): exit 130, one line, no
    temporary folder, the previous checkpoint untouched."""
    src = tiny_dirs("mha")[0]
    dst = ep_jax.convert_hf(tiny_dirs("gqa")[0], tmp_path / "ep", progress=False)
    before = _snapshot(dst)
    env = {**os.environ, TEST_DELAY_ENV: "120"}
    proc = subprocess.Popen([sys.executable, "convert/hf_to_ep.py", str(src), str(dst), "--overwrite",
                             "--dtype", "float32"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    tmp = tmp_path / f".ep.tmp-{proc.pid}"
    deadline = time.time() + 120
    try:
        while not (tmp / "config.json").is_file():
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "the conversion did not reach its temporary folder"
            time.sleep(0.05)
        assert (tmp / "params").is_dir()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert _error_line(err) == f"interrupted: {dst} was left as it was"
    assert "  writing" in err and out == ""
    assert _leftovers(tmp_path) == []
    assert _snapshot(dst) == before


def test_interrupt_or_full_disk_while_writing(tiny_dirs, tmp_path, monkeypatch):
    src = tiny_dirs("mha")[0]
    dst = ep_jax.convert_hf(tiny_dirs("gqa")[0], tmp_path / "ep", progress=False)
    before = _snapshot(dst)
    real_save = ckpt._save_params

    def interrupted(params, path, **kw):
        real_save(params, path, **kw)  # the parameters are on disk, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "_save_params", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ep_jax.convert_hf(src, dst, progress=False, overwrite=True)
    assert _snapshot(dst) == before and _leftovers(tmp_path) == []

    def disk_full(params, path, **kw):
        path.mkdir()
        (path / "part").write_bytes(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device", str(path / "part"))

    monkeypatch.setattr(ckpt, "_save_params", disk_full)
    with pytest.raises(OutputPathError, match=rf"writing {dst} failed: No space left on device.*was left as it was"):
        ep_jax.convert_hf(src, dst, progress=False, overwrite=True)
    assert _snapshot(dst) == before and _leftovers(tmp_path) == []
    # Ctrl-C while reading: the temporary folder exists already, and goes
    monkeypatch.setattr(ckpt, "_save_params", real_save)

    def reading(*a, **k):
        assert _leftovers(tmp_path), "the temporary folder is made before reading"
        raise KeyboardInterrupt

    monkeypatch.setattr(hf, "read_hf_weights", reading)
    with pytest.raises(KeyboardInterrupt):
        ep_jax.convert_hf(src, tmp_path / "new", progress=False)
    assert not (tmp_path / "new").exists() and _leftovers(tmp_path) == []


# ------------------------------------------------------------------------------ finite weights
def _edit_tensor(d: Path, name: str, edit) -> None:
    from safetensors.numpy import load_file, save_file

    shard = d / json.loads((d / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(str(shard))
    edit(tensors[name])
    save_file(tensors, str(shard))


def test_nan_and_inf_weights_are_named(tiny_dirs, tmp_path):
    d = shutil.copytree(tiny_dirs("mha")[0], tmp_path / "nan")

    def three_nans(a):
        a[0, :3] = np.nan

    _edit_tensor(d, UP, three_nans)
    msg = rf"tensor {UP} of checkpoint {d} holds 3 NaN values \(of 8192\)"
    with pytest.raises(CheckpointError, match=msg):
        ep_jax.load(d)
    with pytest.raises(CheckpointError, match=msg):
        ep_jax.convert_hf(d, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
    r = _run("convert/hf_to_ep.py", d, tmp_path / "out")
    assert r.returncode == 2 and UP in _error_line(r.stderr) and "3 NaN values" in r.stderr

    def one_inf(a):
        a[0, :3] = 0
        a[1, 5] = -np.inf

    _edit_tensor(d, UP, one_inf)
    with pytest.raises(CheckpointError, match=rf"tensor {UP} of checkpoint .* holds 1 inf value \(of 8192\)"):
        ep_jax.load(d)


def test_saving_non_finite_weights_is_refused(ep_dir, tmp_path):
    model = ep_jax.load(ep_dir, layout="stacked")
    params = model.params()
    params["layers"]["mlp"]["up"] = params["layers"]["mlp"]["up"].at[1, 2, 3].set(np.nan)
    with pytest.raises(CheckpointError, match=r"tensor layers.mlp.up of checkpoint .*out holds 1 NaN value"):
        ckpt.save(model.config, params, tmp_path / "out")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


# ------------------------------------------------------------------------------ damaged files
def _largest(params_dir: Path) -> Path:
    return max((p for p in params_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _damage(ep_dir: Path, tmp_path: Path, name: str, how) -> Path:
    d = shutil.copytree(ep_dir, tmp_path / name)
    how(_largest(d / "params"))
    return d


def test_truncated_scrambled_or_missing_parameter_files(ep_dir, tmp_path):
    rng = np.random.default_rng(0)

    def truncate(f):
        f.write_bytes(f.read_bytes()[:1000])

    def scramble(f):  # random bytes in the middle of the values: only the saved sums notice
        b = bytearray(f.read_bytes())
        b[len(b) // 3: len(b) // 3 + 64] = rng.bytes(64)
        f.write_bytes(bytes(b))

    def scramble_all(f):
        f.write_bytes(rng.bytes(f.stat().st_size))

    for name, how in (("truncated", truncate), ("scrambled", scramble), ("garbage", scramble_all),
                      ("missing", Path.unlink)):
        d = _damage(ep_dir, tmp_path, name, how)
        with pytest.raises(CheckpointError, match=rf"parameter\(s\) .*of checkpoint {d} {UNREADABLE}"):
            ep_jax.load(d)
    d = shutil.copytree(ep_dir, tmp_path / "metadata")
    (d / "params" / "_METADATA").write_text("{")
    with pytest.raises(CheckpointError, match=UNREADABLE):
        ep_jax.load(d)
    d = shutil.copytree(ep_dir, tmp_path / "no_params")
    shutil.rmtree(d / "params")
    with pytest.raises(CheckpointError, match=f"checkpoint {d} has no params/ folder; convert again"):
        ep_jax.load(d)
    # the scripts: one line, exit 2, nothing written
    d = tmp_path / "truncated"
    r = _run("convert/ep_to_hf.py", d, tmp_path / "hf")
    assert r.returncode == 2, r.stderr
    assert _error_line(r.stderr).startswith("error: parameter(s) ") and "truncated or corrupt" in r.stderr
    assert not (tmp_path / "hf").exists() and _leftovers(tmp_path) == []


def test_corrupt_safetensors_shards(tiny_dirs, tmp_path):
    src = tiny_dirs("mha")[0]
    d = shutil.copytree(src, tmp_path / "tail")
    shard = d / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])  # header intact, data cut short
    with pytest.raises(CheckpointError, match="cannot read shard .*model-00002-of-00002.safetensors"):
        ep_jax.load(d)
    d = shutil.copytree(src, tmp_path / "garbage")
    shard = d / "model-00001-of-00002.safetensors"
    shard.write_bytes(np.random.default_rng(1).bytes(shard.stat().st_size))
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors"):
        ep_jax.convert_hf(d, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


# ------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("field,edit", [
    ("text_config.num_attention_heads", lambda c: c["text_config"].update(num_attention_heads="eight")),
    ("vision_config", lambda c: c.update(vision_config=[1, 2])),
    ("text_config.rope_scaling.factor", lambda c: c["text_config"].update(rope_scaling={"rope_type": "linear"})),
    ("text_config.eos_token_id", lambda c: c["text_config"].update(eos_token_id="</s>")),
    ("vision_config.image_size", lambda c: c["vision_config"].update(image_size=0)),
    ("vision_feature_layer", lambda c: c.update(vision_feature_layer=[-2, -1])),
])
def test_malformed_config_json_names_the_field(tiny_dirs, tmp_path, field, edit):
    d = shutil.copytree(tiny_dirs("mha")[0], tmp_path / "bad")
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=rf"{d / 'config.json'}: field {field} is "):
        ep_jax.load(d)
    with pytest.raises(ConfigError, match=field):
        ep_jax.convert_hf(d, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_config_json_that_is_not_an_object(tiny_dirs, tmp_path):
    d = shutil.copytree(tiny_dirs("mha")[0], tmp_path / "bad")
    (d / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="config.json holds a JSON list, not an object"):
        ep_jax.load(d)
    with pytest.raises(ConfigError, match=r"field \(top level\) is 'list', expected a JSON object"):
        hf.parse_config([1, 2], d / "config.json")
    (d / "config.json").write_text("{")
    with pytest.raises(ConfigError, match="cannot read .*config.json"):
        ep_jax.load(d)
    r = _run("convert/hf_to_ep.py", d, tmp_path / "out")
    assert r.returncode == 2 and "config.json" in _error_line(r.stderr)


def test_malformed_ep_config_json(ep_dir, tmp_path):
    def variant(name, edit):
        d = shutil.copytree(ep_dir, tmp_path / name, ignore=shutil.ignore_patterns("params"))
        (d / "params").symlink_to(ep_dir / "params")
        meta = json.loads((d / "ep_config.json").read_text())
        edit(meta)
        (d / "ep_config.json").write_text(json.dumps(meta))
        return d

    with pytest.raises(ConfigError, match=r"format 99; this ep_jax reads formats 2, 3 \(it was written by a "
                                          r"newer ep_jax\); upgrade ep_jax"):
        ep_jax.load(variant("future", lambda m: m.update(format_version=99)))
    with pytest.raises(ConfigError, match="field 'config' is missing"):
        ep_jax.load(variant("noconfig", lambda m: m.pop("config")))
    with pytest.raises(ConfigError, match="field 'config.vision' is missing"):
        ep_jax.load(variant("novision", lambda m: m["config"].pop("vision")))
    with pytest.raises(ConfigError, match="field 'dtype' is 'float8'"):
        ep_jax.load(variant("dtype", lambda m: m.update(dtype="float8")))


# ------------------------------------------------------------------------------ format 2
def _save_params_v2(params: dict, path: Path) -> None:
    """The format-2 writer (ep_jax before format 3): one orbax checkpoint per parameter."""
    import jax
    import orbax.checkpoint as ocp

    path.mkdir(parents=True)
    with ocp.StandardCheckpointer() as c:
        for keys in list(ckpt._leaf_paths(params)):
            c.save((path / ".".join(keys)).absolute(), {"value": jax.device_put(hf._get(params, keys))})
            c.wait_until_finished()


def _as_format_2(ep_dir: Path, dst: Path, edit=None) -> Path:
    model = ep_jax.load(ep_dir, layout="stacked")
    params = model.params()
    if edit is not None:
        edit(params)
    shutil.copytree(ep_dir, dst, ignore=shutil.ignore_patterns("params"))
    _save_params_v2(params, dst / "params")
    meta = json.loads((dst / "ep_config.json").read_text())
    meta["format_version"] = 2
    (dst / "ep_config.json").write_text(json.dumps(meta, indent=1))
    return dst


def test_format_2_checkpoints_still_load(ep_dir, tmp_path):
    import jax

    old = _as_format_2(ep_dir, tmp_path / "v2")
    assert (old / "params" / "layers.attn.q").is_dir()
    a, b = ep_jax.load(old, layout="stacked"), ep_jax.load(ep_dir, layout="stacked")
    assert a.config == b.config
    for x, y in zip(jax.tree.leaves(a.params()), jax.tree.leaves(b.params())):
        assert x.dtype == y.dtype and np.asarray(x).tobytes() == np.asarray(y).tobytes()
    shutil.rmtree(old / "params" / "vision.layers.fc1")
    with pytest.raises(CheckpointError, match=rf"parameter\(s\) vision.layers.fc1 of checkpoint {old} {UNREADABLE}"):
        ep_jax.load(old)

    def nan(params):
        params["proj2"] = params["proj2"].at[0, 0].set(np.nan)

    with pytest.raises(CheckpointError, match=r"tensor proj2 of checkpoint .*v2nan holds 1 NaN value"):
        ep_jax.load(_as_format_2(ep_dir, tmp_path / "v2nan", nan))


def test_format_3_is_one_orbax_checkpoint(ep_dir):
    meta = json.loads((ep_dir / "ep_config.json").read_text())
    assert meta["format_version"] == ckpt.FORMAT_VERSION == 3
    assert (ep_dir / "params" / "_METADATA").is_file()
    assert not any((ep_dir / "params" / n).exists() for n in ("embed", "layers.attn.q"))
    assert json.loads((SHIPPED / "ep_config.json").read_text())["format_version"] == 3
