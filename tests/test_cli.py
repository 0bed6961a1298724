"""`python -m ep_jax.generate` end to end on a converted tiny checkpoint and a real photo."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import photo
from PIL import Image

import ep_jax

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ckpt(tiny_dirs, tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    ep_jax.convert_hf(tiny_dirs("mha")[0], d / "model", dtype="float32", progress=False)
    Image.fromarray(photo("astronaut")).save(d / "astronaut.png")
    Image.fromarray(photo("coffee")).save(d / "coffee.jpg")
    return d


def cli(*args):
    return subprocess.run([sys.executable, "-m", "ep_jax.generate", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_cli_answers_and_reports_json(ckpt):
    model = ckpt / "model"
    r = cli("--model", model, "--image", ckpt / "astronaut.png", "--prompt", "What is in the image?",
            "--max-new-tokens", "8", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["answers"]) == 1 and len(out["token_ids"][0]) == 8
    for k in ("compile_s", "prefill_ms", "time_to_first_token_ms", "decode_tokens_per_s"):
        assert out["timings"][k] > 0
    api = ep_jax.generate(ep_jax.load(model), [Image.open(ckpt / "astronaut.png")], ["What is in the image?"],
                          max_new_tokens=8, return_ids=True)
    assert out["token_ids"] == api[1] and out["answers"] == api[0]


def test_cli_plain_stream_and_batch(ckpt):
    model = ckpt / "model"
    plain = cli("--model", model, "--image", ckpt / "astronaut.png", "--prompt", "Describe it.", "--max-new-tokens", "6")
    stream = cli("--model", model, "--image", ckpt / "astronaut.png", "--prompt", "Describe it.",
                 "--max-new-tokens", "6", "--stream")
    assert plain.returncode == 0 and stream.returncode == 0, plain.stderr + stream.stderr
    assert plain.stdout.strip() == stream.stdout.strip()
    batch = cli("--model", model, "--image", ckpt / "astronaut.png", "--image", ckpt / "coffee.jpg",
                "--prompt", "Describe it.", "--max-new-tokens", "6")
    assert batch.returncode == 0, batch.stderr
    assert batch.stdout.splitlines()[0] == plain.stdout.strip()
    assert len(batch.stdout.splitlines()) == 2


@pytest.mark.parametrize("case", ["missing", "corrupt", "too_long", "not_ckpt", "raw_no_image"])
def test_cli_bad_input_is_one_clear_line(case, ckpt, tmp_path):
    model, img, prompt, extra = ckpt / "model", ckpt / "astronaut.png", "hi", []
    if case == "missing":
        img = tmp_path / "nope.png"
    elif case == "corrupt":
        img = tmp_path / "bad.png"
        img.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    elif case == "too_long":
        prompt = "word " * 600
    elif case == "not_ckpt":
        model = tmp_path
    elif case == "raw_no_image":
        extra = ["--raw-prompt"]
    r = cli("--model", model, "--image", img, "--prompt", prompt, "--max-new-tokens", "4", *extra)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr


def test_cli_pruning_report_json_and_explain(ckpt, tmp_path):
    model = ckpt / "model"
    args = ("--model", model, "--image", ckpt / "astronaut.png", "--prompt", "Describe it.", "--max-new-tokens", "4",
            "--prune", "entropy", "--prune-layer", "2", "--keep-avg", "8")
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    report = r.stderr.strip().splitlines()[-1]
    # tiny model: L=4 layers, N=16 visual tokens; A=8 at K=2 -> R = floor((4*8 - 2*16) / 2) = 0
    assert "[entropy] K=2" in report and "R=0/16" in report and "prefill FLOPs -" in report
    r = cli(*args[:-1], "12", "--json", "--explain", tmp_path / "explain.png")
    assert r.returncode == 0, r.stderr
    prune = json.loads(r.stdout)["prune"]
    assert prune["method"] == "entropy" and prune["layer"] == 2 and prune["keep"] == 8
    assert prune["num_visual"] == 16 and prune["kept_tokens"] == prune["total_tokens"] - 8
    assert 0 < prune["flops_reduction"] < 1 and prune["kv_bytes_saved"] > 0
    img = Image.open(tmp_path / "explain.png")
    assert img.size[0] > 2 * img.size[1] * 0.8 and img.size[1] >= 300
    pixels = np.asarray(img.convert("RGB")).reshape(-1, 3).astype(int)
    yellow = (pixels[:, 0] > 200) & (pixels[:, 1] > 200) & (pixels[:, 2] < 80)
    assert yellow.sum() > 50  # the outlines of the kept patches are drawn


def test_cli_prune_needs_a_budget(ckpt):
    r = cli("--model", ckpt / "model", "--image", ckpt / "astronaut.png", "--prompt", "hi", "--prune", "entropy")
    assert r.returncode != 0 and "budget" in r.stderr
