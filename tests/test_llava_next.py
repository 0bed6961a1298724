"""LLaVA-NeXT (AnyRes): processor, logits and generation vs transformers, pruning vs the float64
PyTorch reference, buckets. Tiny random LlavaNextForConditionalGeneration models (tests/hf_tiny.py)."""

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import photo
from torch_reference import pruned_forward

import ep_jax
from ep_jax import PruneConfig
from ep_jax.families.llava_next import anyres
from ep_jax.families.llava_next.processing import AnyResImageProcessor
from ep_jax.runtime.engine import compile_stats

PROMPTS = ["What is in the image?", "Describe the photo in detail please."]


def _images():
    """Two real photos with different aspect ratios (so a different N per row)."""
    return [photo("astronaut")[:, :200], photo("coffee")]


@pytest.fixture(scope="module")
def next_dirs(tmp_path_factory):
    from hf_tiny import build_tiny_llava_next

    cache = {}

    def get(text: str):
        if text not in cache:
            d, tm, proc = build_tiny_llava_next(tmp_path_factory.mktemp(f"next-{text}"), seed=3 + len(cache), text=text)
            cache[text] = (d, tm, proc, ep_jax.load(d))
        return cache[text]

    return get


def test_prompt_length_counts_each_images_tokens(next_dirs):
    _, _, _, model = next_dirs("llama")
    proc, template = model.processor, model.family.default_template
    images = _images()
    enc = proc.encode(PROMPTS, [[im] for im in images], template=template, bucket_sizes=None)
    assert [proc.prompt_length(p, [im], template=template) for p, im in zip(PROMPTS, images)] == \
        [int(n) for n in enc["lengths"]]
    assert len(set(enc["lengths"].tolist())) == 2


def _hf(proc, model, prompts, images, padding_side="left"):
    proc.tokenizer.padding_side = padding_side
    texts = [model.processor.format(p) for p in prompts]
    return proc(images=images, text=texts, return_tensors="pt", padding=True)


# ---------------------------------------------------------------------- processor
SIZES = [(512, 512), (100, 400), (400, 100), (336, 672), (672, 336), (337, 673), (672, 672), (1008, 336),
         (336, 1008), (300, 1008), (1000, 333), (50, 60), (800, 600), (480, 640), (1024, 768), (335, 1340)]


def test_image_processor_matches_transformers_pil():
    from transformers import LlavaNextImageProcessorPil

    hf = LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                    image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336],
                                                          [336, 1008]])
    ours = AnyResImageProcessor.from_hf_dict(hf.to_dict())
    base = photo("chelsea")
    for h, w in SIZES:
        im = PIL.Image.fromarray(base).resize((w, h))
        want = hf(im, return_tensors="np")
        got, size = ours.crops(im)
        np.testing.assert_array_equal(got, want["pixel_values"][0], err_msg=f"{(h, w)}")
        assert size == tuple(want["image_sizes"][0])


def test_token_counts_match_transformers_processor(next_dirs):
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    d, _, proc, model = next_dirs("llama")
    hf = LlavaNextProcessor(image_processor=LlavaNextImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}), tokenizer=proc.tokenizer,
        patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1, image_token="<image>")
    pins = hf.image_processor.image_grid_pinpoints
    image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    for h, w in SIZES:
        im = PIL.Image.new("RGB", (w, h))
        ids = hf(images=[im], text=["<image>\nhi"], return_tensors="np")["input_ids"][0]
        assert anyres.num_image_tokens((h, w), pins, 336, 14) == int((ids == image_id).sum()), (h, w)
    # the tiny checkpoint's own processors agree too (ids equal for the same prompt)
    for img in _images() + [photo("chelsea")]:
        want = _hf(proc, model, PROMPTS[:1], [img])["input_ids"].numpy()
        got = model.processor.encode(PROMPTS[:1], [img], bucket_sizes=None)
        np.testing.assert_array_equal(got["input_ids"], want)
        np.testing.assert_array_equal(got["pixel_values"], proc.image_processor(img, return_tensors="np")
                                      ["pixel_values"][0])


# ---------------------------------------------------------------------- parity
@pytest.mark.parametrize("text", ["llama", "mistral"])
def test_logits_match_transformers_batch_of_two_aspect_ratios(text, next_dirs):
    _, tm, proc, model = next_dirs(text)
    enc = _hf(proc, model, PROMPTS, _images())
    with torch.no_grad():
        ref = tm(**enc).logits.numpy()
    out = ep_jax.forward(model, enc["input_ids"].numpy(), enc["pixel_values"].numpy(), enc["attention_mask"].numpy(),
                         image_sizes=enc["image_sizes"].numpy())
    counts = out.spans.counts()
    assert counts[0] != counts[1]  # a different N per row
    mask = enc["attention_mask"].numpy().astype(bool)
    np.testing.assert_allclose(out.logits[mask], ref[mask], atol=1e-4, rtol=0)
    assert np.abs(ref).max() > 0.1


@pytest.mark.parametrize("text", ["llama", "mistral"])
def test_greedy_generation_matches_transformers(text, next_dirs):
    _, tm, proc, model = next_dirs(text)
    ids = ep_jax.generate(model, _images(), PROMPTS, max_new_tokens=20, prune=None, return_ids=True)[1]
    enc = _hf(proc, model, PROMPTS, _images())
    with torch.no_grad():
        ref = tm.generate(**enc, max_new_tokens=20, do_sample=False)[:, enc["input_ids"].shape[1]:].tolist()
    eos = model.config.eos_ids
    for got, want in zip(ids, ref):
        cut = next((i + 1 for i, t in enumerate(want) if t in eos), len(want))
        assert got == want[:cut]
    assert max(len(r) for r in ids) > 5


# ---------------------------------------------------------------------- pruning
def test_keep_all_reproduces_unpruned(next_dirs):
    _, _, _, model = next_dirs("llama")
    enc = model.processor.encode(PROMPTS, _images())
    base = ep_jax.forward(model, enc["input_ids"], enc["pixel_values"], enc["attention_mask"],
                          image_sizes=enc["image_sizes"])
    n = base.spans.counts()
    assert n[0] != n[1]
    out = ep_jax.forward(model, enc["input_ids"], enc["pixel_values"], enc["attention_mask"],
                         prune=PruneConfig(layer=2, keep=int(n.min())), image_sizes=enc["image_sizes"])
    one = model.processor.encode(PROMPTS[:1], _images()[:1], bucket_sizes=None)
    full1 = ep_jax.forward(model, one["input_ids"], one["pixel_values"], image_sizes=one["image_sizes"])
    kept1 = ep_jax.forward(model, one["input_ids"], one["pixel_values"], image_sizes=one["image_sizes"],
                           prune=PruneConfig(layer=2, keep=int(full1.spans.counts()[0])))
    np.testing.assert_array_equal(kept1.positions, full1.positions)
    np.testing.assert_allclose(kept1.logits, full1.logits, atol=1e-5, rtol=0)
    assert out.logits.shape[0] == 2


@pytest.mark.parametrize("layer", [1, 2])
@pytest.mark.parametrize("budget", ["keep", "avg_keep"])
def test_pruned_batch_matches_pytorch_reference(layer, budget, next_dirs):
    """Rows with different N; R fixed per image (`keep`) or from each row's own N (`avg_keep`)."""
    _, tm, _, model = next_dirs("llama")
    cfg = PruneConfig(layer=layer, **{budget: {"keep": 12, "avg_keep": 40}[budget]})
    enc = model.processor.encode(PROMPTS, _images())
    out = ep_jax.forward(model, enc["input_ids"], enc["pixel_values"], enc["attention_mask"], prune=cfg,
                         image_sizes=enc["image_sizes"])
    if budget == "avg_keep":
        assert out.keep[0] != out.keep[1]  # each row's own N
    for i, (prompt, img) in enumerate(zip(PROMPTS, _images())):
        one = model.processor.encode([prompt], [img], bucket_sizes=None)
        ref_logits, ref_kept = pruned_forward(
            tm, torch.tensor(one["input_ids"], dtype=torch.long), torch.tensor(one["pixel_values"]), layer,
            int(out.keep[i]), image_sizes=torch.tensor(one["image_sizes"]), stable_ties=True)
        pad = enc["input_ids"].shape[1] - one["input_ids"].shape[1]
        rows = out.row_valid[i]
        np.testing.assert_array_equal(out.positions[i][rows] - pad, ref_kept.numpy())
        np.testing.assert_allclose(out.logits[i][rows], ref_logits.numpy()[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["fastv", "random", "pool"])
def test_other_methods_run_with_newlines_and_tiles(method, next_dirs):
    _, _, _, model = next_dirs("llama")
    enc = model.processor.encode(PROMPTS, _images())
    out = ep_jax.forward(model, enc["input_ids"], enc["pixel_values"], enc["attention_mask"],
                         prune=PruneConfig(method=method, layer=2, keep=10), image_sizes=enc["image_sizes"])
    assert np.isfinite(out.logits[out.row_valid]).all()
    for i in range(2):
        kept = out.kept_mask[i] & (enc["input_ids"][i] == model.config.image_token_id)
        assert kept.sum() == 10


def test_no_recompilation_for_a_new_image_of_the_same_bucket(next_dirs):
    _, _, _, model = next_dirs("llama")
    cfg = PruneConfig(layer=2, keep=8)
    ep_jax.generate(model, [photo("chelsea")], ["Describe."], max_new_tokens=4, prune=cfg)
    before = compile_stats(model)["compiles"]
    for img in (photo("coffee"), photo("astronaut")[:300], photo("astronaut")[:, :150]):
        ep_jax.generate(model, [img], ["Describe."], max_new_tokens=4, prune=cfg)
    assert compile_stats(model)["compiles"] == before


def test_conversion_round_trip(next_dirs, tmp_path):
    from safetensors.numpy import load_file

    from ep_jax.checkpoint import convert_hf, export_hf

    d, _, _, model = next_dirs("llama")
    ep_dir = convert_hf(d, tmp_path / "ep", progress=False)
    loaded = ep_jax.load(ep_dir)
    assert loaded.family.name == "llava_next" and loaded.config == model.config
    back = export_hf(loaded, tmp_path / "hf")
    want = load_file(str(d / "model.safetensors"))
    got = {}
    for f in sorted(back.glob("*.safetensors")):
        got.update(load_file(str(f)))
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_transformers5_layout_loads_and_matches(tmp_path):
    from hf_tiny import build_tiny_llava_next

    d, tm, proc = build_tiny_llava_next(tmp_path / "v5", seed=11, layout="v5")
    model = ep_jax.load(d)
    enc = _hf(proc, model, PROMPTS[:1], [photo("chelsea")])
    with torch.no_grad():
        ref = tm(**enc).logits.numpy()
    out = ep_jax.forward(model, enc["input_ids"].numpy(), enc["pixel_values"].numpy(), enc["attention_mask"].numpy(),
                         image_sizes=enc["image_sizes"].numpy())
    np.testing.assert_allclose(out.logits, ref, atol=1e-4, rtol=0)


def test_processor_pixels_carry_image_sizes(next_dirs):
    """Callers that pass on only pixel_values (ECL profile, benchmarks) get the same inputs."""
    _, _, _, model = next_dirs("llama")
    enc = model.processor.encode(PROMPTS, _images())
    a = ep_jax.forward(model, enc["input_ids"], enc["pixel_values"], enc["attention_mask"])
    b = ep_jax.forward(model, enc["input_ids"], np.asarray(enc["pixel_values"]), enc["attention_mask"],
                       image_sizes=enc["image_sizes"])
    np.testing.assert_array_equal(a.logits, b.logits)
    with pytest.raises(ep_jax.errors.InputError, match="image_sizes"):
        ep_jax.forward(model, enc["input_ids"], np.asarray(enc["pixel_values"]), enc["attention_mask"])


@pytest.mark.parametrize("change, match", [
    ({"text_config": {"model_type": "mistral", "sliding_window": 64, "max_position_embeddings": 512}},
     "sliding_window"),
    ({"vision_feature_select_strategy": "full"}, "default"),
    ({"image_grid_pinpoints": [[32]]}, "image_grid_pinpoints"),
])
def test_config_errors(change, match):
    from ep_jax.errors import ConfigError
    from ep_jax.families.llava_next.config import LlavaNextConfig

    with pytest.raises(ConfigError, match=match):
        LlavaNextConfig.from_hf_dict({"model_type": "llava_next", **change})


def test_config_round_trips(next_dirs):
    from ep_jax.families.llava_next.config import LlavaNextConfig

    _, _, _, model = next_dirs("mistral")
    cfg = model.config
    assert cfg.text_model_type == "mistral"
    assert LlavaNextConfig.from_json_dict(cfg.to_json_dict()) == cfg
    assert LlavaNextConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


def test_cli_runs_a_hugging_face_llava_next_directory(next_dirs, tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    d, _, _, model = next_dirs("llama")
    img = tmp_path / "tall.png"
    PIL.Image.fromarray(_images()[0]).save(img)
    r = subprocess.run([sys.executable, "-m", "ep_jax.generate", "--model", str(d), "--image", str(img), "--prompt",
                        PROMPTS[0], "--max-new-tokens", "6", "--prune-layer", "2", "--keep-avg", "40", "--json",
                        "--explain", str(tmp_path / "kept.png")],
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent, timeout=600)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)["token_ids"][0]
    want = ep_jax.generate(model, [PIL.Image.open(img)], [PROMPTS[0]], max_new_tokens=6,
                           prune=PruneConfig(layer=2, avg_keep=40), return_ids=True)[1][0]
    assert got == want
    # --explain: the base view, its scores and the kept tile patches on the original image
    width, height = PIL.Image.open(tmp_path / "kept.png").size
    assert width > 2.5 * height


def test_buckets_keep_graphs_and_padding_small_for_random_aspect_ratios():
    """336-px geometry, 50 random aspect ratios (1:4..4:1): few (prompt bucket, slot bucket)
    graph keys and little padding (the README's numbers; fixed R, a ~10-token prompt)."""
    from ep_jax.families.llava_next import slot_bucket
    from ep_jax.families.llava_next.config import DEFAULT_PINPOINTS
    from ep_jax.families.llava_next.processing import NEXT_BUCKETS

    rng = np.random.default_rng(0)
    n_tok = []
    for _ in range(50):
        ar, area = np.exp(rng.uniform(np.log(1 / 4), np.log(4))), np.exp(rng.uniform(np.log(2e5), np.log(3e6)))
        size = (int(round(np.sqrt(area / ar))), int(round(np.sqrt(area * ar))))
        n_tok.append(anyres.num_image_tokens(size, DEFAULT_PINPOINTS, 336, 14))
    seq = [next(b for b in NEXT_BUCKETS if b >= n + 10) for n in n_tok]
    slots = [slot_bucket(n) for n in n_tok]
    assert len(set(zip(seq, slots))) <= 6
    assert np.mean([(s - n - 10) / s for s, n in zip(seq, n_tok)]) < 0.06
    assert np.mean([(s - n) / s for s, n in zip(slots, n_tok)]) < 0.06
    # --keep-avg 320: each image's own R, rounded up to R_BUCKET as the runtime does when the
    # slots are bucketed: 8 graph keys (32 without the rounding).
    from ep_jax.core.budget import budget
    from ep_jax.runtime.api import R_BUCKET

    r_max = [min(-(-budget(320, 32, 2, n) // R_BUCKET) * R_BUCKET, s) for n, s in zip(n_tok, slots)]
    assert len(set(zip(seq, slots, r_max))) <= 8


def test_presets_use_the_model_cards_prompt_formats():
    from ep_jax import presets
    from ep_jax.processing import format_prompt

    q = "What is shown in this image?"
    want = {
        "llava-v1.6-vicuna-7b-hf": "A chat between a curious human and an artificial intelligence assistant. The "
        "assistant gives helpful, detailed, and polite answers to the human's questions. USER: <image>\n" + q
        + " ASSISTANT:",
        "llava-v1.6-mistral-7b-hf": f"[INST] <image>\n{q} [/INST]",
        "llava-v1.6-34b-hf": "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\n"
        + q + "<|im_end|><|im_start|>assistant\n",
    }
    for name, text in want.items():
        preset = presets.get(name)
        assert preset.prune_layer == 2 and preset.supported
        assert format_prompt(q, preset.template) == text, name


def test_entropy_collapse_profile_runs_on_this_family(next_dirs):
    """The ECL profile reads every layer through the runtime's observer, with each row's own N
    (base, tile and newline tokens); per-example set entropies equal profiling each alone."""
    from ep_jax.analysis import ecl

    *_, model = next_dirs("llama")
    images = [PIL.Image.fromarray(im) for im in _images()]
    prof = ecl.profile_images(model, images, batch_size=2, progress=False)
    alone = [ecl.profile_images(model, [im], progress=False) for im in images]
    assert prof.set_entropy.shape == (2, model.config.text.num_layers + 1)
    for i in range(2):
        np.testing.assert_allclose(prof.set_entropy[i], alone[i].set_entropy[0], atol=1e-4)
    assert isinstance(ecl.find_ecl(prof).message, str)
