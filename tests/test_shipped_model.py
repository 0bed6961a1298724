"""The model shipped in models/scenes-llava-tiny: accuracy, Hugging Face parity, default CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ep_jax.data import QUESTION_TYPES

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "models" / "scenes-llava-tiny"
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module")
def shipped():
    import ep_jax

    return ep_jax.load()  # no path: the shipped model, its preset attached


@pytest.fixture(scope="module")
def test_samples():
    from ep_jax.data import scenes

    return scenes.generate("test", 100, seed=0, image_size=224)


@pytest.fixture(scope="module")
def ep_answers(shipped, test_samples):
    """Unpruned answers through the API's defaults otherwise (the preset's template)."""
    import ep_jax

    texts, ids = ep_jax.generate(shipped, [s.image for s in test_samples], [s.question for s in test_samples],
                                 max_new_tokens=4, prune=None, return_ids=True)
    return texts, ids


def test_shipped_is_the_default_preset(shipped):
    from ep_jax import presets

    assert presets.default_model_path().resolve() == MODEL_DIR.resolve()
    assert shipped.preset is not None and shipped.preset.template == "llava_hf"
    assert shipped.config.image_seq_len >= 196
    assert (MODEL_DIR / "params").is_dir() and (MODEL_DIR / "MODEL_CARD.md").is_file()
    size = sum(f.stat().st_size for f in MODEL_DIR.rglob("*") if f.is_file())
    assert size <= 25 * 2**20, f"checkpoint is {size / 2**20:.1f} MiB"


def _accuracy(texts, samples) -> float:
    return float(np.mean([t.strip().lower() == s.answer for t, s in zip(texts, samples)]))


def test_accuracy_on_100_test_questions_through_the_api(ep_answers, test_samples):
    """`ep_jax.load()` + `ep_jax.generate` with the API's defaults (the preset's chat template),
    unpruned: the model's own accuracy (96.4 % on 500 test questions in its model card)."""
    texts, _ = ep_answers
    acc = _accuracy(texts, test_samples)
    assert acc >= 0.93, f"accuracy {acc:.2f}: {list(zip(texts, [s.answer for s in test_samples]))}"


def test_api_defaults_prune_like_the_cli(shipped, test_samples):
    """With no `prune` argument the API prunes as the CLI does (the preset's K = 2, A = 109: R = 22
    of 196), and keeps most of the accuracy (89.4 % of 1,000 questions in the quality bench)."""
    import ep_jax
    from ep_jax.runtime.api import default_prune

    assert default_prune(shipped.preset) == ep_jax.PruneConfig(layer=2, avg_keep=109)
    gen = ep_jax.run_generation(shipped, [[s.image] for s in test_samples], [s.question for s in test_samples],
                                max_new_tokens=4)
    assert gen.stage is not None and gen.stage.layer == 2 and gen.stage.keep == 22
    assert _accuracy(gen.texts, test_samples) >= 0.85


def test_transformers_greedy_parity(shipped, test_samples, ep_answers, tmp_path):
    """Export to a HF directory; transformers' greedy answers equal ep_jax's on 20 questions."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from ep_jax.checkpoint import export_hf

    hf_dir = export_hf(shipped, tmp_path / "hf")
    hf = LlavaForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    proc = shipped.processor
    texts, ids = ep_answers
    eos = shipped.config.eos_token_id
    for i, s in enumerate(test_samples[:20]):
        enc = proc.encode([s.question], [[s.image]], template="llava_hf", bucket_sizes=None)
        with torch.no_grad():
            out = hf.generate(
                input_ids=torch.from_numpy(enc["input_ids"]).long(),
                attention_mask=torch.from_numpy(enc["attention_mask"]).long(),
                pixel_values=torch.from_numpy(enc["pixel_values"]),
                max_new_tokens=4, do_sample=False, eos_token_id=eos, pad_token_id=proc.pad_token_id,
            )
        new = out[0, enc["input_ids"].shape[1]:].tolist()
        if eos in new:
            new = new[: new.index(eos) + 1]
        assert new == ids[i], f"question {i} {s.question!r}: transformers {new} vs ep_jax {ids[i]}"
        assert proc.decode(np.asarray(new)) == texts[i]


def _run_default_cli(ex):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("EP_JAX_MODELS", None)
    return subprocess.run(
        [sys.executable, "-m", "ep_jax.generate", "--image", str(EXAMPLES / ex["file"]), "--prompt", ex["question"]],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )


@pytest.fixture(scope="module")
def cli_run():
    ex = json.loads((EXAMPLES / "examples.json").read_text())[0]
    return ex, _run_default_cli(ex)


def test_default_cli_uses_shipped_model(cli_run):
    from ep_jax.data import scenes

    _, proc = cli_run
    assert proc.returncode == 0, proc.stderr
    assert "using the shipped model" in proc.stderr
    assert proc.stdout.strip().splitlines()[-1].strip().lower() in scenes.ANSWERS


def test_default_cli_answers_example(cli_run):
    ex, proc = cli_run
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1].strip().lower() == ex["answer"], proc.stdout


def test_run_quality_writes_outputs(shipped, tmp_path):
    """The quality bench end to end on 20 test questions with the shipped model."""
    from ep_jax.quality import run_quality

    res = run_quality(shipped, methods=("none", "entropy", "pool"), budgets=(130,), n=20, batch=20,
                      out_dir=tmp_path, progress=False)
    assert [r["method"] for r in res["results"]] == ["none", "entropy", "pool"]
    for r in res["results"]:
        assert set(r["accuracy"]) == {"overall", *QUESTION_TYPES}
        assert 0.0 <= r["accuracy"]["overall"] <= 1.0 and 0.0 <= r["agreement"] <= 1.0
    none, entropy, _ = res["results"]
    assert none["keep"] == 196 and entropy["keep"] == 64
    assert none["agreement"] == 1.0 and none["relative"] == 100.0
    assert 0.0 < entropy["flops_reduction"] < 1.0
    assert entropy["relative"] == pytest.approx(100 * entropy["accuracy"]["overall"] / none["accuracy"]["overall"])
    on_disk = json.loads((tmp_path / "quality.json").read_text())
    assert on_disk["n"] == 20 and len(on_disk["results"]) == 3
    assert (tmp_path / "quality.md").read_text().count("\n| entropy |") == 1
    assert (tmp_path / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
