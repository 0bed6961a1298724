"""EntropyPrune inside the jitted model: exactness, the PyTorch reference, batching, static graphs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import photo
from torch_reference import pruned_forward, pruned_greedy

import ep_jax
from ep_jax import PruneConfig
from ep_jax.errors import InputError
from ep_jax.runtime.engine import compile_stats


def _encode(model, prompt="What is in the image? Describe it.", image="astronaut"):
    return model.processor.encode([prompt], [photo(image)], bucket_sizes=None)


def test_keep_all_reproduces_unpruned_logits(tiny_model):
    model = tiny_model("mha")
    enc = _encode(model)
    n = model.config.image_seq_len
    base = ep_jax.forward(model, enc["input_ids"], enc["pixel_values"])
    for layer in (1, 2, 3):
        out = ep_jax.forward(model, enc["input_ids"], enc["pixel_values"], prune=PruneConfig(layer=layer, keep=n))
        np.testing.assert_array_equal(out.positions, base.positions)
        np.testing.assert_allclose(out.logits, base.logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layer", [1, 2, 3])
@pytest.mark.parametrize("keep", [4, 11])
def test_matches_pytorch_reference(layer, keep, tiny_dirs, tiny_model):
    _, tm, _ = tiny_dirs("mha")
    model = tiny_model("mha")
    enc = _encode(model)
    ids_t = torch.tensor(enc["input_ids"], dtype=torch.long)
    ref_logits, ref_kept = pruned_forward(tm, ids_t, torch.tensor(enc["pixel_values"]), layer, keep)
    out = ep_jax.forward(model, enc["input_ids"], enc["pixel_values"], prune=PruneConfig(layer=layer, keep=keep))
    np.testing.assert_array_equal(out.positions[0], ref_kept.numpy())
    assert out.positions.shape[1] == enc["input_ids"].shape[1] - model.config.image_seq_len + keep
    np.testing.assert_allclose(out.logits, ref_logits.numpy(), atol=1e-4, rtol=0)


def test_greedy_generation_matches_pytorch_reference(tiny_dirs, tiny_model):
    _, tm, _ = tiny_dirs("mha")
    model = tiny_model("mha")
    prompt, img = "Describe the photo.", photo("coffee")
    cfg = PruneConfig(layer=2, keep=5)
    ids = ep_jax.generate(model, [img], [prompt], max_new_tokens=20, prune=cfg, return_ids=True)[1][0]
    enc = model.processor.encode([prompt], [img], bucket_sizes=None)
    ref = pruned_greedy(tm, torch.tensor(enc["input_ids"], dtype=torch.long), torch.tensor(enc["pixel_values"]),
                        2, 5, steps=len(ids))
    assert ids == ref
    unpruned = ep_jax.generate(model, [img], [prompt], max_new_tokens=20, return_ids=True)[1][0]
    assert ids != unpruned  # with 5 of 16 visual tokens the answer does change on this model


@pytest.mark.parametrize("method", ["entropy", "fastv", "random", "pool"])
def test_gather_equals_mask_mode(method, tiny_model):
    model = tiny_model("gqa")
    enc = _encode(model, image="chelsea")
    kw = dict(method=method, layer=2, keep=6)
    gathered = ep_jax.forward(model, enc["input_ids"], enc["pixel_values"], prune=PruneConfig(**kw))
    masked = ep_jax.forward(model, enc["input_ids"], enc["pixel_values"], prune=PruneConfig(mode="mask", **kw))
    np.testing.assert_array_equal(gathered.kept_mask, masked.kept_mask)
    rows = gathered.positions[0]
    np.testing.assert_allclose(gathered.logits[0], masked.logits[0, rows], atol=1e-5, rtol=0)
    assert masked.logits.shape[1] == enc["input_ids"].shape[1]


def test_batch_with_different_prompt_lengths_equals_single_runs(tiny_model):
    model = tiny_model("mha")
    prompts = ["Hi?", "What is in the image? Describe the photo in detail please.", "Count the circles."]
    images = [photo("chelsea"), photo("astronaut"), photo("coffee")]
    cfg = PruneConfig(layer=2, avg_keep=8)
    batch = ep_jax.generate(model, images, prompts, max_new_tokens=10, prune=cfg, return_ids=True)[1]
    enc = model.processor.encode(prompts, [[im] for im in images])
    fwd = ep_jax.forward(model, enc["input_ids"], enc["pixel_values"], enc["attention_mask"], prune=cfg)
    for i, (img, prompt) in enumerate(zip(images, prompts)):
        assert batch[i] == ep_jax.generate(model, [img], [prompt], max_new_tokens=10, prune=cfg, return_ids=True)[1][0]
        solo = model.processor.encode([prompt], [img], bucket_sizes=None)
        one = ep_jax.forward(model, solo["input_ids"], solo["pixel_values"], prune=cfg)
        real = fwd.kept_mask[i][fwd.positions[i]]  # rows of real (non-padding) tokens
        np.testing.assert_allclose(fwd.logits[i][real], one.logits[0], atol=1e-5, rtol=0)
        offset = enc["input_ids"].shape[1] - solo["input_ids"].shape[1]  # left padding
        np.testing.assert_array_equal(fwd.positions[i][real] - offset, one.positions[0])


def test_kept_tokens_follow_entropy_ranking(tiny_model):
    model = tiny_model("mha")
    enc = _encode(model)
    out = ep_jax.forward(model, enc["input_ids"], enc["pixel_values"], prune=PruneConfig(layer=2, keep=5))
    kept_visual = out.kept_mask[0][out.visual_positions[0]]
    assert kept_visual.sum() == 5
    assert out.scores[0][kept_visual].min() >= out.scores[0][~kept_visual].max()
    text = enc["input_ids"][0] != model.config.image_token_id
    assert out.kept_mask[0][text].all()


def test_no_recompilation_and_no_host_callback(tiny_model):
    model = tiny_model("mha")
    cfg = PruneConfig(layer=2, avg_keep=8)
    ep_jax.generate(model, [photo("chelsea")], ["What animal is this?"], max_new_tokens=4, prune=cfg)
    before = compile_stats(model)["compiles"]
    ep_jax.generate(model, [photo("coffee")], ["What is in the cup?"], max_new_tokens=4, prune=cfg)
    assert compile_stats(model)["compiles"] == before

    from ep_jax.runtime.api import prefill_logits, prepare

    enc = _encode(model)
    inputs, spans, stage, extra = prepare(model, enc["input_ids"], enc["pixel_values"], enc["attention_mask"],
                                          prune=cfg)
    jaxpr = jax.make_jaxpr(
        lambda s, i, sp, ex: prefill_logits(model.graphdef, s, i, sp, ex, stage=stage, decode_room=8, all_logits=False)
    )(model.state, inputs, spans, extra)
    text = str(jaxpr)
    assert "top_k" in text and "eigh" in text  # the prune stage is in the graph...
    for prim in ("callback", "pure_callback", "io_callback", "debug_callback", "infeed", "outfeed"):
        assert prim not in text  # ...with no host round trip


@pytest.mark.parametrize("cfg,match", [
    (dict(layer=2, keep=17), "keep"),
    (dict(layer=2, avg_keep=1), "cannot be met"),
    (dict(layer=4, keep=4), "layer"),
    (dict(layer=9, avg_keep=8), "layer"),
])
def test_bad_budgets_are_clear_errors(cfg, match, tiny_model):
    model = tiny_model("mha")
    enc = _encode(model)
    with pytest.raises(ValueError, match=match):
        ep_jax.forward(model, enc["input_ids"], enc["pixel_values"], prune=PruneConfig(**cfg))


def test_layer_zero_is_a_clear_error():
    with pytest.raises(ValueError, match="layer"):
        PruneConfig(layer=0, keep=4)


def test_auto_layer_uses_the_preset_else_measures(tiny_dirs, capsys):
    import dataclasses

    from ep_jax.presets import Preset

    model = ep_jax.load(tiny_dirs("mha")[0])
    enc = _encode(model)
    args = (enc["input_ids"], enc["pixel_values"])
    # The tiny random model has a flat entropy profile: measuring finds no collapse, and says so.
    with pytest.raises(InputError, match="not guessing"):
        ep_jax.forward(model, *args, prune=PruneConfig(layer="auto", keep=4))
    model.preset = Preset(name="t", prune_layer=3)
    auto = ep_jax.forward(model, *args, prune=PruneConfig(layer="auto", keep=4))
    fixed = ep_jax.forward(model, *args, prune=PruneConfig(layer=3, keep=4))
    assert auto.stage.layer == 3 and auto.stage == dataclasses.replace(fixed.stage)
    np.testing.assert_array_equal(auto.logits, fixed.logits)
    model.preset = None
    model.compiled["measured_layer"] = 1  # as if measured before: reused, not re-measured
    assert ep_jax.forward(model, *args, prune=PruneConfig(layer="auto", keep=4)).stage.layer == 1
