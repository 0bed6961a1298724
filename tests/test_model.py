"""Parity of the Flax LLaVA with Hugging Face transformers (PyTorch, float32)."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import photo

import ep_jax

TOL = 1e-4


def _hf_inputs(processor, model, prompts, images):
    texts = [model.processor.format(p) for p in prompts]
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


@pytest.mark.parametrize("name", ["mha", "gqa"])
def test_vision_tower_hidden_states_match(name, tiny_dirs, tiny_model):
    _, tm, proc = tiny_dirs(name)
    model = tiny_model(name)
    pixels = proc.image_processor([photo("astronaut"), photo("coffee")], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref = tm.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    module = model.module
    for layer, want in enumerate(ref):
        got = module.vision(jnp.asarray(pixels.numpy()), layer)
        chex.assert_shape(got, want.shape)
        np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["mha", "gqa"])
def test_projector_output_matches(name, tiny_dirs, tiny_model):
    _, tm, proc = tiny_dirs(name)
    model = tiny_model(name)
    pixels = proc.image_processor([photo("chelsea")], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref = tm.model.get_image_features(pixel_values=pixels)
    ref = ref.pooler_output if hasattr(ref, "pooler_output") else ref
    ref = torch.stack(list(ref)) if isinstance(ref, (list, tuple)) else ref
    got = np.asarray(model.module.image_features(jnp.asarray(pixels.numpy())))
    assert got.shape == (1, model.config.image_seq_len, model.config.text.hidden_size)
    np.testing.assert_allclose(got, ref.numpy().reshape(got.shape), atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["mha", "gqa"])
def test_full_logits_match(name, tiny_dirs, tiny_model):
    _, tm, proc = tiny_dirs(name)
    model = tiny_model(name)
    enc = _hf_inputs(proc, model, ["What is in the image? Describe it."], [photo("astronaut")])
    with torch.no_grad():
        ref = tm(**enc).logits.numpy()
    out = ep_jax.forward(model, enc["input_ids"].numpy(), enc["pixel_values"].numpy(), enc["attention_mask"].numpy())
    assert out.logits.shape == ref.shape
    np.testing.assert_allclose(out.logits, ref, atol=TOL, rtol=0)
    np.testing.assert_array_equal(out.positions[0], np.arange(ref.shape[1]))
    assert np.abs(ref).max() > 0.1  # the comparison is not between near-zero tensors


def test_padding_on_either_side_changes_nothing(tiny_model):
    model = tiny_model("mha")
    enc = model.processor.encode(["Is there a cat?"], [photo("chelsea")], bucket_sizes=None)
    ids, mask, px = enc["input_ids"], enc["attention_mask"], enc["pixel_values"]
    base = ep_jax.forward(model, ids, px, mask).logits[0]
    pad = model.processor.pad_token_id
    for side in ("left", "right"):
        extra = np.full((1, 7), pad, np.int32)
        zeros = np.zeros((1, 7), np.int32)
        p_ids = np.concatenate([extra, ids] if side == "left" else [ids, extra], 1)
        p_mask = np.concatenate([zeros, mask] if side == "left" else [mask, zeros], 1)
        logits = ep_jax.forward(model, p_ids, px, p_mask).logits[0]
        real = logits[7:] if side == "left" else logits[:-7]
        np.testing.assert_allclose(real, base, atol=1e-5, rtol=0)


def test_image_features_go_to_each_examples_own_slots(tiny_model):
    """Two examples with their image at different offsets: each row equals its solo run."""
    model = tiny_model("mha")
    images = [photo("astronaut"), photo("coffee")]
    prompts = ["Describe this.", "Is the cup full of coffee or of tea? Answer in one word."]
    enc = model.processor.encode(prompts, images, pad_side="right", bucket_sizes=None)
    both = ep_jax.forward(model, enc["input_ids"], enc["pixel_values"], enc["attention_mask"]).logits
    for i in range(2):
        solo = model.processor.encode([prompts[i]], [images[i]], bucket_sizes=None)
        ref = ep_jax.forward(model, solo["input_ids"], solo["pixel_values"]).logits[0]
        np.testing.assert_allclose(both[i, : ref.shape[0]], ref, atol=1e-5, rtol=0)


def test_bad_inputs_give_clear_errors(tiny_model):
    from ep_jax.errors import InputError

    model = tiny_model("mha")
    enc = model.processor.encode(["hi"], [photo()])
    with pytest.raises(InputError, match="image tokens"):
        ep_jax.forward(model, enc["input_ids"], None, enc["attention_mask"])
    with pytest.raises(InputError, match="pixel_values"):
        ep_jax.forward(model, enc["input_ids"], enc["pixel_values"][:, :, :8], enc["attention_mask"])
    with pytest.raises(InputError, match="vocabulary"):
        ep_jax.forward(model, enc["input_ids"] + 10_000, enc["pixel_values"])


def test_compile_time_does_not_grow_with_depth():
    """Layers run in a scan: the lowered program has one loop body however deep the model."""
    import jax

    from ep_jax.config import LlavaConfig, TextConfig, VisionConfig
    from ep_jax.core.spans import VisualSpans
    from ep_jax.families.llava import FAMILY
    from ep_jax.runtime.api import prefill_logits
    from ep_jax.runtime.model import abstract_model

    sizes = {}
    for layers in (2, 8):
        cfg = LlavaConfig(
            vision=VisionConfig(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, image_size=32, patch_size=8),
            text=TextConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_layers=layers, num_heads=4,
                            num_kv_heads=4, head_dim=16),
            image_token_id=5,
        )
        graphdef, state = abstract_model(FAMILY, cfg, jnp.float32)
        sds = jax.ShapeDtypeStruct
        inputs = {"input_ids": sds((1, 32), jnp.int32), "pixel_values": sds((1, 3, 32, 32), jnp.float32),
                  "attention_mask": sds((1, 32), jnp.bool_)}
        spans = VisualSpans(*(sds((1, 16), t) for t in (jnp.int32, jnp.bool_, jnp.int32)),
                            sds((1, 16, 3), jnp.int32), sds((1, 16, 3), jnp.int32))
        fn = jax.jit(lambda s, i, sp: prefill_logits(graphdef, s, i, sp, None, stage=None, decode_room=0,
                                                     all_logits=True))
        sizes[layers] = len(fn.lower(state, inputs, spans).as_text())
    assert abs(sizes[8] - sizes[2]) < 0.02 * sizes[2], sizes
