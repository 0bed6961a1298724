"""`python -m ep_jax.eval vqa`: LLaVA question files -> answers files, on the shipped model and
the example scenes (examples/)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
FIELDS = {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}


def examples():
    return json.loads((EXAMPLES / "examples.json").read_text())


def write_questions(path: Path, items=None) -> Path:
    items = examples() if items is None else items
    with open(path, "w") as f:
        for i, e in enumerate(items):
            f.write(json.dumps({"question_id": f"q{i}", "image": e["file"], "text": e["question"],
                                "category": e["qtype"]}) + "\n")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def offline():
    """ep_jax.generate's answers (preset pruning, and none) to the example questions."""
    import ep_jax
    from ep_jax.image_files import load_image

    model = ep_jax.load()
    ims = [[load_image(EXAMPLES / e["file"])] for e in examples()]
    qs = [e["question"] for e in examples()]
    return {"preset": ep_jax.generate(model, ims, qs, max_new_tokens=128),
            "none": ep_jax.generate(model, ims, qs, max_new_tokens=128, prune=None)}


def run_main(*args):
    from ep_jax.eval.vqa import main

    return main(["vqa", "--image-folder", str(EXAMPLES), "--no-progress", *map(str, args)])


def test_command_answers_equal_generate(tmp_path, offline):
    q = write_questions(tmp_path / "q.jsonl")
    a = tmp_path / "out" / "answers.jsonl"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-m", "ep_jax.eval", "vqa", "--question-file", str(q), "--image-folder",
                        str(EXAMPLES), "--answers-file", str(a), "--batch-size", "2"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "answer/s" in r.stderr  # the progress bar
    answers = read_jsonl(a)
    assert [x["question_id"] for x in answers] == [f"q{i}" for i in range(len(examples()))]
    for x, e in zip(answers, examples()):
        assert set(x) == FIELDS
        assert x["prompt"] == e["question"] and x["model_id"] == "scenes-llava-tiny"
        assert x["metadata"]["category"] == e["qtype"] and x["metadata"]["prune"]["method"] == "entropy"
    assert [x["text"] for x in answers] == offline["preset"]
    accuracy = sum(x["text"] == e["answer"] for x, e in zip(answers, examples())) / len(answers)
    assert accuracy >= 0.8


def test_pruning_flags_and_resume_after_crash(tmp_path, offline):
    q = write_questions(tmp_path / "q.jsonl")
    a = tmp_path / "a.jsonl"
    assert run_main("--question-file", q, "--answers-file", a, "--batch-size", 3, "--prune", "none") == 0
    full = read_jsonl(a)
    assert [x["text"] for x in full] == offline["none"] and full[0]["metadata"]["prune"] is None
    # a crash: two whole lines and half of the third
    lines = a.read_text().splitlines(keepends=True)
    a.write_text(lines[0] + lines[1] + lines[2][: len(lines[2]) // 2])
    assert run_main("--question-file", q, "--answers-file", a, "--batch-size", 3, "--prune", "none") == 0
    resumed = read_jsonl(a)  # every line parses: the half line was cut off
    assert sorted(x["question_id"] for x in resumed) == sorted(x["question_id"] for x in full)
    assert len(resumed) == len(full)
    assert {x["question_id"]: x["text"] for x in resumed} == {x["question_id"]: x["text"] for x in full}
    assert resumed[:2] == full[:2]  # answered lines are kept as they were
    # nothing left to do: the file stays as it is
    before = a.read_bytes()
    assert run_main("--question-file", q, "--answers-file", a, "--prune", "none") == 0
    assert a.read_bytes() == before


def test_chunks_partition_the_questions(tmp_path, offline):
    from ep_jax.eval.vqa import split_chunk

    for n in range(1, 12):
        for chunks in range(1, 6):
            parts = [split_chunk(list(range(n)), chunks, k) for k in range(chunks)]
            assert sum(parts, []) == list(range(n))
    q = write_questions(tmp_path / "q.jsonl")
    got = []
    for k in range(3):
        a = tmp_path / f"3_{k}.jsonl"
        assert run_main("--question-file", q, "--answers-file", a, "--num-chunks", 3, "--chunk-idx", k,
                        "--batch-size", 2) == 0
        got += read_jsonl(a)
    assert [x["question_id"] for x in got] == [f"q{i}" for i in range(len(examples()))]
    assert [x["text"] for x in got] == offline["preset"]


def test_scienceqa_question_file(tmp_path, offline):
    """LLaVA's model_vqa_science input: a JSON list of conversations; `<image>` removed from the
    human turn; without an image the question is text-only; --single-pred-prompt appends the
    letter instruction."""
    items = [{"id": f"s{i}", "image": e["file"], "conversations": [
        {"from": "human", "value": "<image>\n" + e["question"]}, {"from": "gpt", "value": e["answer"]}]}
        for i, e in enumerate(examples()[:3])]
    items.append({"id": "text-only", "conversations": [{"from": "human", "value": "Say one word."}]})
    q = tmp_path / "sqa.json"
    q.write_text(json.dumps(items))
    a = tmp_path / "a.jsonl"
    assert run_main("--question-file", q, "--answers-file", a, "--batch-size", 4) == 0
    answers = read_jsonl(a)
    assert [x["question_id"] for x in answers] == ["s0", "s1", "s2", "text-only"]
    assert [x["text"] for x in answers[:3]] == offline["preset"][:3]
    assert answers[0]["prompt"] == "<image>\n" + examples()[0]["question"] and answers[3]["prompt"] == "Say one word."
    assert all(set(x) == FIELDS for x in answers)
    b = tmp_path / "b.jsonl"
    assert run_main("--question-file", q, "--answers-file", b, "--single-pred-prompt", "--batch-size", 4) == 0
    assert read_jsonl(b)[0]["prompt"] == "<image>\n" + examples()[0]["question"] + "\n" + \
        "Answer with the option's letter from the given choices directly."  # as LLaVA records it
    assert read_jsonl(b)[3]["prompt"] == "Say one word.\n" + \
        "Answer with the option's letter from the given choices directly."


MMB_HEADER = "\t".join(["index", "question", "hint", "A", "B", "C", "D", "image", "category"])


def test_mmbench_tsv_with_rounds_and_resume(tmp_path):
    """LLaVA's model_vqa_mmbench input: base64 images in a TSV, hint before the question, options
    after it; --all-rounds asks once per rotation of the options (keyed by index and round_id)."""
    import base64

    def b64(name):
        return base64.b64encode((EXAMPLES / name).read_bytes()).decode()

    e0, e1 = examples()[:2]
    rows = [MMB_HEADER,
            "\t".join(["11", e0["question"], "A hint.", "red", "green", "blue", "", b64(e0["file"]), "color"]),
            "\t".join(["12", e1["question"], "nan", "yes", "no", "", "", b64(e1["file"]), "nan"]),
            "\t".join(["13", e1["question"], "N/A", "no", "yes", "NA", "", "12", "nan"])]  # image of row 12
    q = tmp_path / "mmb.tsv"
    q.write_text("\n".join(rows) + "\n")
    a = tmp_path / "a.jsonl"
    assert run_main("--question-file", q, "--answers-file", a, "--all-rounds", "--single-pred-prompt",
                    "--batch-size", 4) == 0
    answers = read_jsonl(a)
    assert [(x["question_id"], x["round_id"]) for x in answers] == \
        [(11, 0), (11, 1), (11, 2), (12, 0), (12, 1), (13, 0), (13, 1)]
    assert answers[5]["prompt"] == f"{e1['question']}\nA. no\nB. yes"  # pandas' NA cells end the options
    assert answers[0]["prompt"] == f"A hint.\n{e0['question']}\nA. red\nB. green\nC. blue"
    assert answers[1]["options"] == ["green", "blue", "red"] and answers[1]["option_char"] == ["B", "C", "A"]
    assert answers[1]["prompt"] == f"A hint.\n{e0['question']}\nA. green\nB. blue\nC. red"  # letters stay in order
    assert answers[3]["prompt"] == f"{e1['question']}\nA. yes\nB. no"
    assert answers[0]["metadata"]["category"] == "color" and "category" not in answers[3]["metadata"]
    assert all(x["text"] for x in answers)
    before = a.read_bytes()  # every (index, round) answered: nothing to do
    assert run_main("--question-file", q, "--answers-file", a, "--all-rounds", "--single-pred-prompt") == 0
    assert a.read_bytes() == before
    got = []  # chunks split rows, never one row's rounds
    for k in range(2):
        c = tmp_path / f"c{k}.jsonl"
        assert run_main("--question-file", q, "--answers-file", c, "--all-rounds", "--single-pred-prompt",
                        "--num-chunks", 2, "--chunk-idx", k, "--batch-size", 4) == 0
        got.append([(x["question_id"], x["round_id"]) for x in read_jsonl(c)])
    assert got == [[(11, 0), (11, 1), (11, 2), (12, 0), (12, 1)], [(13, 0), (13, 1)]]


def _bad(tmp_path, case):
    good = {"question_id": 1, "image": "scene_color_0000.png", "text": "What color is the star?"}
    lines = [json.dumps(good), json.dumps({**good, "question_id": 2})]
    extra = []
    if case == "missing image":
        lines.append(json.dumps({**good, "question_id": 3, "image": "nope.png"}))
        expect = "nope.png does not exist"
    elif case == "bad json line":
        lines.append('{"question_id": 3, "text": ')
        expect = "q.jsonl:3: not valid JSON"
    elif case == "missing key":
        lines.append(json.dumps({"question_id": 3, "image": "scene_color_0000.png"}))
        expect = "q.jsonl:3: missing key(s) text"
    elif case == "duplicate id":
        lines.append(json.dumps(good))
        expect = "q.jsonl:3: question id 1 repeats"
    elif case == "bad chunk":
        extra = ["--num-chunks", "2", "--chunk-idx", "2"]
        expect = "--chunk-idx 2"
    elif case == "bad keep-ratio":
        extra = ["--keep-ratio", "2"]
        expect = "--keep-ratio 2.0"
    elif case == "scienceqa not a list":
        (tmp_path / "q.json").write_text('{"id": 1}')
        return ["--question-file", tmp_path / "q.json", "--answers-file", tmp_path / "a.jsonl"], "not a list"
    elif case == "mmbench bad base64":
        rows = [MMB_HEADER, "\t".join(["7", "Q?", "nan", "x", "y", "", "", "!!notbase64", "c"])]
        (tmp_path / "q.tsv").write_text("\n".join(rows) + "\n")
        return ["--question-file", tmp_path / "q.tsv", "--answers-file", tmp_path / "a.jsonl"], \
            "q.tsv:2: the image cell is not base64"
    elif case == "mmbench not an image":
        import base64

        rows = [MMB_HEADER, "\t".join(["7", "Q?", "nan", "x", "y", "", "", base64.b64encode(b"hello" * 20).decode(),
                                       "c"])]
        (tmp_path / "q.tsv").write_text("\n".join(rows) + "\n")
        return ["--question-file", tmp_path / "q.tsv", "--answers-file", tmp_path / "a.jsonl"], \
            "q.tsv:2: the image cell's bytes are not an image"
    elif case == "mmbench short row":
        (tmp_path / "q.tsv").write_text(MMB_HEADER + "\n7\tQ?\n")
        return ["--question-file", tmp_path / "q.tsv", "--answers-file", tmp_path / "a.jsonl"], \
            "q.tsv:2: the row has 2 cells for 9 columns"
    elif case == "rounds on jsonl":
        extra = ["--all-rounds"]
        expect = "--all-rounds and --lang apply to MMBench"
    elif case == "mmbench no options":
        (tmp_path / "q.tsv").write_text("index\tquestion\timage\n1\tQ?\tAAAA\n")
        return ["--question-file", tmp_path / "q.tsv", "--answers-file", tmp_path / "a.jsonl"], \
            "the TSV header lacks A, B"
    elif case == "not an answers file":
        (tmp_path / "a.jsonl").write_text("hello\n{}\n")
        expect = "a.jsonl:1 is not a JSON line"
    (tmp_path / "q.jsonl").write_text("\n".join(lines) + "\n")
    return ["--question-file", tmp_path / "q.jsonl", "--answers-file", tmp_path / "a.jsonl", *extra], expect


@pytest.mark.parametrize("case", ["missing image", "bad json line", "missing key", "duplicate id", "bad chunk",
                                  "bad keep-ratio", "not an answers file", "scienceqa not a list",
                                  "mmbench bad base64", "mmbench no options", "mmbench not an image",
                                  "mmbench short row", "rounds on jsonl"])
def test_bad_inputs_fail_before_the_model_loads(case, tmp_path, capsys, monkeypatch):
    from ep_jax import checkpoint

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(checkpoint, "load", no_load)
    args, expect = _bad(tmp_path, case)
    assert run_main(*args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and expect in err[0], err
