"""Pruning quality on the scene-VQA test split: accuracy per method x budget x question type.

    python -m ep_jax.quality [--methods none,entropy,fastv,random,pool] [--budgets 131,120,109]
                             [--layers 2] [--n 1000] [--out DIR] [--model PATH]

For every (method, K, A) the questions of `scenes.generate("test", n, seed)` are answered
greedily in batches with the compiled pruned graph; an answer is right when the stripped,
lower-cased text equals the ground truth. Reported beside accuracy: relative performance
(% of the unpruned accuracy), agreement with the unpruned answers, and the analytic prefill
FLOPs / KV-cache reduction (`ep_jax.core.flops`) at the median prompt length.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ep_jax.cli import run_cli
from ep_jax.data import scenes
from ep_jax.errors import InputError
from ep_jax.files import atomic_path, check_output_dir, write_text

METHODS = ("none", "entropy", "fastv", "random", "pool")


KEEP_FRACTIONS = (1 / 3, 2 / 9, 1 / 9, 1 / 18, 1 / 36)


def default_budgets(num_visual: int, num_layers: int, layer: int) -> tuple[int, ...]:
    """A values whose kept count R is about N/3, 2N/9, N/9 of the visual tokens (the keep
    ratios of LLaVA-1.5's A = 192/128/64 of 576), then N/18 and N/36 (more aggressive). In a
    shallow model the first K layers carry all N tokens, so A itself cannot go below K*N/L; R is
    the comparable quantity, and the A values differ per K."""
    out = []
    for frac in KEEP_FRACTIONS:
        keep = int(round(num_visual * frac))
        out.append(-(-(layer * num_visual + (num_layers - layer) * keep) // num_layers))  # ceil
    return tuple(out)


def _load(model):
    from ep_jax import presets
    from ep_jax.checkpoint import load
    from ep_jax.runtime.model import Model

    if not isinstance(model, Model):
        path = presets.default_model_path() if model is None else Path(model)
        model = load(path)
    if model.preset is None and model.path is not None:
        model.preset = presets.for_model(model.path, model.config, model.family)
    return model


def _answer(model, samples, prune, template: str, batch: int, max_new_tokens: int, progress=None) -> list[str]:
    from ep_jax.runtime.api import run_generation

    answers: list[str] = []
    for lo in range(0, len(samples), batch):
        chunk = list(samples[lo : lo + batch])
        real = len(chunk)
        chunk += [chunk[-1]] * (batch - real)  # one batch shape: no recompilation for the tail
        gen = run_generation(model, [[s.image] for s in chunk], [s.question for s in chunk],
                             max_new_tokens=max_new_tokens, prune=prune, template=template)
        answers += [t.strip().lower() for t in gen.texts[:real]]
        if progress is not None:
            progress.update(real)
    return answers


def _accuracy(samples, answers) -> dict[str, float]:
    ok = [a == s.answer.lower() for s, a in zip(samples, answers)]
    out = {"overall": float(np.mean(ok))}
    for t in scenes.QUESTION_TYPES:
        sel = [o for s, o in zip(samples, ok) if s.qtype == t]
        if sel:
            out[t] = float(np.mean(sel))
    return out


def run_quality(
    model: Any = None,
    methods: Sequence[str] = METHODS,
    budgets: Sequence[int] | None = None,
    n: int = 1000,
    layers: Sequence[int] | None = None,
    seed: int = 0,
    out_dir: str | Path | None = None,
    progress: bool = True,
    batch: int = 32,
    max_new_tokens: int = 4,
) -> dict:
    """Accuracy of each pruning method at each budget A (and layer K) on `n` test questions.

    model: an ep_jax `Model`, a checkpoint path, or None for the shipped model.
    budgets: A values (average visual tokens per layer), the same for every K; default per K,
        R = N/3, 2N/9, N/9, N/18, N/36 (`default_budgets`).
    layers: K values; default the preset's prune layer (else 2).
    Returns a dict (also written as quality.json / quality.md / quality.png under out_dir).
    """
    from tqdm import tqdm

    from ep_jax.core.budget import PruneConfig, resolve_keep
    from ep_jax.core.flops import prune_report

    model = _load(model)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise InputError(f"unknown methods {unknown}; choose from {METHODS}")
    if n < 1:
        raise InputError(f"n={n}: need at least one question")
    cfg = model.config
    preset = model.preset
    template = getattr(preset, "template", None) or "llava_hf"
    num_visual = cfg.image_seq_len
    num_layers = cfg.text.num_layers
    if layers is None:
        layers = (preset.prune_layer if preset is not None and preset.prune_layer is not None else 2,)
    if budgets:
        per_layer = {k: tuple(budgets) for k in layers}
    elif preset is not None and preset.budgets:
        per_layer = {k: tuple(preset.budgets) for k in layers}
    else:
        per_layer = {k: default_budgets(num_visual, num_layers, k) for k in layers}
    samples = scenes.generate("test", n, seed=seed, image_size=cfg.vision.image_size)
    proc = model.processor
    lengths = [len(proc.tokenize(proc.format(s.question, template=template))) for s in samples]
    seq_len = int(np.median(lengths))

    pruned_methods = [m for m in methods if m != "none"]
    settings = [("none", None, None)] + [(m, k, a) for m in pruned_methods for k in layers for a in per_layer[k]]
    bar = tqdm(total=n * len(settings), disable=not progress, file=sys.stderr, dynamic_ncols=True, desc="quality")
    t0 = time.perf_counter()
    base_answers = _answer(model, samples, None, template, batch, max_new_tokens, bar)
    base = _accuracy(samples, base_answers)
    rows = [{"method": "none", "layer": None, "avg_keep": None, "keep": num_visual, "accuracy": base,
             "relative": 100.0, "agreement": 1.0, "flops_reduction": 0.0, "kv_reduction": 0.0}]
    for method, layer, avg in settings[1:]:
        prune = PruneConfig(method=method, layer=layer, avg_keep=avg, seed=seed)
        answers = _answer(model, samples, prune, template, batch, max_new_tokens, bar)
        acc = _accuracy(samples, answers)
        keep = resolve_keep(prune, num_layers, num_visual)
        rep = prune_report(cfg.text, seq_len, num_visual, layer, keep, requested_avg_keep=avg)
        rows.append({
            "method": method, "layer": layer, "avg_keep": avg, "keep": keep, "effective_avg_keep": rep.avg_keep,
            "accuracy": acc,
            "relative": 100.0 * acc["overall"] / base["overall"] if base["overall"] > 0 else float("nan"),
            "agreement": float(np.mean([a == b for a, b in zip(answers, base_answers)])),
            "flops_reduction": rep.flops_reduction,
            "kv_reduction": rep.kv_bytes_saved / max(rep.kv_bytes_unpruned, 1),
        })
    bar.close()
    result = {
        "model": _shown(model.path) if model.path is not None else None,
        "split": "test", "n": n, "seed": seed, "template": template,
        "num_visual": num_visual, "num_layers": num_layers, "median_prompt_tokens": seq_len,
        "question_types": list(scenes.QUESTION_TYPES), "methods": list(methods),
        "budgets": {str(k): list(v) for k, v in per_layer.items()}, "layers": list(layers), "max_new_tokens": max_new_tokens,
        "wall_s": time.perf_counter() - t0, "unpruned": base, "results": rows,
    }
    if out_dir is not None:
        write_outputs(result, Path(out_dir))
    return result


def _shown(path: Path) -> str:
    """`path` relative to the working directory when inside it (results get committed)."""
    path = Path(path).resolve()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def to_markdown(result: dict) -> str:
    types = result["question_types"]
    lines = [
        f"# Pruning quality: {result['model']}",
        "",
        f"{result['n']} test questions (seed {result['seed']}), N={result['num_visual']} visual tokens, "
        f"L={result['num_layers']} layers, median prompt {result['median_prompt_tokens']} tokens. "
        "A = average visual tokens per layer, R = kept from layer K on; FLOPs = analytic prefill reduction.",
        "",
        "| method | K | A | R | overall | " + " | ".join(types) + " | rel. % | agree % | FLOPs -% | KV -% |",
        "|---|---|---|---|---|" + "---|" * len(types) + "---|---|---|---|",
    ]
    for r in result["results"]:
        acc = r["accuracy"]
        cells = [r["method"], "-" if r["layer"] is None else str(r["layer"]),
                 "-" if r["avg_keep"] is None else str(r["avg_keep"]), str(r["keep"]),
                 f"{100 * acc['overall']:.1f}"] + [f"{100 * acc.get(t, float('nan')):.1f}" for t in types]
        cells += [f"{r['relative']:.1f}", f"{100 * r['agreement']:.1f}", f"{100 * r['flops_reduction']:.1f}",
                  f"{100 * r['kv_reduction']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    base = result["unpruned"]["overall"]
    ax.axhline(100 * base, color="k", ls="--", lw=1, label="unpruned")
    for method in result["methods"]:
        if method == "none":
            continue
        for layer in result["layers"]:
            rows = sorted((r for r in result["results"] if r["method"] == method and r["layer"] == layer),
                          key=lambda r: r["keep"])
            if rows:
                label = method if len(result["layers"]) == 1 else f"{method} K={layer}"
                ax.plot([r["keep"] for r in rows], [100 * r["accuracy"]["overall"] for r in rows],
                        marker="o", ls="-" if layer == result["layers"][0] else "--", label=label)
    ax.set_xlabel(f"visual tokens kept from layer K on, R (of N={result['num_visual']})")
    ax.set_ylabel("test accuracy %")
    ax.set_title(f"Pruning quality, {result['n']} questions")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def write_outputs(result: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "quality.json", json.dumps(result, indent=1) + "\n")
    write_text(out_dir / "quality.md", to_markdown(result))
    with atomic_path(out_dir / "quality.png") as tmp:
        plot(result, tmp)


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(",") if x.strip())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--budgets", type=_ints, default=None,
                   help="A values, comma separated (default per K: R = N/3, 2N/9, N/9, N/18, N/36)")
    p.add_argument("--layers", type=_ints, default=None, help="K values (default: the preset's)")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--out", default=None, help="directory for quality.json / .md / .png")
    p.add_argument("--model", default=None, help="checkpoint (default: the shipped model)")
    return run_cli(p, _run, argv)


def _run(args) -> int:
    if args.out:
        check_output_dir(args.out, "--out")
    result = run_quality(args.model, methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
                         budgets=args.budgets, n=args.n, layers=args.layers, seed=args.seed,
                         out_dir=args.out, batch=args.batch)
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
