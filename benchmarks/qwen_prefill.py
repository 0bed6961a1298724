"""Qwen2.5-VL prefill and time to first token on this machine: unpruned against EntropyPrune at
the paper's Table 3 budgets (K = 1; 25 % and 12.5 % of each image's visual tokens as layer
averages, `--keep-ratio 0.25 / 0.125`), measured side by side in one run (calls alternate,
compile time apart), next to the analytic FLOPs ratio, with the vision tower timed apart.

    python benchmarks/qwen_prefill.py [--runs 3] [--out benchmarks/cpu-qwen-1b]

Model: Qwen2.5-VL-7B's shape scaled to this CPU, random weights, float32: the 7B's depths (a
28-layer decoder, a 32-block window-attention vision tower with full attention at blocks 7, 15,
23, 31) at reduced widths (decoder 1024 with 8 query / 2 key-value heads of 128 and the 7B's
MLP ratio; vision 320), so the vision tower's share of the prefill is near the 7B's. One photo
resized to 1120 x 896 (transformers' default max_pixels) gives N = 1,280 visual tokens.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import jax
import numpy as np
from flax import nnx
from PIL import Image

import side_by_side

from ep_jax import bench_setup
from ep_jax.config import TextConfig
from ep_jax.core import flops
from ep_jax.core.budget import PruneConfig
from ep_jax.families.qwen2_5_vl import FAMILY
from ep_jax.families.qwen2_5_vl.config import Qwen25VLConfig, QwenVisionConfig
from ep_jax.families.qwen2_5_vl.processing import QwenImageProcessor, QwenProcessor
from ep_jax.processing import TEMPLATES
from ep_jax.tokenizer import Tokenizer

LAYER = 1
SETTINGS = {"unpruned": None, "entropy 25 %": PruneConfig(layer=LAYER, keep_ratio=0.25),
            "entropy 12.5 %": PruneConfig(layer=LAYER, keep_ratio=0.125)}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>"]
IMAGE_SIZE = (1120, 896)  # width, height: 80 x 64 patches of 14 -> 1,280 merged tokens

CONFIG = Qwen25VLConfig(
    vision=QwenVisionConfig(depth=32, hidden_size=320, intermediate_size=864, num_heads=4, out_hidden_size=1024),
    text=TextConfig(vocab_size=32064, hidden_size=1024, intermediate_size=5440, num_layers=28, num_heads=8,
                    num_kv_heads=2, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
                    max_position_embeddings=32768, attention_bias=True, o_bias=False, mrope_section=(16, 24, 24)),
    image_token_id=5, video_token_id=6, vision_start_token_id=3, vision_end_token_id=4, pad_token_id=0,
    eos_token_id=2, bos_token_id=None)


# Qwen2.5-VL-7B-Instruct's shapes (config.json on the hub): for the analytic share of its vision tower
QWEN_7B = Qwen25VLConfig(vision=QwenVisionConfig(), text=TextConfig(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28, num_kv_heads=4,
    head_dim=128, attention_bias=True, o_bias=False, mrope_section=(16, 24, 24)))


def flops_lines(cfg, grids, seq: int, n: int, rows: list[dict]) -> list[str]:
    """What the same input costs by FLOPs, for this benchmark's shape `cfg` and for
    Qwen2.5-VL-7B itself: the vision tower's share of the prefill and the whole-prefill ratio at
    each measured R (same L = 28 and K, so the same R)."""
    def line(name, c):
        vision = sum(flops.window_vision_flops(c.vision, g) for g in grids)
        decoder = flops.prefill_flops(c.text, seq)
        pruned = {r["setting"]: vision + flops.prefill_flops(c.text, seq, n, LAYER, r["R"]) for r in rows if r["R"] != n}
        ratios = ", ".join(f"{setting} {(vision + decoder) / f:.2f}x" for setting, f in pruned.items())
        return f"{name} on this input, by FLOPs (`core.flops`): vision tower " \
               f"{100 * vision / (vision + decoder):.1f} % of the prefill; whole-prefill ratio {ratios}."
    return [line("This benchmark's shape", cfg), "", line("Qwen2.5-VL-7B itself", QWEN_7B)]


def build_tokenizer() -> Tokenizer:
    """A word-level tokenizer over the chat template and prompt, with Qwen's special tokens at the
    ids CONFIG names (one token per word, about what Qwen's BPE gives for plain English)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    template = TEMPLATES["qwen2_5_vl"]
    text = template.prefix + template.suffix + bench_setup.PROMPT + " system user assistant You are a helpful"
    words = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab["<unk>"] = len(vocab)
    for special in SPECIALS:
        text = text.replace(special, " ")
    for word, _ in words.pre_tokenize_str(text):
        vocab.setdefault(word, len(vocab))
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = words
    backend.add_special_tokens(SPECIALS)
    return Tokenizer(backend, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "image_token": "<|image_pad|>"},
                     extra_special_tokens=SPECIALS)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = p.parse_args(argv)
    model = bench_setup.random_model(CONFIG, "float32", family=FAMILY)
    proc = QwenProcessor(build_tokenizer(), QwenImageProcessor())
    image = Image.fromarray(bench_setup.photo()).resize(IMAGE_SIZE, Image.BICUBIC)

    def encode():
        return proc.encode([bench_setup.PROMPT], [[image]], bucket_sizes=None)

    enc = encode()
    runs = side_by_side.compile_settings(model, enc, SETTINGS)
    vision = jax.jit(lambda st, inputs: nnx.merge(model.graphdef, st).image_features(inputs))
    inputs = runs["unpruned"]["args"][1]
    vision_s = side_by_side.time_rounds(model, runs, encode, args.runs, vision=lambda: vision(model.state, inputs))

    n, seq = runs["unpruned"]["n"], int(enc["attention_mask"].sum())
    text = CONFIG.text
    rows = side_by_side.summary_rows(
        runs, lambda keep: flops.prefill_flops(text, seq) / flops.prefill_flops(text, seq, n, LAYER, keep))
    vision_ms = 1e3 * statistics.median(vision_s)
    patches = int(np.prod(enc["image_grid_thw"][0]))
    lines = [f"Qwen2.5-VL-7B-like shape (decoder 28 x 1024, vision 32 x 320), {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} photo: "
             f"{patches} patches, N = {n} visual tokens, prompt {seq} tokens, K = {LAYER}, float32, "
             f"median of {args.runs}.", "", *side_by_side.markdown_table(rows), "",
             *side_by_side.decoder_table(rows, vision_ms), "",
             *flops_lines(CONFIG, enc["image_grid_thw"], seq, n, rows), "",
             "R is the budget of the layers after K = 1: keep_ratio r gives R = floor(N (28 r - 1) / 27)."]
    side_by_side.write_outputs(
        args.out, "Qwen2.5-VL prefill, pruned vs unpruned",
        f"python benchmarks/qwen_prefill.py --runs {args.runs} --out {args.out}", "\n".join(lines),
        {"n": n, "seq": seq, "patches": patches, "vision_ms": vision_ms, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
