"""Generation: parity with transformers' greedy generate, batching, decode logits, compile counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import photo

import ep_jax
from ep_jax.runtime.engine import compile_stats


@pytest.mark.parametrize("name", ["mha", "gqa"])
def test_greedy_20_tokens_match_transformers(name, tiny_dirs, tiny_model):
    _, tm, proc = tiny_dirs(name)
    model = tiny_model(name)
    prompt, image = "What is in the image?", photo("astronaut")
    texts, ids = ep_jax.generate(model, [image], [prompt], max_new_tokens=20, return_ids=True)
    enc = proc(images=[image], text=[model.processor.format(prompt)], return_tensors="pt")
    with torch.no_grad():
        ref = tm.generate(**enc, max_new_tokens=20, do_sample=False)[0, enc["input_ids"].shape[1]:]
    assert ids[0] == ref.tolist()[: len(ids[0])]
    assert len(ids[0]) == 20 or ids[0][-1] in model.config.eos_ids
    assert texts[0] == model.processor.decode(np.asarray(ids[0]))


def test_decode_logits_match_teacher_forced_transformers(tiny_dirs, tiny_model):
    """Every decode step's logits equal transformers' logits on the whole sequence."""
    _, tm, proc = tiny_dirs("gqa")
    model = tiny_model("gqa")
    enc = model.processor.encode(["Describe the photo."], [photo("coffee")], bucket_sizes=None)
    rng = np.random.default_rng(0)
    forced = rng.integers(5, model.config.text.vocab_size, size=6).astype(np.int32)
    from ep_jax.runtime.prefill import decode, prefill

    module = model.module
    inputs, spans = model.family.inputs(model.config, enc["input_ids"], enc["pixel_values"], enc["attention_mask"])
    res = prefill(module, inputs, spans, None, decode_room=8)
    cache, got = res.cache, [np.asarray(module.logits(res.hidden[:, -1]))[0]]
    for tok in forced:
        logits, cache = decode(module, jnp.asarray([tok]), cache)
        got.append(np.asarray(logits)[0])
    full = np.concatenate([enc["input_ids"][0], forced])[None]
    with torch.no_grad():
        ref = tm(input_ids=torch.tensor(full, dtype=torch.long),
                 pixel_values=torch.tensor(enc["pixel_values"])).logits[0].numpy()
    want = ref[enc["input_ids"].shape[1] - 1:]
    np.testing.assert_allclose(np.stack(got), want, atol=1e-4, rtol=0)


def test_batched_generation_equals_one_by_one(tiny_model):
    model = tiny_model("mha")
    cat, astro = photo("chelsea"), photo("astronaut")
    prompts = ["Hi?", "What is in the image? Describe the photo in detail.", "How many circles are there?"]
    images = [cat, astro, cat]
    batched = ep_jax.generate(model, images, prompts, max_new_tokens=12, return_ids=True)[1]
    for img, prompt, ids in zip(images, prompts, batched):
        alone = ep_jax.generate(model, [img], [prompt], max_new_tokens=12, return_ids=True)[1][0]
        assert ids == alone


def test_streaming_and_sampling(tiny_model):
    model = tiny_model("mha")
    seen = []
    g = ep_jax.run_generation(model, [photo()], ["Describe."], max_new_tokens=10, on_token=seen.append)
    plain = ep_jax.generate(model, [photo()], ["Describe."], max_new_tokens=10, return_ids=True)[1][0]
    assert [t[0] for t in seen] == g.token_ids[0] == plain
    a = ep_jax.generate(model, [photo()], ["Describe."], max_new_tokens=10, temperature=1.0, seed=1, return_ids=True)[1]
    b = ep_jax.generate(model, [photo()], ["Describe."], max_new_tokens=10, temperature=1.0, seed=1, return_ids=True)[1]
    c = ep_jax.generate(model, [photo()], ["Describe."], max_new_tokens=10, temperature=1.0, seed=2, return_ids=True)[1]
    assert a == b and a != c


def test_sampling_filters():
    from ep_jax.runtime.sampling import sample

    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 400)
    draw = lambda **kw: np.asarray([int(sample(logits, k, 1.0, **kw)[0]) for k in keys])  # noqa: E731
    assert set(draw(top_k=2)) == {0, 1}
    assert set(draw(top_p=0.7)) == {0, 1}  # 0.5 < 0.7, then 0.8 reaches it
    assert set(draw(top_p=0.4)) == {0}
    free = draw()
    assert set(free) == {0, 1, 2, 3} and 0.4 < np.mean(free == 0) < 0.6
    assert int(sample(logits, keys[0], 0.0)[0]) == 0


def test_new_prompt_of_same_bucket_does_not_recompile(tiny_model):
    model = tiny_model("mha")
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, *a, **k: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None
    )
    ep_jax.generate(model, [photo("chelsea")], ["What animal is this?"], max_new_tokens=5)
    before, jax_before = compile_stats(model)["compiles"], len(compiles)
    ep_jax.generate(model, [photo("coffee")], ["Is the cup full? Tell me."], max_new_tokens=7)
    assert compile_stats(model)["compiles"] == before
    assert len(compiles) == jax_before, compiles[jax_before:]


def test_prompt_too_long_is_a_clear_error(tiny_model):
    from ep_jax.errors import InputError
    from ep_jax.processing import ProcessingError

    model = tiny_model("mha")
    with pytest.raises((InputError, ProcessingError), match="context"):
        ep_jax.generate(model, [photo()], ["word " * 600], max_new_tokens=4)
    with pytest.raises(InputError, match="max_new_tokens"):
        ep_jax.generate(model, [photo()], ["hi"], max_new_tokens=0)
