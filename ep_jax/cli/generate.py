"""`python -m ep_jax.generate`: answer questions about images or videos, optionally with pruning.

Every flag is checked before the model is loaded; errors follow `ep_jax.cli` (exit 2 and one
`error:` line for a problem the user can fix).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from ep_jax.cli import add_debug_flag, add_mesh_argument, run_cli
from ep_jax.errors import InputError
from ep_jax.files import check_output_file

METHODS = ["none", "entropy", "fastv", "random", "pool"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ep_jax.generate",
        description="Answer a question about one or more images with a vision-language model in JAX, "
        "pruning visual tokens with EntropyPrune inside the compiled graph.",
    )
    p.add_argument("--model", help="ep_jax checkpoint or Hugging Face directory "
                   "(default: the small model shipped with ep_jax)")
    p.add_argument("--image", action="append", default=[], help="image file; repeat for a batch")
    p.add_argument("--video", action="append", default=[], metavar="FILE",
                   help="video file (mp4, webm, mkv, gif, ...) or folder of frames; repeat for a batch "
                        "(Qwen2.5-VL models; with --image too, example i gets image i and video i)")
    p.add_argument("--fps", type=float, default=None,
                   help="frames sampled per second of video (default 2.0, as Qwen2.5-VL)")
    p.add_argument("--prompt", action="append", required=True,
                   help="question; one for all images/videos, or one per example")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="parameter dtype (default: as saved)")
    p.add_argument("--layout", choices=["auto", "stacked", "per_layer"], default="auto",
                   help="decoder weights in memory: stacked (lax.scan, fast compile) or per_layer (unrolled, "
                        "faster CPU decode for large layers); auto picks per backend and size")
    add_mesh_argument(p)
    p.add_argument("--template", default=None, help="chat template (default: the model preset's)")
    p.add_argument("--raw-prompt", action="store_true",
                   help="use the prompt as is (it must contain the image / video tokens)")
    p.add_argument("--stream", action="store_true", help="print tokens as they come (batch of one)")
    p.add_argument("--json", action="store_true", help="print answers, pruning report and timings as JSON")
    g = p.add_argument_group("pruning (default: the model preset's; --prune none runs the full model)")
    g.add_argument("--prune", choices=METHODS, default=None, help="method (default: the model preset's, else none)")
    g.add_argument("--prune-layer", default=None, help="K, the first layer on the pruned sequence, or 'auto'")
    budget = g.add_mutually_exclusive_group()
    budget.add_argument("--keep-avg", type=int, default=None, help="A: average visual tokens per layer")
    budget.add_argument("--keep", type=int, default=None, help="R: visual tokens kept from layer K on")
    budget.add_argument("--keep-ratio", type=float, default=None,
                        help="layer-averaged fraction of each example's visual tokens (0.25, 0.125)")
    g.add_argument("--score-source", choices=["query", "key", "value", "hidden"], default="query")
    g.add_argument("--explain", metavar="PNG", help="write the image with kept patches and the score map "
                   "(a video: a strip of its sampled frames with the kept patches)")
    add_debug_flag(p)
    return p


def main(argv=None) -> int:
    return run_cli(build_parser(), _run, argv)


# ---------------------------------------------------------------------- checks before loading
def check_args(args) -> None:
    """Every flag that can be checked without the model, so a mistake costs no load time."""
    from ep_jax.runtime.api import check_prompts, check_sampling

    check_prompts(args.prompt)
    check_sampling(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed)
    if args.mesh is not None:
        from ep_jax.runtime.sharding import parse_mesh

        parse_mesh(args.mesh)
    examples = num_examples(args)
    if args.stream and examples > 1:
        raise InputError("--stream prints one answer as it is generated: give a single --image or --video")
    if args.stream and args.json:
        raise InputError("--stream and --json both write the answer to stdout: choose one")
    videos = getattr(args, "video", [])
    if len(args.prompt) not in (1, examples):
        what = "videos" if videos and not args.image else "images"
        raise InputError(f"{len(args.prompt)} prompts for {examples} {what}: give one --prompt, or one per example")
    if getattr(args, "fps", None) is not None:
        if not videos:
            raise InputError("--fps sets how a video is sampled: give a --video")
        if not (math.isfinite(args.fps) and args.fps > 0):
            raise InputError(f"--fps {args.fps}: give a number of frames per second > 0 (e.g. 2)")
    if args.prune_layer is not None and args.prune_layer != "auto":
        try:
            layer = int(args.prune_layer)
        except ValueError:
            raise InputError(f"--prune-layer {args.prune_layer!r}: give an int K >= 1 or 'auto'") from None
        if layer < 1:
            raise InputError(f"--prune-layer {layer}: K must be >= 1 (scores come from layer K-1)")
    for flag, value in (("--keep", args.keep), ("--keep-avg", args.keep_avg)):
        if value is not None and value < 0:
            raise InputError(f"{flag} {value}: give a token count >= 0")
    if args.keep_ratio is not None and not (math.isfinite(args.keep_ratio) and 0 <= args.keep_ratio <= 1):
        raise InputError(f"--keep-ratio {args.keep_ratio}: give a fraction in [0, 1]")
    if args.prune == "none" and (args.keep is not None or args.keep_avg is not None or args.keep_ratio is not None
                                 or args.prune_layer is not None):
        raise InputError("--keep/--keep-avg/--keep-ratio/--prune-layer need a pruning method (--prune entropy)")
    if args.explain:
        check_output_file(args.explain, "--explain")
        if args.prune == "none":
            raise InputError("--explain shows the pruning decision: enable pruning (--prune entropy)")


def num_examples(args) -> int:
    """The batch size: one example per --image and/or per --video (example i gets both)."""
    videos = getattr(args, "video", [])  # absent from a caller's own namespace (`python -m ep_jax.eval`)
    if not args.image and not videos:
        raise InputError("give an --image or a --video to ask about")
    if args.image and videos and len(args.image) != len(videos):
        raise InputError(f"{len(args.image)} --image and {len(videos)} --video: with both, give one of each "
                         "per example")
    return max(len(args.image), len(videos))


def prune_config(args, preset, family=None):
    """The PruneConfig of these flags; unset parts come from the model preset (the API's
    `default_prune` when no flag is given at all); without a preset K is the family's paper
    setting (`Family.default_prune_layer`)."""
    from ep_jax.core.budget import PruneConfig
    from ep_jax.runtime.api import default_prune

    method, budgets = args.prune, (args.keep, args.keep_avg, args.keep_ratio)
    if method is None and args.prune_layer is None and all(b is None for b in budgets):
        return default_prune(preset)
    if method is None:
        method = "entropy"
    if method == "none":
        return None
    layer = args.prune_layer
    if layer is None:
        layer = preset.prune_layer if preset is not None and preset.prune_layer is not None else \
            getattr(family, "default_prune_layer", 2)
    elif layer != "auto":
        layer = int(layer)
    keep, avg, ratio = budgets
    if all(b is None for b in budgets):  # the preset's default budget
        avg = None if preset is None else preset.default_avg_keep
        ratio = None if preset is None or avg is not None else preset.default_keep_ratio
        if avg is None and ratio is None:
            raise InputError("give a budget: --keep-avg A (e.g. 64), --keep R or --keep-ratio 0.25")
    return PruneConfig(method=method, layer=layer, avg_keep=avg, keep=keep, keep_ratio=ratio, source=args.score_source)


# ---------------------------------------------------------------------- run
def _run(args) -> int:
    t_start = time.perf_counter()
    check_args(args)
    from ep_jax import checkpoint, presets
    from ep_jax.runtime.sharding import mesh_from_flag
    from ep_jax.image_files import load_image
    from ep_jax.runtime.api import run_generation

    images = [load_image(Path(f)) for f in args.image]  # unreadable files fail before the model loads
    videos, video_read_s = read_videos(args)
    examples = num_examples(args)
    prompts = args.prompt * examples if len(args.prompt) == 1 else args.prompt

    model_path = args.model
    if model_path is None:
        model_path = presets.default_model_path()
        print(f"using the shipped model {model_path} (pass --model for another)", file=sys.stderr)
    t_load = time.perf_counter()
    model = checkpoint.load(model_path, dtype=args.dtype, layout=args.layout, mesh=mesh_from_flag(args.mesh))
    load_s = time.perf_counter() - t_load
    prune = prune_config(args, model.preset, model.family)
    if args.explain and prune is None:
        raise InputError("--explain shows the pruning decision, but nothing is pruned: add --prune entropy")
    template = "raw" if args.raw_prompt else args.template

    on_token = None
    if args.stream:
        proc = model.processor
        produced: list[int] = []
        printed = [""]

        def on_token(tokens):
            produced.append(tokens[0])
            text = proc.decode(produced)
            sys.stdout.write(text[len(printed[0]):])
            sys.stdout.flush()
            printed[0] = text

    gen = run_generation(
        model, [[im] for im in images] if images else None, prompts, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
        prune=prune, template=template, on_token=on_token, **({"videos": videos} if videos else {}),
    )
    reports = prune_reports(model, gen)
    pairs = [kept_per_frame_pair(model, gen, i) for i in range(len(prompts))] if videos and gen.stage else None
    if args.explain:
        explain(args.explain, model, gen, images, videos)

    if args.json:
        timings = {"load_s": load_s, **({"video_read_ms": 1e3 * video_read_s} if videos else {}), **gen.timings,
                   "total_s": time.perf_counter() - t_start}
        out = {
            "answers": gen.texts,
            "token_ids": gen.token_ids,
            "prune": None if gen.stage is None else {
                "method": gen.stage.config.method,
                "budget": describe_budget(gen.stage.config),
                **reports[0].to_dict(),
                "per_example": [r.to_dict() for r in reports],
                **({"video_kept_per_frame_pair": pairs} if pairs else {}),
            },
            "timings": timings,
            "model": str(model_path),
        }
        print(json.dumps(out, indent=1))
        return 0
    for i, report in enumerate(reports):
        label = "" if len(reports) == 1 else f" example {i}:"
        print(f"[{gen.stage.config.method}]{label} {report} | budget: {describe_budget(gen.stage.config)}",
              file=sys.stderr)
        for v, counts in enumerate(pairs[i] if pairs else []):
            print(f"  video {v}: kept per frame pair {counts['kept']} of {counts['tokens']} tokens each",
                  file=sys.stderr)
    if args.stream:
        print()
    else:
        for text in gen.texts:
            print(text)
    return 0


def describe_budget(cfg) -> str:
    """Which budget convention a run used, in words (the reports print A and R either way)."""
    if cfg.keep is not None:
        return f"fixed R = {cfg.keep} per example"
    if cfg.keep_ratio is not None:
        return f"layer-averaged {100 * cfg.keep_ratio:g} % of each example's N"
    return f"layer-averaged A = {cfg.avg_keep} with each example's own N"


def prune_reports(model, gen) -> list:
    """One FLOPs/KV report per example, from its own N and R."""
    from ep_jax.core.flops import prune_report

    if gen.stage is None:
        return []
    counts = gen.spans.counts()
    lengths = gen.inputs["attention_mask"].sum(1)
    return [
        prune_report(model.config.text, int(lengths[i]), int(counts[i]), gen.stage.layer, int(gen.keep[i]),
                     bytes_per_elem=model.dtype.itemsize, requested_avg_keep=gen.stage.config.avg_keep)
        for i in range(len(counts))
    ]


# ---------------------------------------------------------------------- video
def read_videos(args) -> tuple[list, float]:
    """The --video files' sampled frames (before the model loads, so a bad file costs no load
    time) and the time reading them took."""
    if not args.video:
        return [], 0.0
    from ep_jax.video import DEFAULT_FPS, read_video

    t0 = time.perf_counter()
    videos = [read_video(Path(f), fps=args.fps or DEFAULT_FPS) for f in args.video]
    return videos, time.perf_counter() - t0


def video_items(model, gen, example: int) -> list[int]:
    """Which of the example's images/videos (span `image` ids) are videos."""
    video_id = getattr(model.config, "video_token_id", None)
    spans = gen.spans.example(example)
    ids = gen.inputs["input_ids"][example][spans.positions[0]]
    return sorted({int(k) for k in spans.image[0][ids == video_id]})


def kept_per_frame_pair(model, gen, example: int) -> list[dict]:
    """Per video of the example: its tokens per temporal patch (frame pair) and how many of them
    the prune stage kept, pair by pair."""
    import numpy as np

    spans = gen.spans.example(example)
    kept = np.asarray(gen.prefill.kept_mask[example])[spans.positions[0]]
    out = []
    for v in video_items(model, gen, example):
        mine = spans.image[0] == v
        t = spans.coords[0, mine, 0]
        steps = int(spans.grid[0, mine][0][0])
        out.append({"kept": [int(kept[mine][t == k].sum()) for k in range(steps)],
                    "tokens": int((t == 0).sum())})
    return out


def explain(path, model, gen, images, videos) -> None:
    """--explain: the first example's video as a strip of frames, else its image."""
    import numpy as np

    from ep_jax.analysis.explain import write_explanation, write_video_strip

    if videos:
        v = videos[0]
        write_video_strip(path, gen, v.frames, v.timestamps, example=0, video=video_items(model, gen, 0)[0])
        return
    ip = model.processor.image_processor
    write_explanation(path, gen, example=0, mean=ip.image_mean, std=ip.image_std,
                      image=np.asarray(images[0].convert("RGB")))
