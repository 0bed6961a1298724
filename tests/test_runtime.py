"""The family-agnostic runtime: visual spans, per-example budgets, pytree positions, the
persistent compilation cache, and the one-way import layering of the package."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import photo

import ep_jax
from ep_jax import PruneConfig
from ep_jax.core.select import take_tokens
from ep_jax.runtime.engine import persistent_cache_dir
from ep_jax.runtime.prefill import next_positions

ROOT = Path(__file__).resolve().parent.parent


def test_take_tokens_gathers_1d_and_mrope_positions():
    pos = np.arange(2 * 6).reshape(2, 6)
    mrope = np.stack([pos, pos + 100, pos + 200])  # [3, b, s]
    index = jnp.asarray([[0, 2, 5], [1, 3, 4]])
    np.testing.assert_array_equal(take_tokens(jnp.asarray(pos), index), np.take_along_axis(pos, np.asarray(index), 1))
    got = np.asarray(take_tokens(jnp.asarray(mrope), index))
    assert got.shape == (3, 2, 3)
    for row in range(3):
        np.testing.assert_array_equal(got[row], np.take_along_axis(mrope[row], np.asarray(index), 1))


def test_next_positions_continue_after_the_largest_real_position():
    valid = jnp.asarray([[False, True, True, True], [True, True, True, True]])
    pos = jnp.asarray([[0, 0, 1, 2], [0, 1, 2, 3]])
    np.testing.assert_array_equal(next_positions(pos, valid), [3, 4])
    mrope = jnp.stack([pos, pos, pos.at[0, 2].set(9)])  # M-RoPE: max over the three rows
    np.testing.assert_array_equal(next_positions(mrope, valid), [10, 4])


def _last_logits(model, prompts, images, prune):
    proc = model.processor
    enc = proc.encode(prompts, images, pad_side="left", bucket_sizes=None)
    out = ep_jax.forward(model, enc["input_ids"], enc["pixel_values"] if len(enc["pixel_values"]) else None,
                         enc["attention_mask"], prune=prune)
    last = np.max(np.where(out.row_valid, np.arange(out.row_valid.shape[1]), -1), axis=1)
    return out, out.logits[np.arange(len(prompts)), last]


@pytest.mark.parametrize("prune", [None, PruneConfig(layer=2, keep_ratio=0.7), PruneConfig(layer=2, keep=5),
                                   PruneConfig(method="pool", layer=2, keep=5)])
def test_rows_with_different_visual_counts_equal_each_alone(tiny_model, prune):
    """One batch: two images, one image, no image. Each example keeps its own R from its own N
    and its next-token logits equal running it alone."""
    model = tiny_model("mha")
    prompts = ["Compare <image> and <image> please.", "What is in the image?", "Hello there, how are you?"]
    images = [[photo("chelsea"), photo("coffee")], [photo("astronaut")], None]
    out, batched = _last_logits(model, prompts, images, prune)
    counts = out.spans.counts()
    n = model.config.image_seq_len
    np.testing.assert_array_equal(counts, [2 * n, n, 0])
    if prune is not None:
        assert out.keep[2] == 0 and out.keep[1] > 0
        if prune.keep_ratio is not None:  # each example's own N: floor(N (L r - K) / (L - K))
            np.testing.assert_array_equal(out.keep, [12, 6, 0])
    for i in range(3):
        _, alone = _last_logits(model, prompts[i:i + 1], images[i:i + 1], prune)
        np.testing.assert_allclose(batched[i], alone[0], atol=2e-4, rtol=0)


def test_pruned_generation_of_a_mixed_batch_equals_one_by_one(tiny_model):
    model = tiny_model("mha")
    prune = PruneConfig(layer=2, keep=5)
    prompts, images = ["What is in the image?", "Say hello."], [[photo("chelsea")], None]
    batched = ep_jax.generate(model, images, prompts, max_new_tokens=6, prune=prune, return_ids=True)[1]
    for i in range(2):
        alone = ep_jax.generate(model, images[i:i + 1], prompts[i:i + 1], max_new_tokens=6, prune=prune,
                                return_ids=True)[1][0]
        assert batched[i] == alone


def test_persistent_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("EP_JAX_COMPILATION_CACHE", str(tmp_path / "c"))
    assert persistent_cache_dir() == tmp_path / "c"
    for off in ("0", "off", ""):
        monkeypatch.setenv("EP_JAX_COMPILATION_CACHE", off)
        assert persistent_cache_dir() is None
    monkeypatch.delenv("EP_JAX_COMPILATION_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert persistent_cache_dir() == tmp_path / "xdg" / "ep_jax" / "jax"


def test_a_second_process_reads_the_persistent_cache(tmp_path):
    """The first process writes compiled programs to the cache directory; a second one with the
    same cache compiles faster (it reads them) and gives the same answer."""
    import json
    import os

    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "ep_jax.generate", "--image", str(ROOT / "examples" / "scene_count_0007.png"),
           "--prompt", "How many circles are there?", "--json"]
    env = {**os.environ, "EP_JAX_COMPILATION_CACHE": str(cache)}
    runs = [json.loads(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=ROOT).stdout)
            for _ in range(2)]
    assert any(cache.iterdir())
    assert runs[0]["answers"] == runs[1]["answers"] == ["4"]
    assert {"load_s", "tokenizer_ms", "preprocess_ms", "compile_s", "prefill_ms", "decode_ms"} <= set(runs[0]["timings"])


# ------------------------------------------------------------------ package layering
LAYERS = ["errors", "core", "nn", "runtime", "host", "families", "io", "analysis", "cli"]
PLACE = {  # top-level modules outside the layer folders
    "config": "core",  # plain config dataclasses (decoder and vision shapes) read from config.json
    "processing": "host", "images": "host", "image_files": "host", "video": "host", "tokenizer": "host", "files": "host", "hf": "host",
    "checkpoint": "io", "presets": "io",
    "generate": "cli", "ecl": "cli", "bench": "cli", "bench_setup": "cli", "bench_speed": "cli",
    "bench_compile": "cli", "bench_report": "cli", "quality": "cli", "train": "cli", "data": "cli",
    "eval": "cli", "serve": "cli",
}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "ep_jax" or len(parts) < 2:
        return None
    return PLACE.get(parts[1], parts[1])


def test_imports_point_one_way():
    """core <- nn <- runtime <- host-side inputs <- families <- checkpoints <- analysis <- cli: a
    module imports only from its own layer or the ones before it (imports inside functions
    included)."""
    bad = []
    for path in sorted((ROOT / "ep_jax").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        mine = _layer(module)
        if mine not in LAYERS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
            for name in names:
                theirs = _layer(name)
                if theirs in LAYERS and LAYERS.index(theirs) > LAYERS.index(mine):
                    bad.append(f"{module} ({mine}) imports {name} ({theirs})")
    allowed = {  # the runtime measures K for layer="auto" with the analysis code, imported late
        "ep_jax.runtime.api (runtime) imports ep_jax.analysis.ecl (analysis)",
    }
    assert [b for b in bad if b not in allowed] == []


def test_cli_entry_imports_each_module_once():
    """`python -m ep_jax.generate` no longer imports itself a second time through a cycle."""
    code = ("import runpy, sys; sys.argv = ['x', '--help'];\n"
            "try:\n    runpy.run_module('ep_jax.generate', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('ep_jax.generate' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip().endswith("False"), out.stdout


def test_default_pruning_comes_from_the_preset():
    """A preset's default budget: an average A, else a fraction of each example's N (models
    whose N varies with the image size, such as Qwen2.5-VL); nothing without K or a budget."""
    from ep_jax.presets import Preset, get
    from ep_jax.runtime.api import default_prune

    assert default_prune(Preset(name="a", prune_layer=2, default_avg_keep=64)) == PruneConfig(layer=2, avg_keep=64)
    assert default_prune(Preset(name="r", prune_layer=1, default_keep_ratio=0.25)) == PruneConfig(
        layer=1, keep_ratio=0.25)
    assert default_prune(Preset(name="none", prune_layer=2)) is None
    assert default_prune(None) is None
    assert default_prune(get("qwen2.5-vl-7b-instruct")) == PruneConfig(layer=1, keep_ratio=0.25)
