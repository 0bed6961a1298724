"""The two decoder weight layouts (`checkpoint.LAYOUTS`): same numbers, same checkpoint."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import photo
from torch_reference import pruned_greedy

import ep_jax
from ep_jax import PruneConfig
from ep_jax.bench_setup import get_config
from ep_jax.families.llava import FAMILY as LLAVA
from ep_jax.runtime.model import resolve_layout, with_layout
from ep_jax.runtime.api import prefill_logits, prepare

PROMPTS = ["Hi?", "What is in the image? Describe the photo in detail please."]
IMAGES = ["chelsea", "astronaut"]


@pytest.fixture(scope="module")
def both(tiny_model):
    stacked = tiny_model("gqa")  # GQA, tied embeddings
    assert stacked.layout == "stacked"  # "auto" keeps small layers stacked
    per_layer = with_layout(stacked, "per_layer")
    assert per_layer.layout == "per_layer" and per_layer.path == stacked.path
    return stacked, per_layer


@pytest.mark.parametrize("prune", [None, PruneConfig(layer=2, keep=6)])
def test_per_layer_forward_and_generation_equal_stacked(both, prune):
    stacked, per_layer = both
    images = [photo(name) for name in IMAGES]
    enc = stacked.processor.encode(PROMPTS, [[im] for im in images])  # left padding: rows differ in length
    a = ep_jax.forward(stacked, enc["input_ids"], enc["pixel_values"], enc["attention_mask"], prune=prune)
    b = ep_jax.forward(per_layer, enc["input_ids"], enc["pixel_values"], enc["attention_mask"], prune=prune)
    np.testing.assert_array_equal(a.positions, b.positions)
    np.testing.assert_allclose(a.logits, b.logits, atol=1e-5, rtol=0)
    ids_a = ep_jax.generate(stacked, images, PROMPTS, max_new_tokens=12, prune=prune, return_ids=True)[1]
    ids_b = ep_jax.generate(per_layer, images, PROMPTS, max_new_tokens=12, prune=prune, return_ids=True)[1]
    assert ids_a == ids_b


def test_per_layer_greedy_matches_pytorch_reference(tiny_dirs):
    path, tm, _ = tiny_dirs("mha")
    model = ep_jax.load(path, layout="per_layer")
    img, prompt = photo("coffee"), "Describe the photo."
    ids = ep_jax.generate(model, [img], [prompt], max_new_tokens=16, prune=PruneConfig(layer=2, keep=5),
                          return_ids=True)[1][0]
    enc = model.processor.encode([prompt], [img], bucket_sizes=None)
    ref = pruned_greedy(tm, torch.tensor(enc["input_ids"], dtype=torch.long), torch.tensor(enc["pixel_values"]),
                        2, 5, steps=len(ids))
    assert ids == ref


def test_per_layer_cache_has_one_buffer_per_layer(both):
    stacked, per_layer = both
    enc = stacked.processor.encode(PROMPTS[:1], [photo()], bucket_sizes=None)
    inputs, spans, stage, extra = prepare(stacked, enc["input_ids"], enc["pixel_values"], enc["attention_mask"],
                                          prune=PruneConfig(layer=2, keep=6))
    prefill = lambda m: prefill_logits(m.graphdef, m.state, inputs, spans, extra, stage=stage,  # noqa: E731
                                       decode_room=4, all_logits=False)
    caches = [prefill(m)[1].cache for m in (stacked, per_layer)]
    for seg_s, seg_p, (lo, hi) in zip(caches[0].segments, caches[1].segments, caches[0].bounds):
        assert isinstance(seg_p.keys, tuple) and len(seg_p.keys) == hi - lo
        assert seg_s.keys.shape == (hi - lo, *seg_p.keys[0].shape)
        assert seg_p.capacity == seg_s.capacity and seg_p.nbytes() == seg_s.nbytes()
        np.testing.assert_allclose(np.stack(seg_p.keys), seg_s.keys, atol=1e-6, rtol=0)
        np.testing.assert_array_equal(seg_p.mask, seg_s.mask)


def test_params_come_back_stacked_and_layouts_round_trip(both):
    stacked, per_layer = both
    want = stacked.params()
    got = per_layer.params()
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(np.testing.assert_array_equal, got, want)
    back = with_layout(per_layer, "stacked")
    assert back.layout == "stacked"
    jax.tree.map(np.testing.assert_array_equal, back.params(), want)
    assert with_layout(stacked, "stacked") is stacked


def test_auto_layout_depends_on_backend_and_layer_size():
    on_cpu = jax.default_backend() == "cpu"
    assert resolve_layout("auto", LLAVA, get_config("tiny"), jnp.float32) == "stacked"  # 0.16 MiB layers
    assert resolve_layout("auto", LLAVA, get_config("1b"), jnp.float32) == ("per_layer" if on_cpu else "stacked")
    assert resolve_layout("stacked", LLAVA, get_config("1b"), jnp.float32) == "stacked"
    with pytest.raises(ValueError, match="choose one of auto, stacked, per_layer"):
        resolve_layout("unrolled", LLAVA, get_config("tiny"), jnp.float32)
