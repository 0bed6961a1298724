"""Qwen2.5-VL video prefill and time to first token on this machine: unpruned against EntropyPrune
at K = 1 keeping 25 %, 12.5 % and 10 % of the video's visual tokens (layer averages,
`--keep-ratio`), one top-R over all frames, measured side by side in one run (calls alternate,
compile time apart; `side_by_side.py`), next to the analytic FLOPs ratio. Reading the frames from
the mp4, the vision tower alone and greedy decoding are timed apart.

    python benchmarks/qwen_video_prefill.py [--runs 3] [--out benchmarks/qwen-video-cpu]

Video: the shipped example's scene (a ball crossing a photo, `examples/make_video.py`) rendered
at 504 x 280, 16 s at 8 fps, written to a temporary mp4 and read back at Qwen's 2 fps: 32 frames,
16 temporal patches of 20 x 36 patches, N = 2,880 visual tokens (11,520 patches).

Model: `qwen_prefill.py`'s Qwen2.5-VL-7B-like shape at CPU widths (the 7B's depths: a 28-layer
decoder, a 32-block window-attention vision tower; `--width` 1024 by default: decoder 1024 with
16 query / 2 key-value heads of 64 and the 7B's MLP ratio, vision 320; `--width 512` halves both
for a quicker run); random weights, float32. The table ends with what the same input costs
by FLOPs on this shape and on Qwen2.5-VL-7B itself, for comparison.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

import qwen_prefill
import side_by_side

from ep_jax import bench_setup
from ep_jax.core import flops
from ep_jax.core.budget import PruneConfig
from ep_jax.families.qwen2_5_vl import FAMILY
from ep_jax.families.qwen2_5_vl import vision as qwen_vision
from ep_jax.families.qwen2_5_vl.processing import QwenImageProcessor, QwenProcessor
from ep_jax.families.qwen2_5_vl.video_processing import QwenVideoProcessor
from ep_jax.runtime import api
from ep_jax.runtime.engine import compiled
from ep_jax.video import read_video

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import make_video  # noqa: E402

LAYER = 1
SETTINGS = {"unpruned": None, "entropy 25 %": PruneConfig(layer=LAYER, keep_ratio=0.25),
            "entropy 12.5 %": PruneConfig(layer=LAYER, keep_ratio=0.125),
            "entropy 10 %": PruneConfig(layer=LAYER, keep_ratio=0.10)}
FRAME = (504, 280)  # width, height: 36 x 20 patches of 14 per frame pair -> 180 merged tokens
SECONDS, SOURCE_FPS = 16, 8
PROMPT = "What happens in this video? Describe the motion of the ball."


def config(width: int):
    """qwen_prefill.CONFIG at decoder width `width` (heads of 64, 7B's MLP ratio 5.3) and vision
    width width / 3.2 (as 1024 / 320 there)."""
    base = qwen_prefill.CONFIG
    text = dataclasses.replace(base.text, hidden_size=width, intermediate_size=round(width * 5.3125 / 32) * 32,
                               num_heads=width // 64, num_kv_heads=2, head_dim=64, mrope_section=(8, 12, 12))
    vwidth = int(width / 3.2) // 32 * 32
    vision = dataclasses.replace(base.vision, hidden_size=vwidth, intermediate_size=round(vwidth * 2.7 / 32) * 32,
                                 num_heads=vwidth // 80 if vwidth % 80 == 0 else 2, out_hidden_size=width)
    return dataclasses.replace(base, text=text, vision=vision)


def write_video(path: Path) -> None:
    """The example's scene at FRAME size, SECONDS long at SOURCE_FPS."""
    make_video.write(path, make_video.frames(SECONDS, SOURCE_FPS, FRAME), SOURCE_FPS)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = p.parse_args(argv)
    os.environ["EP_JAX_COMPILATION_CACHE"] = "off"  # compile times as a first run's, not read from disk
    cfg = config(args.width)
    model = bench_setup.random_model(cfg, "float32", family=FAMILY)
    proc = QwenProcessor(qwen_prefill.build_tokenizer(), QwenImageProcessor(), video_processor=QwenVideoProcessor())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "video.mp4"
        write_video(path)
        reads = []
        for _ in range(3):
            t0 = time.perf_counter()
            video = read_video(path)
            reads.append(time.perf_counter() - t0)
    read_ms = 1e3 * statistics.median(reads)

    def encode():
        return proc.encode([PROMPT], None, videos=[video], bucket_sizes=None)

    enc = encode()
    runs = side_by_side.compile_settings(model, enc, SETTINGS)
    vision = jax.jit(lambda st, inputs: nnx.merge(model.graphdef, st).image_features(inputs))
    inputs = runs["unpruned"]["args"][1]
    vision_s = side_by_side.time_rounds(model, runs, encode, args.runs, vision=lambda: vision(model.state, inputs))
    decode = {name: decode_ms(model, enc, SETTINGS[name], args.decode_tokens) for name in ("unpruned", "entropy 10 %")}
    towers = tower_variants(model, enc, args.runs)

    n, seq = runs["unpruned"]["n"], int(enc["attention_mask"].sum())
    rows = side_by_side.summary_rows(
        runs, lambda keep: flops.prefill_flops(cfg.text, seq) / flops.prefill_flops(cfg.text, seq, n, LAYER, keep))
    vision_ms = 1e3 * statistics.median(vision_s)
    grid = enc["video_grid_thw"][0].tolist()
    t, v = cfg.text, cfg.vision
    lines = [f"Qwen2.5-VL-7B-like shape at CPU widths (decoder {t.num_layers} x {t.hidden_size}, vision {v.depth} x "
             f"{v.hidden_size}), a {SECONDS} s {FRAME[0]}x{FRAME[1]} mp4 at {SOURCE_FPS} fps sampled at 2 fps: "
             f"{video.num_frames} frames, grid {grid} ({int(np.prod(grid))} patches), N = {n} visual tokens, prompt "
             f"{seq} tokens, K = {LAYER}, float32, median of {args.runs}.", "", *side_by_side.markdown_table(rows), "",
             *side_by_side.decoder_table(rows, vision_ms), "",
             *qwen_prefill.flops_lines(cfg, enc["video_grid_thw"], seq, n, rows), "",
             *tower_lines(towers), "",
             f"Apart: reading and sampling the {video.num_frames} frames from the mp4 (PyAV) {read_ms:.0f} ms (not in "
             f"TTFT, which starts from the decoded frames); greedy decoding of {args.decode_tokens} tokens after the "
             "prefill: " + ", ".join(f"{k} {ms:.0f} ms ({1e3 * (args.decode_tokens - 1) / ms:.1f} tokens/s)"
                                      for k, ms in decode.items()) + "."]
    command = f"python benchmarks/qwen_video_prefill.py --runs {args.runs} --width {args.width}" + (
        f" --out {args.out}" if args.out else "")
    side_by_side.write_outputs(args.out, "Qwen2.5-VL video prefill, pruned vs unpruned", command, "\n".join(lines), {
        "n": n, "seq": seq, "grid": grid, "frames": video.num_frames, "read_ms": read_ms, "vision_ms": vision_ms,
        "decode_ms": decode, "tower_ms": towers, "rows": rows})
    return 0


TOWERS = {"as run": {}, "rows whole (no ROW_CHUNK)": {"ROW_CHUNK": 1 << 30},
          "attention groups of SEGMENT_SCORES (not CPU_GROUP_SCORES)":
              {"CPU_GROUP_SCORES": qwen_vision.SEGMENT_SCORES},
          "patches padded to 1,024 (PATCH_BUCKET)": {"VIDEO_PATCH_BUCKET": qwen_vision.PATCH_BUCKET},
          "q and k rotated before the gathers (no ROTATE_IN_GROUPS)": {"ROTATE_IN_GROUPS": False}}


def tower_variants(model, enc, rounds: int) -> dict[str, dict]:
    """The vision tower as run, against the same tower with each of its choices undone (settings
    of `families/qwen2_5_vl/vision.py`, read when inputs are prepared and graphs traced), called
    in turn `rounds` times after a warm-up: median ms and padded patches of each."""
    fns = {}
    for name, values in TOWERS.items():
        saved = {k: getattr(qwen_vision, k) for k in values}
        try:
            for k, v in values.items():
                setattr(qwen_vision, k, v)
            inputs = api.prepare(model, enc["input_ids"], enc["pixel_values"], enc["attention_mask"],
                                 **api.extra_arrays(enc))[0]
            fn = jax.jit(lambda st, inputs: nnx.merge(model.graphdef, st).image_features(inputs))
            t0 = time.perf_counter()
            fns[name] = (fn.lower(model.state, inputs).compile(), inputs, time.perf_counter() - t0)
        finally:
            for k, v in saved.items():
                setattr(qwen_vision, k, v)
    times = {name: [] for name in fns}
    for i in range(rounds + 1):
        for name in list(fns)[i % len(fns):] + list(fns)[:i % len(fns)]:
            fn, inputs, _ = fns[name]
            t0 = time.perf_counter()
            jax.block_until_ready(fn(model.state, inputs))
            if i:
                times[name].append(time.perf_counter() - t0)
    return {name: {"ms": 1e3 * statistics.median(t), "patches": len(fns[name][1]["pixel_values"]),
                   "compile_s": fns[name][2]} for name, t in times.items()}


def tower_lines(towers: dict[str, dict]) -> list[str]:
    base = towers["as run"]["ms"]
    return [f"The vision tower alone, as run and with each of its {len(towers) - 1} choices undone, called in turn "
            "(median; settings of `families/qwen2_5_vl/vision.py`):", "",
            "| tower | patches (padded) | ms | vs as run | compile s |", "|---|---:|---:|---:|---:|",
            *(f"| {name} | {t['patches']} | {t['ms']:.0f} | {t['ms'] / base:.2f}x | {t['compile_s']:.1f} |"
              for name, t in towers.items())]


def decode_ms(model, enc, prune, tokens: int) -> float:
    """Greedy decoding of `tokens` tokens after the prefill (`api.decode_all`, EOS never stops
    it), compiled and warmed up first; the prefill itself is not timed."""
    inputs, spans, stage, extra = api.prepare(model, enc["input_ids"], enc["pixel_values"], enc["attention_mask"],
                                              prune=prune, **api.extra_arrays(enc))
    room = api.room_for(tokens)
    args = (model.state, inputs, spans, extra)
    prefill = compiled(model, api.prefill_logits, dict(stage=stage, decode_room=room, all_logits=False), args)
    logits, res = prefill(*args)
    dargs = (model.state, logits, res.cache, jax.random.key(0), np.float32(0), np.float32(1), np.int32(tokens))
    run = compiled(model, api.decode_all, dict(room=room, top_k=0, greedy=True, eos_ids=(-1,), pad_id=0), dargs)
    jax.block_until_ready(run(*dargs))
    t0 = time.perf_counter()
    jax.block_until_ready(run(*dargs))
    return 1e3 * (time.perf_counter() - t0)


if __name__ == "__main__":
    sys.exit(main())
