"""Entropy Collapse Layer: the rule on synthetic profiles, the jitted profile against a slow
layer-by-layer loop, the plot, presets, and `python -m ep_jax.ecl` end to end."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import photo
from flax import nnx
from PIL import Image

import ep_jax
from ep_jax import presets
from ep_jax.analysis import ecl, ecl_report
from ep_jax.runtime.model import with_layout
from ep_jax.core.entropy import set_entropy, token_entropy
from ep_jax.runtime.engine import compile_stats

ROOT = Path(__file__).resolve().parent.parent


def llava_like(num_layers: int = 32) -> np.ndarray:
    """Set entropy entering layer j = 0..L, shaped like LLaVA-1.5-7B: high at the embeddings and
    after layer 0, collapsed after layer 1, a slow decline, and a large drop in the last layer
    (outside the early window: it must not be chosen)."""
    curve = np.empty(num_layers + 1)
    curve[0], curve[1] = 0.86, 0.84
    curve[2:num_layers] = np.linspace(0.31, 0.24, num_layers - 2)
    curve[num_layers] = 0.02
    return curve


# ---------------------------------------------------------------------- the rule
def test_llava_like_profile_gives_k2():
    r = ecl.find_ecl(llava_like())
    assert (r.layer, r.status, r.window) == (2, "collapse", (1, 8))
    assert r.curve.shape == r.drops.shape == r.rel_drops.shape == (33,)
    assert np.isnan(r.drops[0])
    np.testing.assert_allclose(r.drops[2], 0.84 - 0.31)
    np.testing.assert_allclose(r.rel_drops[2], (0.84 - 0.31) / 0.84)
    np.testing.assert_allclose(r.sharpness, 0.53 / 0.02)  # next largest early drop: 0.86 -> 0.84
    assert r.rel_drops[32] > r.rel_drops[2]  # the late collapse is relatively bigger but not early
    assert "K = 2" in r.message and "inside layer 1" in r.message
    assert r.agreement is None and r.per_example == (2,)


def test_indexing_collapse_inside_layer0_gives_k1_and_window_is_capped():
    curve = np.array([0.9, 0.3, 0.29, 0.28, 0.27])  # L = 4: the collapse happens in layer 0
    r = ecl.find_ecl(curve)
    assert (r.layer, r.window) == (1, (1, 2))
    # an explicit window past L-1 is capped: K = L would leave no layer to run pruned, so a
    # collapse inside the last layer is never chosen
    late = np.array([0.9, 0.89, 0.88, 0.87, 0.2])
    r = ecl.find_ecl(late, max_layer=10)
    assert r.window == (1, 3) and r.layer is None and r.rel_drops[4] > 0.7
    assert ecl.find_ecl(np.array([0.9, 0.89, 0.88, 0.3, 0.29]), max_layer=10).layer == 3


@pytest.mark.parametrize("curve", [
    np.full(33, 0.7),  # flat
    np.linspace(0.9, 0.5, 33),  # steady decline, 1.5% per step at most
    np.linspace(0.5, 0.9, 33),  # rising
])
def test_flat_or_gradual_profile_is_no_collapse_not_a_guess(curve):
    r = ecl.find_ecl(curve)
    assert r.layer is None and r.status == "no_collapse" and not r.found
    assert r.message.startswith("No entropy collapse found")
    assert "not guessing" in r.message
    assert 1 <= r.best <= 8  # the best candidate is still reported
    assert r.rel_drops[r.best] < ecl.DEFAULT_MIN_REL_DROP


def test_min_rel_drop_is_the_threshold():
    curve = np.array([0.80, 0.79, 0.72, 0.71, 0.70, 0.69, 0.68, 0.67, 0.66])  # 8.9% drop at j=2
    assert ecl.find_ecl(curve).layer is None
    assert ecl.find_ecl(curve, min_rel_drop=0.08).layer == 2
    with pytest.raises(ValueError, match="min_rel_drop"):
        ecl.find_ecl(curve, min_rel_drop=1.5)


def test_tie_chooses_the_earliest_and_says_so():
    curve = np.array([0.9, 0.88, 0.6, 0.59, 0.32, 0.31, 0.30, 0.29, 0.28, 0.27, 0.26])
    r = ecl.find_ecl(curve, max_layer=5)  # drops 0.28 before K=2 and 0.27 before K=4 (within 5%)
    assert (r.layer, r.status, r.tied, r.best) == (2, "tie", (2, 4), 2)
    assert "ambiguous" in r.message and "K = 2, 4" in r.message
    r = ecl.find_ecl(curve, max_layer=5, tie_tol=0.01)
    assert (r.layer, r.status, r.tied) == (2, "collapse", ())
    # an exact tie where the later one is the argmax-first still picks the earliest
    curve2 = np.array([0.9, 0.89, 0.6, 0.59, 0.30, 0.29, 0.28])
    assert ecl.find_ecl(curve2, max_layer=5).layer == 2


def test_noise_robustness():
    rng = np.random.default_rng(0)
    base, flat = llava_like(), np.full(33, 0.7)
    for _ in range(50):
        noisy = base + rng.normal(0, 0.02, size=(8, 33))  # 8 calibration images
        r = ecl.find_ecl(noisy)
        assert r.layer == 2 and r.status == "collapse"
        assert r.agreement == 1.0 and r.per_example == (2,) * 8
        r = ecl.find_ecl(flat + rng.normal(0, 0.01, size=(8, 33)))
        assert r.layer is None, r.message
    # a single very noisy image can disagree; the mean curve still finds K = 2
    noisy = base + rng.normal(0, 0.02, size=(8, 33))
    noisy[0, 1:9] = [0.84, 0.84, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2]
    r = ecl.find_ecl(noisy)
    assert r.layer == 2 and r.per_example[0] == 3 and r.agreement == 7 / 8
    assert "7/8 examples agree" in r.message


def test_bad_profiles_are_clear_errors():
    with pytest.raises(ValueError, match="NaN"):
        ecl.find_ecl(np.array([0.9, np.nan, 0.3, 0.2]))
    with pytest.raises(ValueError, match="no K to choose"):
        ecl.find_ecl(np.array([0.9, 0.3]))
    with pytest.raises(ValueError, match="shape"):
        ecl.find_ecl(np.zeros((2, 3, 4)))


# ---------------------------------------------------------------------- the profile
def _slow_profile(model, input_ids, pixel_values, attention_mask, levels):
    """Hidden states collected one layer at a time (each layer merged from its slice of the
    stacked state and called as a DecoderLayer), one example at a time without its padding.
    Each step is jitted only to keep the loop fast; nothing is shared with `ecl`."""
    module = with_layout(model, "stacked").module
    cfg = model.config
    graphdef, state = nnx.split(module.layers)

    @jax.jit
    def layer_step(layer_state, x, positions, causal):
        out, _, proj = nnx.merge(graphdef, layer_state)(x, positions, causal)
        return out, proj.query

    embed = jax.jit(lambda ids, px: module.merge(ids, module.image_features(px)))
    entropy = jax.jit(set_entropy)
    scores_of = jax.jit(lambda q: token_entropy(q.reshape(q.shape[0], -1), cfg.text.num_heads))
    ents, means, quants, states = [], [], [], []
    for b in range(len(input_ids)):
        ids = input_ids[b][attention_mask[b].astype(bool)][None]
        s = ids.shape[1]
        x = embed(jnp.asarray(ids), jnp.asarray(pixel_values[b:b + 1]))
        positions = jnp.arange(s)[None]
        causal = jnp.tril(jnp.ones((s, s), bool))[None]
        vis = np.nonzero(ids[0] == cfg.image_token_id)[0]
        e, m, q, hs = [float(entropy(x[0, vis]))], [], [], [np.asarray(x[0, vis], np.float64)]
        for layer_index in range(cfg.text.num_layers):
            x, query = layer_step(jax.tree.map(lambda a: a[layer_index], state), x, positions, causal)
            scores = np.asarray(scores_of(query[0, vis]))
            m.append(scores.mean())
            q.append(np.quantile(scores, levels))
            e.append(float(entropy(x[0, vis])))
            hs.append(np.asarray(x[0, vis], np.float64))
        ents.append(e), means.append(m), quants.append(q), states.append(hs)
    return np.array(ents), np.array(means), np.array(quants), states


def _numpy_set_entropy(h: np.ndarray) -> float:
    """Independent float64 reference of docs/ALGORITHM.md §3 (token side, N < D here or not)."""
    h = h - h.mean(0)
    lam = np.linalg.eigvalsh(h @ h.T / len(h)) if len(h) <= h.shape[1] else np.linalg.eigvalsh(h.T @ h / len(h))
    lam = lam[lam > lam.max() * 1e-9]
    lam = lam / lam.sum()
    return float(-(lam * np.log(lam)).sum() / np.log(min(h.shape)))


def test_profile_matches_slow_layer_by_layer_loop(tiny_model):
    model = tiny_model("mha")
    cfg = model.config
    # two prompts of different lengths: left padding in the batch, none in the slow loop
    enc = model.processor.encode(["Describe the image in detail.", "What is in the image? Is there a cat?"],
                                 [[photo("astronaut")], [photo("chelsea")]])
    assert (enc["attention_mask"] == 0).any()
    before = compile_stats(model)["compiles"]
    prof = ecl.entropy_profile(model, enc["input_ids"], enc["pixel_values"], enc["attention_mask"])
    L, B = cfg.text.num_layers, 2
    assert prof.set_entropy.shape == (B, L + 1) and prof.score_mean.shape == (B, L)
    assert prof.score_quantiles.shape == (B, L, len(ecl.DEFAULT_QUANTILES))
    assert prof.num_visual == cfg.image_seq_len

    ents, means, quants, states = _slow_profile(model, enc["input_ids"], enc["pixel_values"],
                                                enc["attention_mask"], ecl.DEFAULT_QUANTILES)
    np.testing.assert_allclose(prof.set_entropy, ents, atol=1e-5, rtol=0)
    np.testing.assert_allclose(prof.score_mean, means, atol=1e-5, rtol=0)
    np.testing.assert_allclose(prof.score_quantiles, quants, atol=1e-5, rtol=0)
    # the set entropy itself against an independent float64 NumPy computation
    ref = np.array([[_numpy_set_entropy(h) for h in hs] for hs in states])
    np.testing.assert_allclose(prof.set_entropy, ref, atol=1e-4, rtol=0)
    assert np.all((prof.set_entropy > 0) & (prof.set_entropy <= 1))
    assert np.all(np.diff(prof.score_quantiles, axis=-1) >= 0)

    # new images of the same shapes reuse the compiled function
    compiled = compile_stats(model)["compiles"]
    assert compiled == before + 1
    enc2 = model.processor.encode(["Describe the image in detail.", "What is in the image? Is there a cat?"],
                                  [[photo("coffee")], [photo("rocket")]])
    prof2 = ecl.entropy_profile(model, enc2["input_ids"], enc2["pixel_values"], enc2["attention_mask"])
    assert compile_stats(model)["compiles"] == compiled
    assert not np.allclose(prof2.set_entropy, prof.set_entropy)

    r = ecl.measure_ecl(model, enc["input_ids"], enc["pixel_values"], enc["attention_mask"])
    np.testing.assert_allclose(r.curve, prof.set_entropy.mean(0), atol=1e-6)
    assert r.profile is not None and isinstance(r.message, str) and r.message
    assert compile_stats(model)["compiles"] == compiled


def test_profile_needs_an_image(tiny_model):
    model = tiny_model("mha")
    enc = model.processor.encode(["No image here."], None)
    with pytest.raises(ValueError, match="needs images"):
        ecl.entropy_profile(model, enc["input_ids"], None, enc["attention_mask"])


# ---------------------------------------------------------------------- plot
def _marker_pixels(png: Path, layer: int, num_layers: int):
    """Pure-red pixels of each axes' rows: (expected column, red column indices, counts, rows)."""
    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    w, h = int(ecl_report.FIG_SIZE[0] * ecl_report.FIG_DPI), int(ecl_report.FIG_SIZE[1] * ecl_report.FIG_DPI)
    assert img.shape == (h, w, 3)
    red = (img[..., 0] == 255) & (img[..., 1] == 0) & (img[..., 2] == 0)
    left, _, width, _ = ecl_report.AXES_TOP
    expected = (left + width * (ecl_report.marker_x(layer) + 0.5) / (num_layers + 1)) * w
    out = []
    for _, bottom, _, height in (ecl_report.AXES_TOP, ecl_report.AXES_BOTTOM):
        rows = slice(int((1 - bottom - height) * h) + 2, int((1 - bottom) * h) - 2)
        counts = red[rows].sum(0)
        out.append((counts, rows.stop - rows.start))
    return expected, red, out


def test_plot_marks_the_ecl_column(tmp_path):
    rng = np.random.default_rng(1)
    L = 32
    prof = ecl.EntropyProfile(
        set_entropy=llava_like(L) + rng.normal(0, 0.01, (3, L + 1)),
        score_mean=rng.normal(0.5, 0.05, (3, L)),
        score_quantiles=np.sort(rng.normal(0.5, 0.1, (3, L, 5)), -1),
        quantile_levels=ecl.DEFAULT_QUANTILES, num_visual=576,
    )
    r = ecl.find_ecl(prof)
    assert r.layer == 2
    png = ecl_report.plot_profile(prof, r, tmp_path / "p.png")
    expected, red, axes = _marker_pixels(png, 2, L)
    for counts, height in axes:
        cols = np.nonzero(counts > 0.5 * height)[0]
        assert cols.size >= 1 and np.all(np.abs(cols - expected) <= 3), (cols, expected)
    band = np.abs(np.arange(red.shape[1]) - expected) <= 4
    assert red[:, ~band].sum() == 0  # nothing else is pure red
    # no collapse: no red marker at all
    flat = ecl.EntropyProfile(np.full((1, L + 1), 0.7), prof.score_mean[:1], prof.score_quantiles[:1],
                              ecl.DEFAULT_QUANTILES, 576)
    png = ecl_report.plot_profile(flat, ecl.find_ecl(flat), tmp_path / "flat.png")
    assert _marker_pixels(png, 2, L)[1].sum() == 0


# ---------------------------------------------------------------------- presets
def test_save_measured_updates_the_matching_preset(tiny_model, tmp_path, monkeypatch):
    cfg = tiny_model("mha").config
    models = tmp_path / "models"
    models.mkdir()
    monkeypatch.setenv("EP_JAX_MODELS", str(models))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    # no preset matches: ep_preset.json goes into the checkpoint directory
    path = presets.save_measured(ckpt, cfg, None, 2, {"set_entropy": {"mean": [0.9, 0.3]}})
    assert path == ckpt / "ep_preset.json"
    own = presets.for_model(ckpt, cfg)
    assert (own.prune_layer, own.prune_layer_source, own.name) == (2, "measured", "ckpt")
    assert own.profile == {"set_entropy": {"mean": [0.9, 0.3]}}
    # a models/ preset that matches is updated in place, its other fields kept
    path.unlink()
    presets.Preset(name="tiny", template="plain", prune_layer=3, prune_layer_source="paper", budgets=(64,),
                   match={"text.num_layers": cfg.text.num_layers, "text.hidden_size": cfg.text.hidden_size},
                   notes="keep me").to_file(models / "tiny.json")
    path = presets.save_measured(ckpt, cfg, None, 1, {"x": 1})
    assert path == models / "tiny.json" and not (ckpt / "ep_preset.json").exists()
    p = presets.get("tiny")
    assert (p.prune_layer, p.prune_layer_source, p.template, p.budgets, p.notes, p.profile) == (
        1, "measured", "plain", (64,), "keep me", {"x": 1})


# ---------------------------------------------------------------------- CLI
def cli(*args, env_models: Path):
    import os

    env = dict(os.environ, EP_JAX_MODELS=str(env_models))
    return subprocess.run([sys.executable, "-m", "ep_jax.ecl", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)


def test_cli_writes_profile_png_and_preset(tiny_dirs, tiny_model, tmp_path):
    model_dir = tmp_path / "tiny"
    shutil.copytree(tiny_dirs("mha")[0], model_dir)  # --write-preset writes into it
    (tmp_path / "models").mkdir()
    Image.fromarray(photo("astronaut")).save(tmp_path / "astronaut.png")
    Image.fromarray(photo("chelsea")).save(tmp_path / "cat.jpg")
    out = tmp_path / "out"
    # the tiny random model has no real collapse (a flat profile): --min-drop 0 lets the rule pick
    r = cli("--model", model_dir, "--image", tmp_path / "astronaut.png", tmp_path / "cat.jpg",
            "--out", out, "--min-drop", "0", "--max-layer", "3", "--batch-size", "2", "--write-preset",
            env_models=tmp_path / "models")
    assert r.returncode == 0, r.stderr
    L = tiny_model("mha").config.text.num_layers

    doc = json.loads((out / "profile.json").read_text())
    k = doc["ecl"]["layer"]
    assert k in (1, 2, 3) and doc["ecl"]["status"] in ("collapse", "tie")
    assert doc["ecl"]["rule"]["min_rel_drop"] == 0 and doc["ecl"]["rule"]["window"] == [1, 3]
    assert doc["prompt"] == ecl.DEFAULT_PROMPT and len(doc["images"]) == 2
    prof = doc["profile"]
    assert prof["num_layers"] == L and prof["num_examples"] == 2 and prof["num_visual"] == 16
    assert len(prof["set_entropy"]["mean"]) == L + 1 and len(prof["score"]["mean"]) == L
    assert np.array(prof["set_entropy"]["per_example"]).shape == (2, L + 1)
    assert np.array(prof["score"]["quantiles"]).shape == (L, 5)
    drops = doc["ecl"]["drops"]
    assert drops[0] is None and drops[k] >= (1 - ecl.DEFAULT_TIE_TOL) * max(d for d in drops[1:4])
    # the CLI's numbers are the API's
    model = tiny_model("mha")
    api = ecl.profile_images(model, [Image.open(tmp_path / "astronaut.png"), Image.open(tmp_path / "cat.jpg")],
                             batch_size=2)
    np.testing.assert_allclose(prof["set_entropy"]["per_example"], api.set_entropy, atol=1e-5)
    assert f"K = {k}" in r.stdout and "<- K (ECL)" in r.stdout
    assert len([line for line in r.stdout.splitlines() if line[:3].strip().isdigit()]) == L + 1

    expected, red, axes = _marker_pixels(out / "profile.png", k, L)
    for counts, height in axes:
        cols = np.nonzero(counts > 0.5 * height)[0]
        assert cols.size >= 1 and np.all(np.abs(cols - expected) <= 3), (cols, expected)

    preset = presets.Preset.from_file(model_dir / "ep_preset.json")
    assert (preset.prune_layer, preset.prune_layer_source) == (k, "measured")
    assert preset.profile["ecl"]["layer"] == k
    assert preset.profile["set_entropy"]["mean"] == prof["set_entropy"]["mean"]


def test_cli_bad_input_is_one_clear_line(tmp_path):
    r = cli("--model", tmp_path, "--image", tmp_path / "nope.png", env_models=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nope.png" in lines[0]
