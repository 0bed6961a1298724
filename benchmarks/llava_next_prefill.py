"""LLaVA-NeXT prefill and time to first token (TTFT: preprocessing from the photo, prefill, first
greedy token) on this machine: unpruned against EntropyPrune at a fixed R = 320 per image
(the authors' LLaVA scripts) and at a layer average A = 320 with the image's own N (their
VLMEvalKit copy), measured side by side in one run (calls alternate, compile time apart), next
to the analytic FLOPs ratio, with the vision tower timed apart.

    python benchmarks/llava_next_prefill.py [--runs 3] [--image-size 672] [--out benchmarks/cpu-next-1b]

Model: the `1b` bench shape (CLIP-style ViT 6 x 768 at 336/14, LLaMA 32 x 1024) as a LLaVA-NeXT
with the llava-hf pinpoints, random weights, float32. A 672 x 672 photo gives the 2 x 2 tile grid
plus the base view: five 336-px crops and N = 2,928 visual tokens (7B's count).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys

import jax
from PIL import Image

import side_by_side

from ep_jax import bench_setup
from ep_jax.core import flops
from ep_jax.core.budget import PruneConfig
from ep_jax.families.llava_next import FAMILY
from ep_jax.families.llava_next.config import LlavaNextConfig
from ep_jax.families.llava_next.processing import AnyResImageProcessor, NextProcessor

LAYER = 2
SETTINGS = {"unpruned": None, "entropy R=320": PruneConfig(layer=LAYER, keep=320),
            "entropy A=320": PruneConfig(layer=LAYER, avg_keep=320)}


def build(image_size: int):
    base = bench_setup.get_config("1b")
    cfg = LlavaNextConfig(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)})
    model = bench_setup.random_model(cfg, "float32", family=FAMILY)
    side = cfg.vision.image_size
    proc = NextProcessor(bench_setup.build_tokenizer(),
                         AnyResImageProcessor(size=side, crop_size=(side, side)),
                         patch_size=cfg.vision.patch_size, image_seq_len=cfg.base_grid ** 2, image_token="<image>")
    image = Image.fromarray(bench_setup.photo()).resize((image_size, image_size), Image.BICUBIC)
    return cfg, model, proc, image


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--image-size", type=int, default=672)
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = p.parse_args(argv)
    cfg, model, proc, image = build(args.image_size)
    enc = proc.encode([bench_setup.PROMPT], [[image]], template=bench_setup.PROMPT_TEMPLATE, bucket_sizes=None)

    runs = side_by_side.compile_settings(model, enc, SETTINGS)
    vision = jax.jit(lambda st, px: __import__("flax").nnx.merge(model.graphdef, st).image_features(px))
    crops = runs["unpruned"]["args"][1]["pixel_values"]
    vision_s = side_by_side.time_rounds(
        model, runs, lambda: proc.encode([bench_setup.PROMPT], [[image]], template=bench_setup.PROMPT_TEMPLATE,
                                         bucket_sizes=None),
        args.runs, vision=lambda: vision(model.state, crops))

    n = runs["unpruned"]["n"]
    seq = int(enc["attention_mask"].sum())
    base_ms = 1e3 * statistics.median(runs["unpruned"]["s"])
    rows = side_by_side.summary_rows(
        runs, lambda keep: flops.prefill_flops(cfg.text, seq) / flops.prefill_flops(cfg.text, seq, n, LAYER, keep))
    vision_ms = 1e3 * statistics.median(vision_s)
    lines = [f"LLaVA-NeXT `1b` shape, {args.image_size}x{args.image_size} photo: N = {n} visual tokens "
             f"({crops.shape[0]} crops), prompt {seq} tokens, K = {LAYER}, float32, median of {args.runs}.",
             "", *side_by_side.markdown_table(rows)]
    lines += ["", f"Vision tower + projector alone ({crops.shape[0]} crops): {vision_ms:.0f} ms = "
              f"{100 * vision_ms / base_ms:.1f} % of the unpruned prefill; pruning cannot shorten it."]
    side_by_side.write_outputs(
        args.out, "LLaVA-NeXT prefill, pruned vs unpruned",
        f"python benchmarks/llava_next_prefill.py --runs {args.runs} --image-size {args.image_size} --out {args.out}",
        "\n".join(lines), {"n": n, "seq": seq, "vision_ms": vision_ms, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
