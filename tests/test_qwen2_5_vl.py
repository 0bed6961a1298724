"""Qwen2.5-VL family: logits, M-RoPE positions and greedy generation vs transformers, pruning
(keep = N, the mask oracle), buckets. Tiny random Qwen2_5_VLForConditionalGeneration built in
the test (tests/hf_tiny.py), saved with the hub's flat config.json and weight names."""

from __future__ import annotations

import dataclasses

import numpy as np
import PIL.Image
import pytest

import torch  # noqa: E402  (test dependency: the parity reference)
import transformers  # noqa: E402

from torch_reference import qwen_pruned_forward  # noqa: E402
from hf_tiny import QWEN_EOS, QWEN_IMAGE, QWEN_PAD, QWEN_VEND, QWEN_VSTART, build_tiny_qwen2_5_vl  # noqa: E402

import ep_jax  # noqa: E402
from ep_jax import checkpoint  # noqa: E402
from ep_jax.core.budget import PruneConfig  # noqa: E402
from ep_jax.runtime import api  # noqa: E402
from ep_jax.runtime.engine import compile_stats  # noqa: E402

SIZES = [(90, 120), (150, 80)]


def _images(sizes=SIZES, seed=0):
    rng = np.random.default_rng(seed)
    return [PIL.Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def _encode(images, length=None):
    """transformers' Qwen2VLImageProcessorPil pixels and a left-padded batch, one image a row."""
    ip = transformers.Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 64)
    enc = ip(images, return_tensors="np")
    grid = enc["image_grid_thw"]
    rows = [[20, 21, QWEN_VSTART] + [QWEN_IMAGE] * int(n) + [QWEN_VEND, 22, 23, 24 + i]
            for i, n in enumerate(grid.prod(1) // 4)]
    length = length or max(map(len, rows))
    ids, mask = np.zeros((len(rows), length), np.int64), np.zeros((len(rows), length), np.int64)
    for i, r in enumerate(rows):
        ids[i, length - len(r):], mask[i, length - len(r):] = r, 1
    return ids, enc["pixel_values"], mask, grid


def _torch(tm, ids, pixels, mask, grid):
    return dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=torch.tensor(pixels),
                image_grid_thw=torch.tensor(grid), mm_token_type_ids=torch.tensor((ids == QWEN_IMAGE).astype(np.int64)))


def _assert_logits_match(tm, model, ids, pixels, mask, grid):
    """ep_jax's logits on the real (unpadded) rows equal transformers' within 1e-4."""
    with torch.no_grad():
        ref = tm(**_torch(tm, ids, pixels, mask, grid)).logits.numpy()
    got = ep_jax.forward(model, ids, pixels, mask, image_grid_thw=grid).logits
    valid = mask.astype(bool)
    np.testing.assert_allclose(got[valid], ref[valid], atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    d, tm = build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen2_5_vl"))
    return d, tm, checkpoint.load(d)


def test_logits_match_transformers_batch_of_two_sizes(qwen):
    _, tm, model = qwen
    ids, pixels, mask, grid = _encode(_images())
    assert len(set((grid.prod(1) // 4).tolist())) == 2  # a different N per row
    _assert_logits_match(tm, model, ids, pixels, mask, grid)


def test_mrope_positions_equal_get_rope_index(qwen):
    _, tm, model = qwen
    ids, pixels, mask, grid = _encode(_images())
    inputs, _ = model.family.inputs(model.config, ids, pixels, mask, image_grid_thw=grid)
    t = _torch(tm, ids, pixels, mask, grid)
    want, _ = tm.model.get_rope_index(t["input_ids"], t["mm_token_type_ids"], t["image_grid_thw"],
                                      attention_mask=t["attention_mask"])
    valid = mask.astype(bool)
    np.testing.assert_array_equal(inputs["mrope_positions"][:, valid], want.numpy()[:, valid])


PROMPTS = ["Describe the photo.", "What is in the image?"]


def test_greedy_generation_matches_transformers(qwen):
    _, tm, model = qwen
    images = _images()
    got = ep_jax.generate(model, images, PROMPTS, max_new_tokens=20, prune=None, return_ids=True)[1]
    enc = model.processor.encode(PROMPTS, images, template="qwen2_5_vl", bucket_sizes=None)
    t = _torch(tm, enc["input_ids"].astype(np.int64), enc["pixel_values"], enc["attention_mask"].astype(np.int64),
               enc["image_grid_thw"])
    with torch.no_grad():
        ref = tm.generate(**t, max_new_tokens=20, do_sample=False, eos_token_id=QWEN_EOS,
                          pad_token_id=QWEN_PAD)[:, enc["input_ids"].shape[1]:].tolist()
    ref = [r[: r.index(QWEN_EOS) + 1] if QWEN_EOS in r else r for r in ref]
    assert [list(map(int, g)) for g in got] == ref
    assert sum(map(len, ref)) > 20  # not an immediate end of sequence


PIXEL_SIZES = [(20, 30), (40, 40), (56, 56), (90, 120), (150, 80), (224, 224), (300, 200), (33, 97), (400, 90),
               (17, 250), (512, 384), (100, 101), (64, 300)]


def test_image_processor_matches_transformers_pil():
    from ep_jax.families.qwen2_5_vl.processing import QwenImageProcessor

    lo, hi = 56 * 56 * 4, 28 * 28 * 40
    ours = QwenImageProcessor(min_pixels=lo, resize_max_pixels=hi)
    theirs = transformers.Qwen2VLImageProcessorPil(min_pixels=lo, max_pixels=hi)
    areas = []
    for im in _images(PIXEL_SIZES, seed=5):
        want = theirs([im], return_tensors="np")
        got, grid = ours.patches(im)
        np.testing.assert_array_equal(got, want["pixel_values"])
        np.testing.assert_array_equal(np.array([grid]), want["image_grid_thw"])
        areas.append(im.width * im.height)
    assert min(areas) < lo and max(areas) > hi  # both smart_resize bounds exercised
    hub = {"min_pixels": lo, "max_pixels": hi, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
           "image_processor_type": "Qwen2_5_VLImageProcessor"}  # the hub checkpoints' preprocessor_config.json
    assert QwenImageProcessor.from_hf_dict(hub) == ours


def test_processor_expands_each_image_pad_and_uses_the_chat_template(qwen):
    _, _, model = qwen
    proc = model.processor
    images = _images()
    enc = proc.encode(PROMPTS, images, bucket_sizes=None)
    grid = enc["image_grid_thw"]
    np.testing.assert_array_equal(grid, transformers.Qwen2VLImageProcessorPil()(images, return_tensors="np")
                                  ["image_grid_thw"])
    valid = enc["attention_mask"].astype(bool)
    np.testing.assert_array_equal(((enc["input_ids"] == QWEN_IMAGE) & valid).sum(1), grid.prod(1) // 4)
    text = proc.format(PROMPTS[0], template="qwen2_5_vl")
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>Describe the photo.<|im_end|>\n"
                    "<|im_start|>assistant\n")


def test_prompt_length_counts_each_images_tokens(qwen):
    _, _, model = qwen
    proc, images = model.processor, _images()
    enc = proc.encode(PROMPTS, [[im] for im in images], template="qwen2_5_vl", bucket_sizes=None)
    assert [proc.prompt_length(p, [im], template="qwen2_5_vl") for p, im in zip(PROMPTS, images)] == \
        [int(n) for n in enc["lengths"]]


def test_keep_all_reproduces_unpruned(qwen):
    _, _, model = qwen
    ids, pixels, mask, grid = _encode(_images())
    full = ep_jax.forward(model, ids, pixels, mask, image_grid_thw=grid).logits
    out = ep_jax.forward(model, ids, pixels, mask, image_grid_thw=grid, prune=PruneConfig(layer=1, keep_ratio=1.0))
    np.testing.assert_array_equal(out.keep, grid.prod(1) // 4)  # keep = each row's own N
    rows, valid = out.positions, out.row_valid
    for i in range(len(ids)):
        r = rows[i][valid[i]]
        np.testing.assert_allclose(out.logits[i][valid[i]], full[i, r], atol=1e-5, rtol=0)


@pytest.mark.parametrize("layer", [1, 2])
def test_pruned_kept_rows_equal_the_mask_oracle(layer, qwen):
    _, _, model = qwen
    ids, pixels, mask, grid = _encode(_images())
    cfg = PruneConfig(layer=layer, keep_ratio=0.25 if layer == 1 else 0.375)
    out = ep_jax.forward(model, ids, pixels, mask, image_grid_thw=grid, prune=cfg)
    oracle = ep_jax.forward(model, ids, pixels, mask, image_grid_thw=grid,
                            prune=dataclasses.replace(cfg, mode="mask"))
    assert (out.keep < (grid.prod(1) // 4)).all()
    for i in range(len(ids)):
        r = out.positions[i][out.row_valid[i]]
        np.testing.assert_allclose(out.logits[i][out.row_valid[i]], oracle.logits[i, r], atol=1e-5, rtol=0)


@pytest.mark.parametrize("layer", [1, 2])
def test_pruned_matches_the_float64_torch_reference(layer, qwen):
    """Each row of a padded batch with a different N per row against the independent PyTorch
    reference run on that row alone: kept sequence indices, all three M-RoPE position rows of the
    kept tokens, and the logits of every kept row."""
    _, tm, model = qwen
    ids, pixels, mask, grid = _encode(_images())
    out = ep_jax.forward(model, ids, pixels, mask, image_grid_thw=grid,
                         prune=PruneConfig(layer=layer, keep_ratio=0.5))
    num_layers, n = model.config.text.num_layers, grid.prod(1) // 4
    want_r = n * (num_layers * 0.5 - layer) // (num_layers - layer)  # R = floor(N (L r - K) / (L - K)), per row
    np.testing.assert_array_equal(out.keep, want_r)
    assert (want_r >= 4).all() and (want_r < n).all()  # a real choice among each row's tokens
    mrope = model.family.inputs(model.config, ids, pixels, mask, image_grid_thw=grid)[0]["mrope_positions"]
    starts = np.concatenate([[0], np.cumsum(grid.prod(1))])
    for i in range(len(ids)):
        pad = int((mask[i] == 0).sum())
        row = torch.tensor(ids[i:i + 1, pad:])
        ref_logits, ref_kept, ref_pos = qwen_pruned_forward(
            tm, row, (row == QWEN_IMAGE).long(), layer, int(out.keep[i]),
            pixel_values=torch.tensor(pixels[starts[i]:starts[i + 1]]), image_grid_thw=torch.tensor(grid[i:i + 1]))
        rows = out.positions[i][out.row_valid[i]]
        np.testing.assert_array_equal(rows - pad, ref_kept.numpy())
        np.testing.assert_array_equal(np.asarray(mrope)[:, i, rows], ref_pos.numpy())
        np.testing.assert_allclose(out.logits[i][out.row_valid[i]], ref_logits.numpy()[0], atol=1e-4, rtol=0)


def test_no_recompilation_for_a_new_image_of_the_same_bucket(qwen):
    _, _, model = qwen
    cfg = PruneConfig(layer=1, keep_ratio=0.25)
    ids, pixels, mask, grid = _encode(_images())
    ep_jax.forward(model, ids, pixels, mask, image_grid_thw=grid, prune=cfg)
    before = compile_stats(model)["compiles"]
    ids2, pixels2, mask2, grid2 = _encode(_images([(112, 84), (84, 140)], seed=3), length=ids.shape[1])
    assert not np.array_equal(grid2, grid)  # other image sizes, same patch and slot buckets
    ep_jax.forward(model, ids2, pixels2, mask2, image_grid_thw=grid2, prune=cfg)
    assert compile_stats(model)["compiles"] == before


def test_kept_rows_round_up_in_steps_of_32_below_256(qwen):
    """Visual slots bucketed (N < n): the pruned sequence (text + R rows) runs padded to the next
    of `api.KEPT_BUCKETS`, in steps of 32 below 256 (a video at 10 %: 221 rows run as 224)."""
    _, _, model = qwen
    ids, pixels, mask, grid = _encode(_images([(224, 224)]))  # N = 64
    text = np.full((1, 150), 20)  # a long question before the image
    ids, mask = np.concatenate([text, ids], 1), np.concatenate([np.ones_like(text), mask], 1)
    _, spans, stage, extra = api.prepare(model, ids, pixels, mask, prune=PruneConfig(layer=1, keep_ratio=0.25),
                                         image_grid_thw=grid)
    need = int(mask.sum() - spans.counts()[0] + extra["keep"][0])
    assert spans.num_slots > spans.counts()[0] and 64 < need < 256 and need % 32
    assert ids.shape[1] > -(-need // 32) * 32 == stage.kept_len  # 192 (the buckets were 128, 256)


def test_weights_export_to_the_hub_names_and_transformers5_layout_loads(qwen, tmp_path):
    from safetensors.numpy import load_file

    d, _, model = qwen
    saved = load_file(str(d / "model.safetensors"))
    exported = dict(model.family.iter_hf_export(model.params(), model.config))
    assert set(exported) == set(saved)
    for name, value in exported.items():
        np.testing.assert_array_equal(value, saved[name], err_msg=name)
    v5, tm5 = build_tiny_qwen2_5_vl(tmp_path / "v5", layout="v5", tie=True)
    assert any(k.startswith("model.language_model.") for k in load_file(str(v5 / "model.safetensors")))
    m5 = checkpoint.load(v5)
    _assert_logits_match(tm5, m5, *_encode(_images()))


def test_flat_and_nested_configs_agree(qwen):
    import json

    from ep_jax.families.qwen2_5_vl.config import Qwen25VLConfig

    d, tm, model = qwen
    flat = Qwen25VLConfig.from_hf_dict(json.loads((d / "config.json").read_text()))
    nested = Qwen25VLConfig.from_hf_dict(tm.config.to_dict())
    assert flat.text == nested.text and flat.vision == nested.vision
    assert flat.text.mrope_section == (2, 3, 3) and not flat.text.attention_o_bias and flat.text.attention_bias
    assert Qwen25VLConfig.from_hf_dict(flat.to_hf_dict()) == flat


def test_presets_match_the_hub_shapes():
    from ep_jax import presets
    from ep_jax.families.qwen2_5_vl import preset_fields
    from ep_jax.families.qwen2_5_vl.config import Qwen25VLConfig

    shapes = {"3b": (36, 2048, 16, 2, 11008), "7b": (28, 3584, 28, 4, 18944), "32b": (64, 5120, 40, 8, 27648),
              "72b": (80, 8192, 64, 8, 29568)}
    for name, (layers, d, heads, kv, f) in shapes.items():
        cfg = Qwen25VLConfig.from_hf_dict({
            "model_type": "qwen2_5_vl", "vocab_size": 152064, "hidden_size": d, "intermediate_size": f,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
            "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vision_config": {"out_hidden_size": d}})
        preset = presets.get(f"qwen2.5-vl-{name}-instruct")
        flat = preset_fields(cfg)
        assert all(flat[k] == v for k, v in preset.match.items()), name
        assert preset.prune_layer == 1 and preset.template == "qwen2_5_vl"


def test_buckets_keep_graphs_few_for_random_image_sizes():
    from ep_jax.families.llava_next import slot_bucket
    from ep_jax.families.qwen2_5_vl.processing import smart_resize
    from ep_jax.families.qwen2_5_vl.vision import patch_bucket

    rng = np.random.default_rng(0)
    keys = set()
    for h, w in rng.integers(224, 1400, (50, 2)):
        hh, ww = smart_resize(int(h), int(w))
        p = (hh // 14) * (ww // 14)
        keys.add((patch_bucket(p), slot_bucket(p // 4)))
    assert len(keys) <= 6


@pytest.mark.parametrize("query_block", [1024, 384])
def test_vision_tower_matches_transformers(query_block, qwen, monkeypatch):
    import jax.numpy as jnp

    from ep_jax.families.qwen2_5_vl import vision

    monkeypatch.setattr(vision, "QUERY_BLOCK", query_block)  # 384: three blocks of queries, the last short
    _, tm, model = qwen
    _, pixels, mask, grid = _encode(_images())
    ids = np.full((1, int((grid.prod(1) // 4).sum())), QWEN_IMAGE)
    inputs, _ = model.family.inputs(model.config, ids, pixels, None, image_grid_thw=grid)
    merged = np.asarray(model.module.image_features({k: jnp.asarray(v) for k, v in inputs.items()}))
    got = merged[inputs["feature_index"][0]]  # back in image order
    with torch.no_grad():
        ref = tm.model.visual(torch.tensor(pixels), grid_thw=torch.tensor(grid)).pooler_output.numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_block_runs_loop_over_the_period_of_the_layer_pattern():
    """The tower's blocks run as one copy of each run of the pattern's period, looped over."""
    from ep_jax.families.qwen2_5_vl.config import QwenVisionConfig
    from ep_jax.families.qwen2_5_vl.vision import block_runs

    def runs(depth, full):
        return block_runs(QwenVisionConfig(depth=depth, fullatt_block_indexes=full))

    assert runs(32, (7, 15, 23, 31)) == ([(0, 7, False), (7, 8, True)], 4)  # every Qwen2.5-VL size
    assert runs(6, (1, 4)) == ([(0, 1, False), (1, 2, True), (2, 3, False)], 2)  # a run across the period's end
    assert runs(5, (1,)) == ([(0, 1, False), (1, 2, True), (2, 5, False)], 1)  # no period
    assert runs(4, ()) == ([(0, 1, False)], 4)


def test_two_images_in_one_row_and_a_text_only_row(qwen):
    _, tm, model = qwen
    _, pixels, _, grid = _encode(_images())
    n = grid.prod(1) // 4
    row0 = [20, QWEN_VSTART] + [QWEN_IMAGE] * int(n[0]) + [QWEN_VEND, 21, QWEN_VSTART] + [QWEN_IMAGE] * int(n[1]) \
        + [QWEN_VEND, 22, 23]
    row1 = [24, 25, 26, 27]
    ids = np.zeros((2, len(row0)), np.int64)
    mask = np.zeros_like(ids)
    ids[0], mask[0] = row0, 1
    ids[1, -4:], mask[1, -4:] = row1, 1
    with torch.no_grad():
        ref = tm(**_torch(tm, ids, pixels, mask, grid)).logits.numpy()
    got = ep_jax.forward(model, ids, pixels, mask, image_grid_thw=grid).logits
    valid = mask.astype(bool)
    np.testing.assert_allclose(got[valid], ref[valid], atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["fastv", "pool"])
def test_other_methods_run(method, qwen):
    _, _, model = qwen
    ids, pixels, mask, grid = _encode(_images())
    cfg = PruneConfig(method=method, layer=2, keep_ratio=0.5)
    out = ep_jax.forward(model, ids, pixels, mask, image_grid_thw=grid, prune=cfg)
    assert np.isfinite(out.logits[out.row_valid]).all()
    kept_visual = [(out.kept_mask[i] & (ids[i] == QWEN_IMAGE)).sum() for i in range(2)]
    np.testing.assert_array_equal(kept_visual, out.keep)


def test_conversion_round_trip(qwen, tmp_path):
    d, tm, model = qwen
    ep_dir = checkpoint.convert_hf(d, tmp_path / "ep", progress=False)
    back = checkpoint.export_hf(ep_dir, tmp_path / "hf")
    reloaded = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(back).eval()
    ids, pixels, mask, grid = _encode(_images())
    with torch.no_grad():
        want = tm(**_torch(tm, ids, pixels, mask, grid)).logits.numpy()
        ref = reloaded(**_torch(reloaded, ids, pixels, mask, grid)).logits.numpy()
    valid = mask.astype(bool)
    np.testing.assert_allclose(ref[valid], want[valid], atol=1e-5, rtol=0)
    got = ep_jax.forward(checkpoint.load(ep_dir), ids, pixels, mask, image_grid_thw=grid).logits
    np.testing.assert_allclose(got[valid], want[valid], atol=1e-4, rtol=0)


def test_forward_takes_the_processor_keys(qwen):
    _, _, model = qwen
    enc = model.processor.encode(PROMPTS, _images(), bucket_sizes=None)
    enc.pop("lengths")
    enc["mm_token_type_ids"] = (enc["input_ids"] == QWEN_IMAGE).astype(np.int64)
    full = ep_jax.forward(model, **enc).logits
    grid = enc.pop("image_grid_thw")  # the processor's pixels carry their grids
    np.testing.assert_array_equal(enc["pixel_values"].image_grid_thw, grid)
    np.testing.assert_array_equal(ep_jax.forward(model, **enc).logits, full)


def test_pruned_decode_continues_from_the_unpruned_positions(qwen):
    """Decode after pruning continues M-RoPE from the unpruned prompt (max position + 1 on all
    three rows): the decode step's logits equal the pruned forward pass over prompt + that token
    (appended text changes no visual score, so the same visual tokens are kept)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from ep_jax.runtime.prefill import decode, last_rows, prefill

    _, _, model = qwen
    cfg = PruneConfig(layer=1, keep_ratio=0.25)
    enc = model.processor.encode(PROMPTS, _images(), bucket_sizes=None)
    grid = enc["image_grid_thw"]
    inputs, spans, stage, extra = api.prepare(model, enc["input_ids"], enc["pixel_values"], enc["attention_mask"],
                                              prune=cfg, image_grid_thw=grid)
    @jax.jit
    def prefill_and_step(state, inputs, spans, extra):
        module = nnx.merge(model.graphdef, state)
        res = prefill(module, inputs, spans, stage, extra, decode_room=2)
        token = jnp.argmax(module.logits(res.hidden[jnp.arange(2), last_rows(res)]), -1).astype(jnp.int32)
        return token, decode(module, token, res.cache)[0]

    token, step = prefill_and_step(model.state, inputs, spans, extra)
    ids = np.concatenate([enc["input_ids"], np.asarray(token)[:, None]], 1)
    mask = np.concatenate([enc["attention_mask"], np.ones((2, 1), enc["attention_mask"].dtype)], 1)
    out = ep_jax.forward(model, ids, enc["pixel_values"], mask, image_grid_thw=grid, prune=cfg)
    want = np.stack([out.logits[i][out.row_valid[i]][-1] for i in range(2)])
    np.testing.assert_allclose(np.asarray(step), want, atol=1e-4, rtol=0)


def test_config_and_input_errors(qwen):
    import json

    from ep_jax.errors import ConfigError, InputError
    from ep_jax.families.qwen2_5_vl.config import Qwen25VLConfig

    d, _, model = qwen
    flat = json.loads((d / "config.json").read_text())
    with pytest.raises(ConfigError, match="mrope_section"):
        Qwen25VLConfig.from_hf_dict({**flat, "rope_scaling": None})
    with pytest.raises(ConfigError, match="head_dim"):
        Qwen25VLConfig.from_hf_dict({**flat, "rope_scaling": {"type": "mrope", "mrope_section": [4, 4, 4]}})
    ids, pixels, mask, grid = _encode(_images())
    with pytest.raises(InputError, match="image_grid_thw"):
        model.family.inputs(model.config, ids, np.asarray(pixels), mask)
    with pytest.raises(InputError, match="image tokens"):
        model.family.inputs(model.config, ids, pixels, mask, image_grid_thw=grid[::-1])


def test_ecl_profile_runs_on_the_family(qwen):
    """The Entropy Collapse Layer profile through the runtime's observer: one set entropy per
    layer boundary and one score summary per layer, for two images of different N in one batch;
    each image's profile equals its profile alone."""
    from ep_jax.analysis import ecl

    _, _, model = qwen
    images = _images()
    both = ecl.profile_images(model, images, batch_size=2)
    layers = model.config.text.num_layers
    assert both.set_entropy.shape == (2, layers + 1) and np.isfinite(both.set_entropy).all()
    assert both.score_mean.shape == (2, layers)
    alone = ecl.profile_images(model, images[1:], batch_size=1)
    np.testing.assert_allclose(both.set_entropy[1], alone.set_entropy[0], atol=1e-4)



def test_cli_answers_about_an_image_with_explain(qwen, tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    d, _, model = qwen
    img = tmp_path / "photo.png"
    _images([(150, 100)])[0].save(img)
    r = subprocess.run([sys.executable, "-m", "ep_jax.generate", "--model", str(d), "--image", str(img), "--prompt",
                        PROMPTS[0], "--max-new-tokens", "6", "--keep-ratio", "0.25", "--json",
                        "--explain", str(tmp_path / "kept.png")],
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent, timeout=600)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    want = ep_jax.generate(model, [PIL.Image.open(img)], [PROMPTS[0]], max_new_tokens=6,
                           prune=PruneConfig(layer=1, keep_ratio=0.25), return_ids=True)[1][0]
    assert out["token_ids"][0] == list(map(int, want))
    assert PIL.Image.open(tmp_path / "kept.png").size[0] >= 100  # drawn on the original image
