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
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np
from PIL import Image

from ep_jax import bench_setup
from ep_jax.core import flops
from ep_jax.core.budget import PruneConfig
from ep_jax.families.llava_next import FAMILY
from ep_jax.families.llava_next.config import LlavaNextConfig
from ep_jax.families.llava_next.processing import AnyResImageProcessor, NextProcessor
from ep_jax.runtime import api
from ep_jax.runtime.engine import compile_stats, compiled

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
    more = api.extra_arrays(enc)

    runs = {}
    for name, prune in SETTINGS.items():
        inputs, spans, stage, extra = api.prepare(model, enc["input_ids"], enc["pixel_values"], enc["attention_mask"],
                                                  prune=prune, **more)
        args_ = (model.state, inputs, spans, extra)
        before = compile_stats(model)["compile_s"]
        fn = compiled(model, api.prefill_logits, dict(stage=stage, decode_room=0, all_logits=False), args_)
        runs[name] = dict(fn=fn, args=args_, stage=stage, keep=None if extra is None else int(extra["keep"][0]),
                          n=int(spans.counts()[0]), compile_s=compile_stats(model)["compile_s"] - before, s=[], ttft=[])
        print(f"compiled {name} in {runs[name]['compile_s']:.1f} s", file=sys.stderr)
    vision = jax.jit(lambda st, px: __import__("flax").nnx.merge(model.graphdef, st).image_features(px))
    crops = runs["unpruned"]["args"][1]["pixel_values"]
    jax.block_until_ready(vision(model.state, crops))
    vision_s = []
    for i in range(args.runs + 1):  # the first round warms up
        for name, r in runs.items():
            # What a request pays: preprocessing from the photo and prompt (crops, tokens, spans,
            # budgets), the prefill, and the first greedy token.
            t0 = time.perf_counter()
            fresh = proc.encode([bench_setup.PROMPT], [[image]], template=bench_setup.PROMPT_TEMPLATE,
                                bucket_sizes=None)
            inputs, spans, _, extra = api.prepare(model, fresh["input_ids"], fresh["pixel_values"],
                                                  fresh["attention_mask"], prune=SETTINGS[name], **more)
            t1 = time.perf_counter()
            logits, _ = r["fn"](model.state, inputs, spans, extra)
            jax.block_until_ready(logits)
            t2 = time.perf_counter()
            int(np.argmax(np.asarray(logits)[0]))
            if i:
                r["s"].append(t2 - t1)
                r["ttft"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        jax.block_until_ready(vision(model.state, crops))
        if i:
            vision_s.append(time.perf_counter() - t0)
        print(f"round {i}/{args.runs} done", file=sys.stderr)

    n = runs["unpruned"]["n"]
    seq = int(enc["attention_mask"].sum())
    base_ms = 1e3 * statistics.median(runs["unpruned"]["s"])
    base_ttft = 1e3 * statistics.median(runs["unpruned"]["ttft"])
    rows = []
    for name, r in runs.items():
        ms = 1e3 * statistics.median(r["s"])
        ttft = 1e3 * statistics.median(r["ttft"])
        keep = n if r["keep"] is None else r["keep"]
        analytic = flops.prefill_flops(cfg.text, seq) / flops.prefill_flops(cfg.text, seq, n, LAYER, keep) \
            if r["keep"] is not None else 1.0
        rows.append({"setting": name, "R": keep, "prefill_ms": ms, "speedup": base_ms / ms,
                     "ttft_ms": ttft, "ttft_speedup": base_ttft / ttft,
                     "analytic_flops_speedup": analytic, "compile_s": r["compile_s"],
                     "runs_ms": [1e3 * t for t in r["s"]]})
    vision_ms = 1e3 * statistics.median(vision_s)
    lines = [f"LLaVA-NeXT `1b` shape, {args.image_size}x{args.image_size} photo: N = {n} visual tokens "
             f"({crops.shape[0]} crops), prompt {seq} tokens, K = {LAYER}, float32, median of {args.runs}.",
             "", "| setting | R | prefill ms | prefill speedup | TTFT ms | TTFT speedup | analytic FLOPs speedup "
             "(decoder) | compile s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['setting']} | {r['R']} | {r['prefill_ms']:.0f} | {r['speedup']:.2f}x | {r['ttft_ms']:.0f} | "
              f"{r['ttft_speedup']:.2f}x | {r['analytic_flops_speedup']:.2f}x | {r['compile_s']:.1f} |" for r in rows]
    lines += ["", f"Vision tower + projector alone ({crops.shape[0]} crops): {vision_ms:.0f} ms = "
              f"{100 * vision_ms / base_ms:.1f} % of the unpruned prefill; pruning cannot shorten it."]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out + ".json").write_text(json.dumps({"n": n, "seq": seq, "vision_ms": vision_ms,
                                                        "rows": rows}, indent=1) + "\n")
        Path(args.out + ".md").write_text(
            f"# LLaVA-NeXT prefill, pruned vs unpruned\n\n`python benchmarks/llava_next_prefill.py --runs "
            f"{args.runs} --image-size {args.image_size} --out {args.out}` on this machine "
            f"({jax.devices()[0].device_kind}, {bench_setup.machine_info()['cpu_count']} cores).\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
