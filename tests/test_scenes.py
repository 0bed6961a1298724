"""The VQA scene generator: determinism, split hygiene, and that every answer is true."""

import itertools
import json
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from ep_jax.data import ANSWERS, PHOTOS, QUESTION_TYPES, generate, iterate, make_sample, tokenizer_corpus
from ep_jax.data import render, scenes

N_PROPERTY = 300  # samples per property stream; a multiple of 10 so types and yes/no split evenly


@pytest.fixture(scope="module")
def samples():
    """A train stream at 168 px and a test stream at 224 px."""
    return generate("train", N_PROPERTY, seed=0, image_size=168) + generate("test", 100, seed=5, image_size=224)


def _of_type(samples, qtype):
    picked = [s for s in samples if s.qtype == qtype]
    assert picked, qtype
    return picked


def _match(pattern, question):
    match = re.fullmatch(pattern, question)
    assert match, (pattern, question)
    return match.groups()


def _same(a, b):
    return (
        np.array_equal(a.image, b.image)
        and (a.question, a.answer, a.qtype, a.objects, a.background) == (b.question, b.answer, b.qtype, b.objects, b.background)
    )


# --- determinism ------------------------------------------------------------------------------


def test_same_arguments_give_identical_samples():
    first, second = generate("val", 10, seed=3, image_size=168), generate("val", 10, seed=3, image_size=168)
    assert all(_same(a, b) for a, b in zip(first, second, strict=True))


def test_sample_depends_only_on_its_index():
    stream = generate("val", 8, seed=3, image_size=168)
    assert _same(make_sample("val", 6, seed=3, image_size=168), stream[6])
    assert _same(next(iterate("val", seed=3, image_size=168, start=5)), stream[5])


def test_different_seeds_differ():
    a, b = generate("train", 10, seed=0, image_size=168), generate("train", 10, seed=1, image_size=168)
    assert all(not np.array_equal(x.image, y.image) for x, y in zip(a, b))
    assert [(x.question, x.answer) for x in a] != [(y.question, y.answer) for y in b]


# --- splits -----------------------------------------------------------------------------------


def test_split_photos_are_disjoint():
    assert set(PHOTOS) == {"train", "val", "test"}
    for first, second in itertools.combinations(PHOTOS.values(), 2):
        assert not set(first) & set(second)
    assert len(PHOTOS["test"]) >= 2 and len(PHOTOS["val"]) >= 2


def test_each_split_uses_only_its_photos_and_its_own_stream():
    streams = {split: generate(split, 30, seed=0, image_size=168) for split in PHOTOS}
    for split, stream in streams.items():
        assert {s.background for s in stream} <= set(PHOTOS[split])
        assert len({s.background for s in stream}) >= 2  # really drawn from several photos
    for a, b in itertools.combinations(streams.values(), 2):
        assert all(not np.array_equal(x.image, y.image) for x, y in zip(a, b))


def test_backgrounds_load_without_network():
    for name in itertools.chain(*PHOTOS.values()):
        photo = render.load_photo(name)
        assert photo.dtype == np.uint8 and photo.ndim == 3 and photo.shape[2] == 3
        assert min(photo.shape[:2]) >= 150 and photo.std() > 10, name  # a real picture


# --- images -----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [168, 224, 336])
def test_image_shape_and_dtype(size):
    sample = make_sample("train", 3, image_size=size)
    assert sample.image.shape == (size, size, 3) and sample.image.dtype == np.uint8


def test_objects_are_inside_and_do_not_overlap(samples):
    for s in samples:
        size = s.image.shape[0]
        assert 1 <= len(s.objects) <= scenes.MAX_OBJECTS
        for o in s.objects:
            x0, y0, x1, y1 = o.bbox
            assert 0 < x0 < x1 < size and 0 < y0 < y1 < size
            assert x0 < o.center[0] < x1 and y0 < o.center[1] < y1
        for a, b in itertools.combinations(s.objects, 2):
            assert np.hypot(a.center[0] - b.center[0], a.center[1] - b.center[1]) > a.radius + b.radius


def test_every_object_is_visible_in_its_colour(samples):
    palette = {name: np.array(rgb) for name, rgb in scenes.COLORS.items()}
    for s in samples:
        for o in s.objects:
            pixel = s.image[int(o.center[1]), int(o.center[0])].astype(int)
            distances = {name: np.linalg.norm(pixel - rgb) for name, rgb in palette.items()}
            assert min(distances, key=distances.get) == o.color
            assert distances[o.color] < 20
            # And the colour reads as more than noise: every other palette colour is far away.
            assert sorted(distances.values())[1] > 60


def test_background_is_real_but_cannot_pass_for_an_object(samples):
    min_object_chroma = min(max(rgb) - min(rgb) for rgb in scenes.COLORS.values())
    spreads = []
    for s in samples[:100]:
        size = s.image.shape[0]
        ys, xs = np.mgrid[:size, :size] + 0.5
        outside = np.ones((size, size), bool)
        for o in s.objects:
            outside &= np.hypot(xs - o.center[0], ys - o.center[1]) > o.radius + 1
        background = s.image[outside].astype(int)
        chroma = background.max(axis=1) - background.min(axis=1)
        assert chroma.max() < min_object_chroma / 2
        assert 50 < background.mean() < 210
        spreads.append(background.std(axis=0).mean())
    # Photo structure survives the toning (a flat grey would have zero spread).
    assert np.median(spreads) > 5


# --- questions and answers --------------------------------------------------------------------


def test_answers_and_types_are_in_the_vocabulary(samples):
    assert len(set(ANSWERS)) == len(ANSWERS)
    assert {s.answer for s in samples} <= set(ANSWERS)
    assert {s.qtype for s in samples} == set(QUESTION_TYPES)


def test_question_types_are_balanced(samples):
    counts = Counter(s.qtype for s in samples[:N_PROPERTY])
    assert counts == {qtype: N_PROPERTY // len(QUESTION_TYPES) for qtype in QUESTION_TYPES}


@pytest.mark.parametrize(
    "qtype, options",
    [
        ("color", scenes.COLORS),
        ("shape", scenes.SHAPES),
        ("position", scenes.QUADRANTS),
        ("count", scenes.COUNT_ANSWERS),
    ],
)
def test_answers_within_a_type_are_balanced(samples, qtype, options):
    counts = Counter(s.answer for s in _of_type(samples, qtype))
    total = sum(counts.values())
    assert set(counts) == set(options)
    assert max(counts.values()) < 2.5 * total / len(options)


def test_color_answers(samples):
    for s in _of_type(samples, "color"):
        (shape,) = _match(r"What color is the (\w+)\?", s.question)
        matching = [o for o in s.objects if o.shape == shape]
        assert len(matching) == 1 and matching[0].color == s.answer


def test_shape_answers(samples):
    for s in _of_type(samples, "shape"):
        (color,) = _match(r"What shape is the (\w+) object\?", s.question)
        matching = [o for o in s.objects if o.color == color]
        assert len(matching) == 1 and matching[0].shape == s.answer


def test_count_answers(samples):
    kinds = Counter()
    for s in _of_type(samples, "count"):
        if s.question == "How many objects are there?":
            expected, kinds["all"] = len(s.objects), kinds["all"] + 1
        else:
            (shape,) = _match(r"How many (\w+)s are there\?", s.question)
            expected, kinds["shape"] = sum(o.shape == shape for o in s.objects), kinds["shape"] + 1
        assert s.answer == str(expected)
    assert min(kinds["all"], kinds["shape"]) > 10


def test_exist_answers_are_correct_balanced_and_need_binding(samples):
    exist = _of_type(samples, "exist")
    no_with_both_parts = 0
    for s in exist:
        color, shape = _match(r"Is there an? (\w+) (\w+)\?", s.question)
        present = any(o.color == color and o.shape == shape for o in s.objects)
        assert s.answer == ("yes" if present else "no")
        if not present:
            no_with_both_parts += any(o.color == color for o in s.objects) and any(o.shape == shape for o in s.objects)
        assert s.question.startswith("Is there an " if color[0] in "aeiou" else "Is there a ")
    yes_fraction = np.mean([s.answer == "yes" for s in exist])
    assert 0.4 <= yes_fraction <= 0.6
    assert no_with_both_parts > 0.2 * sum(s.answer == "no" for s in exist)


def test_position_answers(samples):
    for s in _of_type(samples, "position"):
        color, shape = _match(r"In which quadrant is the (\w+) (\w+)\?", s.question)
        matching = [o for o in s.objects if (o.color, o.shape) == (color, shape)]
        assert len(matching) == 1
        target, half = matching[0], s.image.shape[0] / 2
        vertical, horizontal = s.answer.split("-")
        assert (target.center[1] >= half) == (vertical == "bottom")
        assert (target.center[0] >= half) == (horizontal == "right")
        x0, y0, x1, y1 = target.bbox  # the whole object, not just its centre
        assert (y0 > half) if vertical == "bottom" else (y1 < half)
        assert (x0 > half) if horizontal == "right" else (x1 < half)
        assert scenes.quadrant_of(*target.center, s.image.shape[0]) == s.answer


def test_tokenizer_corpus_covers_every_question_and_answer(samples):
    corpus = tokenizer_corpus()
    assert len(corpus) == len(set(corpus))
    assert {s.question for s in samples} <= set(corpus)
    assert set(ANSWERS) <= set(corpus)
    assert tokenizer_corpus() == corpus


# --- errors and CLI ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(split="dev", n=1), "unknown split"),
        (dict(split="train", n=1, image_size=32), "image_size"),
        (dict(split="train", n=-1), "n must be"),
        (dict(split="train", n=1, seed=-2), "seed"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(**kwargs)


def test_cli_writes_pngs_and_jsonl(tmp_path):
    scenes.main(["--out", str(tmp_path), "--n", "3", "--split", "test", "--image-size", "168"])
    records = [json.loads(line) for line in (tmp_path / "questions.jsonl").read_text().splitlines()]
    assert len(records) == 3
    for record in records:
        expected = make_sample("test", record["index"], seed=0, image_size=168)
        assert record["question"] == expected.question and record["answer"] == expected.answer
        assert np.array_equal(np.asarray(Image.open(tmp_path / record["file"])), expected.image)


# --- per-patch object coverage (the training recipe's auxiliary targets) -----------------------


def test_object_coverage_matches_geometry(samples):
    big = [s for s in samples if s.image.shape[0] == 224]
    checked = 0
    for s in big[:40]:
        cov = scenes.object_coverage(s.objects, 224, 14)
        assert cov.shape == (len(s.objects), 14, 14) and cov.min() >= 0 and cov.max() <= 1
        for obj, c in zip(s.objects, cov):
            cx, cy = int(obj.center[0] // 16), int(obj.center[1] // 16)
            assert c[cy, cx] > 0, "an object's centre cell must be covered by it"
            ys, xs = np.nonzero(c)  # nothing outside the bounding box
            assert xs.min() >= int(obj.bbox[0] // 16) and xs.max() <= int(obj.bbox[2] // 16)
            assert ys.min() >= int(obj.bbox[1] // 16) and ys.max() <= int(obj.bbox[3] // 16)
            # Objects sit on the board: a small one in its cell, a large one in a 2x2 block.
            span = 2 if obj.size == "large" else 1
            r0, c0 = int(obj.center[1] // 16) - span // 2, int(obj.center[0] // 16) - span // 2
            block = c[r0 : r0 + span, c0 : c0 + span]
            assert block.sum() == pytest.approx(c.sum()) and block.min() > 0.1
            checked += 1
        assert cov.sum(axis=0).max() <= 1.0 + 1e-6  # objects do not overlap
    assert checked > 5
    with pytest.raises(ValueError, match="multiple"):
        scenes.object_coverage(big[0].objects, 224, 15)


def test_scene_questions_contain_the_samples_own_question(samples):
    # Two independent paths to an answer: the generator builds the scene around its answer,
    # scene_questions reads it back from the placed objects.
    for s in samples:
        qs = scenes.scene_questions(s.objects, s.image.shape[0])
        assert (s.question, s.answer, s.qtype) in qs
        assert len({q for q, _, _ in qs}) == len(qs)  # one answer per question
        assert {a for _, a, _ in qs} <= set(ANSWERS)


def test_objects_sit_inside_their_board_cells(samples):
    for s in samples:
        cell = s.image.shape[0] / scenes.BOARD
        taken = set()
        for o in s.objects:
            span = 2 if o.size == "large" else 1
            col0, row0 = o.center[0] / cell - span / 2, o.center[1] / cell - span / 2
            assert col0 == int(col0) and row0 == int(row0)  # aligned to the grid
            x0, y0, x1, y1 = o.bbox
            assert col0 * cell < x0 and x1 < (col0 + span) * cell and row0 * cell < y0 and y1 < (row0 + span) * cell
            cells = {(int(row0) + i, int(col0) + j) for i in range(span) for j in range(span)}
            assert not cells & taken
            taken |= cells


def test_referents_are_the_objects_that_decide_the_answer(samples):
    for s in samples:
        for q, a, qtype in scenes.scene_questions(s.objects, s.image.shape[0]):
            hits, counting = scenes.referents(q, s.objects)
            assert counting == (qtype == "count")
            if qtype == "count":
                assert len(hits) == int(a)
            elif qtype == "exist":
                assert bool(hits) == (a == "yes")
            else:
                (k,) = hits  # exactly one object, and it carries the answer
                o = s.objects[k]
                assert a == {"color": o.color, "shape": o.shape,
                             "position": scenes.quadrant_of(*o.center, s.image.shape[0])}[qtype]
    with pytest.raises(ValueError, match="not a scene question"):
        scenes.referents("What is this?", samples[0].objects)
