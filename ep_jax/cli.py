"""`python -m ep_jax.generate`: answer questions about images, optionally with pruning."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

USAGE_ERRORS = ("ProcessingError", "InputError", "CheckpointError", "ConfigError", "PresetError")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ep_jax.generate",
        description="Answer a question about one or more images with a LLaVA model in JAX, "
        "pruning visual tokens with EntropyPrune inside the compiled graph.",
    )
    p.add_argument("--model", help="ep_jax checkpoint or Hugging Face LLaVA directory "
                   "(default: the small model shipped with ep_jax)")
    p.add_argument("--image", action="append", required=True, help="image file; repeat for a batch")
    p.add_argument("--prompt", action="append", required=True,
                   help="question; one for all images, or one per --image")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="parameter dtype (default: as saved)")
    p.add_argument("--layout", choices=["auto", "stacked", "per_layer"], default="auto",
                   help="decoder weights in memory: stacked (lax.scan, fast compile) or per_layer (unrolled, "
                        "faster CPU decode for large layers); auto picks per backend and size")
    p.add_argument("--template", default=None, help="chat template (default: the model's, vicuna_v1)")
    p.add_argument("--raw-prompt", action="store_true", help="use the prompt as is (it must contain <image>)")
    p.add_argument("--stream", action="store_true", help="print tokens as they come (batch of one)")
    p.add_argument("--json", action="store_true", help="print answers, pruning report and timings as JSON")
    g = p.add_argument_group("pruning")
    g.add_argument("--prune", choices=["none", "entropy", "fastv", "random", "pool"], default=None,
                   help="method (default: the model preset's, else none)")
    g.add_argument("--prune-layer", default=None, help="K, the first layer on the pruned sequence, or 'auto'")
    budget = g.add_mutually_exclusive_group()
    budget.add_argument("--keep-avg", type=int, default=None, help="A: average visual tokens per layer")
    budget.add_argument("--keep", type=int, default=None, help="R: visual tokens kept from layer K on")
    g.add_argument("--score-source", choices=["query", "key", "value", "hidden"], default="query")
    g.add_argument("--explain", metavar="PNG", help="write the image with kept patches and the score map")
    return p


def _prune_config(args, preset):
    from ep_jax.prune import PruneConfig

    method = args.prune
    if method is None:
        method = "entropy" if preset is not None and preset.prune_layer is not None else "none"
    if method == "none":
        if args.keep is not None or args.keep_avg is not None or args.prune_layer is not None:
            raise ValueError("--keep/--keep-avg/--prune-layer need a pruning method (--prune entropy)")
        return None
    layer = args.prune_layer
    if layer is None:
        layer = preset.prune_layer if preset is not None and preset.prune_layer is not None else 2
    elif layer != "auto":
        try:
            layer = int(layer)
        except ValueError:
            raise ValueError(f"--prune-layer {layer!r}: give an int K >= 1 or 'auto'") from None
    keep, avg = args.keep, args.keep_avg
    if keep is None and avg is None:
        if preset is not None and preset.default_avg_keep is not None:
            avg = preset.default_avg_keep
        else:
            raise ValueError("give a budget: --keep-avg A (e.g. 64) or --keep R")
    return PruneConfig(method=method, layer=layer, avg_keep=avg, keep=keep, source=args.score_source)


def run_cli(parser: argparse.ArgumentParser, run, argv=None) -> int:
    """Parse, run, and turn input errors into one `error:` line and exit status 2
    (tracebacks only for bugs). Shared by every ep_jax command."""
    args = parser.parse_args(argv)
    try:
        return run(args)
    except Exception as e:
        if type(e).__name__ in USAGE_ERRORS or isinstance(e, (FileNotFoundError, ValueError)):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise


def main(argv=None) -> int:
    return run_cli(build_parser(), _run, argv)


def _run(args) -> int:
    from ep_jax import presets
    from ep_jax.checkpoint import load
    from ep_jax.flops import prune_report
    from ep_jax.generate import run_generation
    from ep_jax.processing import load_image

    images = [load_image(Path(f)) for f in args.image]
    prompts = args.prompt
    if len(prompts) == 1:
        prompts = prompts * len(images)
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts for {len(images)} images: give one --prompt, or one per --image")
    if args.stream and len(images) > 1:
        raise ValueError("--stream prints one answer as it is generated: give a single --image")

    model_path = args.model
    if model_path is None:
        model_path = presets.default_model_path()
        print(f"using the shipped model {model_path} (pass --model for another)", file=sys.stderr)
    model = load(model_path, dtype=args.dtype, layout=args.layout)
    model.preset = presets.for_model(model_path, model.config)
    prune = _prune_config(args, model.preset)
    template = "raw" if args.raw_prompt else args.template or getattr(model.preset, "template", None) or "vicuna_v1"

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
        model, [[im] for im in images], prompts, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
        prune=prune, template=template, on_token=on_token,
    )
    report = None
    if gen.stage is not None:
        seq_len = int(gen.inputs["attention_mask"].sum(1).max())
        report = prune_report(
            model.config.text, seq_len, gen.stage.num_visual, gen.stage.layer, gen.stage.keep,
            bytes_per_elem=model.dtype.itemsize, requested_avg_keep=gen.stage.config.avg_keep,
        )
    if args.explain:
        from ep_jax.explain import write_explanation

        if gen.stage is None:
            raise ValueError("--explain shows the pruning decision: enable pruning (--prune entropy --keep-avg A)")
        write_explanation(args.explain, model.config, gen, example=0)

    if args.json:
        out = {
            "answers": gen.texts,
            "token_ids": gen.token_ids,
            "prune": None if report is None else {"method": gen.stage.config.method, **report.to_dict()},
            "timings": gen.timings,
            "model": str(model_path),
        }
        print(json.dumps(out, indent=1))
        return 0
    if report is not None:
        print(f"[{gen.stage.config.method}] {report}", file=sys.stderr)
    if args.stream:
        print()
    else:
        for text in gen.texts:
            print(text)
    return 0
