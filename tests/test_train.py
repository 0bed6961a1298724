"""The training recipe and the quality benchmark, on a micro model trained for a few steps."""

from __future__ import annotations

import json

import numpy as np
import pytest

MICRO = dict(steps=4, batch=2, warmup=1, val_every=100, val_n=6, test_n=6, vision_width=32,
             vision_layers=1, vision_heads=2, text_width=32, text_layers=4, text_heads=2, text_mlp=64)


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    from ep_jax.train import Recipe, train

    out = tmp_path_factory.mktemp("micro")
    result = train(out, Recipe(**MICRO), progress=False)
    return out, result


def test_training_is_deterministic_and_saves_a_loadable_model(micro, tmp_path):
    import jax

    import ep_jax
    from ep_jax.train import AUX_CLASSES, Recipe, train

    out, result = micro
    again = train(tmp_path / "again", Recipe(**MICRO), progress=False)
    assert result["steps_done"] == again["steps_done"] == MICRO["steps"]
    assert result["history"][-1]["loss"] == again["history"][-1]["loss"]
    # The trained weights themselves, every array bit for bit (as saved and loaded back).
    first, second = (jax.tree_util.tree_flatten_with_path(ep_jax.load(d).params())[0] for d in (out, tmp_path / "again"))
    assert [path for path, _ in first] == [path for path, _ in second] and len(first) > 10
    for (path, a), (_, b) in zip(first, second):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
    # ...and training moved them: norms start at scale 1 / bias 0 (measured max change 4e-3).
    norms = [(np.asarray(a), "bias" in jax.tree_util.keystr(path)) for path, a in first if "norm" in jax.tree_util.keystr(path)]
    assert norms and max(np.abs(a - (0.0 if is_bias else 1.0)).max() for a, is_bias in norms) > 1e-3
    assert np.isfinite(result["history"][-1]["loss"])
    assert set(result["val"]) == {"overall", "color", "shape", "count", "exist", "position"}
    patches = result["history"][-1]["val_patches"]
    assert set(patches) == set(AUX_CLASSES) and all(0.0 <= v <= 1.0 for v in patches.values())
    model = ep_jax.load(out)
    assert model.config.image_seq_len == 196  # 224 px / 16 px patches: a 14 x 14 grid
    assert model.processor.image_token_id == 4
    log = json.loads((out / "train_log.json").read_text())
    assert log["recipe"]["steps"] == MICRO["steps"] and set(log["test"]) == set(log["val"])
    card = (out / "MODEL_CARD.md").read_text()
    assert "--set steps=4" in card and "Test accuracy" in card and "| 4 |" in card


def test_transformers_greedy_parity_after_export(micro, tmp_path):
    """The exported Hugging Face directory gives transformers' greedy answers equal to ep_jax's."""
    import torch
    from transformers import LlavaForConditionalGeneration

    import ep_jax
    from ep_jax.data import scenes

    model = ep_jax.load(micro[0])
    hf = LlavaForConditionalGeneration.from_pretrained(ep_jax.export_hf(model, tmp_path / "hf")).eval()
    samples = scenes.generate("test", 5, seed=0, image_size=224)
    texts, ids = ep_jax.generate(model, [s.image for s in samples], [s.question for s in samples],
                                 max_new_tokens=4, template="llava_hf", return_ids=True)
    proc = model.processor
    for s, want in zip(samples, ids):
        enc = proc.encode([s.question], [[s.image]], template="llava_hf", bucket_sizes=None)
        with torch.no_grad():
            out = hf.generate(input_ids=torch.from_numpy(enc["input_ids"]).long(),
                              pixel_values=torch.from_numpy(enc["pixel_values"]),
                              max_new_tokens=4, do_sample=False, eos_token_id=2, pad_token_id=proc.pad_token_id)
        new = out[0, enc["input_ids"].shape[1]:].tolist()
        assert new[: len(want)] == want


def test_default_budgets_keep_fractions():
    from ep_jax.core.budget import budget
    from ep_jax.quality import default_budgets

    a = default_budgets(196, 4, 2)
    assert a == (131, 120, 109, 104, 101)
    # R = 2A - 196 moves in steps of 2 here: the kept counts are the targets up to one step.
    kept = [budget(x, 4, 2, 196) for x in a]
    assert all(abs(r - t) <= 1 for r, t in zip(kept, (65, 44, 22, 11, 5))), kept
    # At K = 1 the same fractions need smaller averages.
    kept = [budget(x, 4, 1, 196) for x in default_budgets(196, 4, 1)]
    assert all(abs(r - t) <= 1 for r, t in zip(kept, (65, 44, 22, 11, 5))), kept


def test_quality_benchmark_end_to_end(micro, tmp_path):
    from ep_jax.quality import run_quality

    res = run_quality(micro[0], methods=("none", "entropy", "pool"), budgets=(130,), layers=(1, 2), n=20, batch=20,
                      out_dir=tmp_path, progress=False)
    assert [(r["method"], r["layer"]) for r in res["results"]] == [
        ("none", None), ("entropy", 1), ("entropy", 2), ("pool", 1), ("pool", 2)]
    for r in res["results"]:
        assert set(r["accuracy"]) == {"overall", "color", "shape", "count", "exist", "position"}
        assert 0.0 <= r["accuracy"]["overall"] <= 1.0 and 0.0 <= r["agreement"] <= 1.0
    none, entropy1, entropy2 = res["results"][:3]
    assert none["keep"] == 196 and entropy2["keep"] == 64 and entropy1["keep"] == 108  # R = (4A - K*196) / (4 - K)
    assert none["agreement"] == 1.0
    assert 0.0 < entropy2["flops_reduction"] < entropy1["flops_reduction"] < 1.0
    on_disk = json.loads((tmp_path / "quality.json").read_text())
    assert on_disk["n"] == 20 and len(on_disk["results"]) == 5 and on_disk["budgets"] == {"1": [130], "2": [130]}
    md = (tmp_path / "quality.md").read_text()
    assert md.count("\n| entropy |") == 2 and "| none |" in md
    png = (tmp_path / "quality.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_patch_targets_mark_each_object():
    from ep_jax.data import scenes
    from ep_jax.data.encoding import GRID, PATCH, patch_targets

    samples = scenes.generate("train", 20, seed=3)
    t = patch_targets(samples)
    assert t["aux_color"].shape == t["aux_shape"].shape == t["aux_center"].shape == (20, GRID * GRID)
    for i, s in enumerate(samples):
        assert t["aux_center"][i].sum() == len(s.objects)  # one flagged cell per object: counting
        for o in s.objects:
            cell = int(o.center[1] // PATCH) * GRID + int(o.center[0] // PATCH)
            assert t["aux_center"][i, cell] == 1
            assert t["aux_color"][i, cell] == 1 + list(scenes.COLORS).index(o.color)
            assert t["aux_shape"][i, cell] == 1 + scenes.SHAPES.index(o.shape)
        on = t["aux_color"][i] > 0
        assert np.array_equal(on, t["aux_shape"][i] > 0) and on.sum() >= len(s.objects)
        assert np.array_equal(on, t["aux_quadrant"][i] > 0)
        for o in s.objects:  # the board keeps every object inside one quadrant
            cell = int(o.center[1] // PATCH) * GRID + int(o.center[0] // PATCH)
            quadrant = scenes.QUADRANTS[t["aux_quadrant"][i, cell] - 1]
            assert quadrant == scenes.quadrant_of(*o.center, 224)


def test_extra_questions_are_deterministic_and_cover_every_type():
    from collections import Counter

    from ep_jax.data import scenes
    from ep_jax.data.encoding import extra_questions

    samples = scenes.generate("train", 60, seed=1)
    picks = [extra_questions(s, 4) for s in samples]
    assert picks == [extra_questions(s, 4) for s in samples]
    asked = Counter()
    for s, qs in zip(samples, picks):
        valid = {q: a for q, a, _ in scenes.scene_questions(s.objects, 224)}
        assert len(qs) == 4 and all(valid[q] == a for q, a in qs)
        assert len({q for q, _ in qs} | {s.question}) == 5  # nothing asked twice
        asked.update(t for q, _, t in scenes.scene_questions(s.objects, 224) if (q, valid[q]) in qs)
    assert set(asked) == set(scenes.QUESTION_TYPES)
    answers = Counter(a for qs in picks for _, a in qs)
    assert answers["yes"] > 0 and answers["no"] > 0


def test_encoder_rows_start_with_the_inference_prompt_and_label_every_answer(tmp_path):
    from ep_jax.data import scenes
    from ep_jax.processing import ImageProcessor, Processor
    from ep_jax.data.encoding import Encoder, build_tokenizer, extra_questions, write_preprocessor
    from ep_jax.train import Recipe

    tok = build_tokenizer(tmp_path, Recipe.vocab_size)
    write_preprocessor(tmp_path)
    proc = Processor(tok, ImageProcessor.from_dir(tmp_path), image_seq_len=196)
    enc = Encoder(proc, extra=2)
    samples = scenes.generate("train", 6, seed=2)
    batch, single = enc.batch(samples), enc.batch(samples, extra=0)
    assert batch["input_ids"].shape == (6, enc.seq_len) and single["input_ids"].shape == (6, enc.single_len)
    for i, s in enumerate(samples):
        ref = proc.encode([s.question], [[s.image]], template="llava_hf", bucket_sizes=None)["input_ids"][0]
        assert np.array_equal(batch["input_ids"][i, : len(ref)], ref)
        assert np.array_equal(single["input_ids"][i, : len(ref)], ref)
        w = batch["weight"][i] > 0
        # Each labelled row predicts the next token of the sequence: the answers and their EOS.
        assert np.array_equal(batch["input_ids"][i, batch["pos"][i, w] + 1], batch["labels"][i, w])
        said = tok.decode(batch["labels"][i, w], skip_special_tokens=False).split("</s>")[:-1]
        assert [a.strip() for a in said] == [s.answer] + [a for _, a in extra_questions(s, 2)]


def test_attention_targets_point_at_the_evidence(tmp_path):
    from ep_jax.data import scenes
    from ep_jax.processing import ImageProcessor, Processor
    from ep_jax.data.encoding import COVERED, GRID, Encoder, build_tokenizer, write_preprocessor
    from ep_jax.train import Recipe

    tok = build_tokenizer(tmp_path, Recipe.vocab_size)
    write_preprocessor(tmp_path)
    enc = Encoder(Processor(tok, ImageProcessor.from_dir(tmp_path), image_seq_len=196), extra=3)
    samples = scenes.generate("train", 10, seed=4)
    batch = enc.batch(samples)
    target, on, words = batch["attn_target"], batch["attn_on"], batch["word_target"]
    assert target.shape == words.shape == (10, batch["pos"].shape[1], enc.seq_len)
    # One distribution per answer token, none for the EOS that ends each of the 4 turns.
    assert on.sum() == batch["weight"].sum() - 10 * 4
    assert np.allclose(target.sum(-1), on) and np.allclose(words.sum(-1), on)
    image = batch["input_ids"] == tok.convert_tokens_to_ids("<image>")
    assert np.all(batch["input_ids"][:, 0] == tok.bos_token_id)
    for i, s in enumerate(samples):
        rows = np.flatnonzero(image[i])
        cover = scenes.object_coverage(s.objects, 224, GRID).reshape(len(s.objects), -1)
        k = 0  # the first turn asks the sample's own question
        said = tok.decode(batch["input_ids"][i, np.flatnonzero(words[i, k])]).split()
        assert said == scenes.key_words(s.question) and said
        hits, counting = scenes.referents(s.question, s.objects)
        seen = np.flatnonzero(target[i, k])
        assert set(seen) <= set(rows) | {0}
        if counting:
            assert len(seen) == len(hits) + 1 and 0 in seen  # one centre patch each, and BOS
        elif not hits:
            assert list(seen) == [0]
        else:
            assert set(seen) == set(rows[np.flatnonzero(cover[hits[0]] >= COVERED)])
