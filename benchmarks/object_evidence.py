"""Which patches does pruning keep on the scene-QA test questions, and does a lost object
explain a wrong count? Aggregates over many scenes for the shipped model.

    python benchmarks/object_evidence.py [--n 500] [--out benchmarks/object-evidence-scenes-llava-tiny]

For each setting (EntropyPrune at K = 1 and K = 2, the preset's A = 109; FastV at K = 2 for
comparison) it answers `--n` test questions and reports, from the kept-token masks:
- the share of object patches kept (cells at least a quarter covered by an object, or its most
  covered cell) against the share of background patches kept;
- for the count questions: accuracy when every counted object keeps at least one patch
  against accuracy when at least one counted object lost all its patches.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import ep_jax
from ep_jax.data import scenes

SETTINGS = (("entropy", 1), ("entropy", 2), ("fastv", 2))


def kept_grids(gen, grid: int) -> np.ndarray:
    """[b, grid, grid] bool: which patches of each example's image reached layer K."""
    out = np.zeros((len(gen.texts), grid, grid), bool)
    kept = np.asarray(gen.prefill.kept_mask)
    for i in range(len(gen.texts)):
        spans = gen.spans.example(i)
        cells = spans.coords[0]
        on = cells[:, 1] >= 0
        out[i, cells[on, 1], cells[on, 2]] = kept[i, spans.positions[0, on]]
    return out


def evaluate(model, samples, method: str, layer: int, avg_keep: int, batch: int) -> dict:
    grid = model.config.vision.grid_size
    size = model.config.vision.image_size
    prune = ep_jax.PruneConfig(method=method, layer=layer, avg_keep=avg_keep)
    obj_kept = obj_total = bg_kept = bg_total = 0
    count_rows = []  # (all counted objects visible, correct)
    correct = 0
    for lo in range(0, len(samples), batch):
        chunk = samples[lo:lo + batch]
        gen = ep_jax.run_generation(model, [[s.image] for s in chunk], [s.question for s in chunk],
                                    max_new_tokens=4, prune=prune)
        grids = kept_grids(gen, grid)
        for s, text, kept in zip(chunk, gen.texts, grids):
            ok = text.strip().lower() == s.answer
            correct += ok
            cover = scenes.object_coverage(s.objects, size, grid)  # [objects, grid, grid]
            cells = cover >= np.minimum(0.25, cover.max(axis=(1, 2), keepdims=True))  # each object's patches
            is_obj = cells.any(0)
            obj_kept += int((kept & is_obj).sum())
            obj_total += int(is_obj.sum())
            bg_kept += int((kept & ~is_obj).sum())
            bg_total += int((~is_obj).sum())
            if s.qtype == "count":
                hits, _ = scenes.referents(s.question, s.objects)
                visible = all((kept & cells[k]).any() for k in hits)
                count_rows.append((visible, ok))
    rows = np.asarray(count_rows, bool).reshape(-1, 2)
    vis, lost = rows[rows[:, 0]], rows[~rows[:, 0]]
    return {
        "method": method, "layer": layer, "avg_keep": avg_keep, "keep": int(gen.keep[0]),
        "accuracy": correct / len(samples),
        "object_patches_kept": obj_kept / max(obj_total, 1),
        "background_patches_kept": bg_kept / max(bg_total, 1),
        "count_questions": int(len(rows)),
        "count_all_visible": int(len(vis)),
        "count_accuracy_all_visible": float(vis[:, 1].mean()) if len(vis) else None,
        "count_accuracy_some_lost": float(lost[:, 1].mean()) if len(lost) else None,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--avg-keep", type=int, default=109)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = p.parse_args(argv)
    model = ep_jax.load()
    samples = scenes.generate("test", args.n, seed=0, image_size=model.config.vision.image_size)
    results = []
    for method, layer in SETTINGS:
        results.append(evaluate(model, samples, method, layer, args.avg_keep, args.batch))
        print(f"{method} K={layer}: done", file=sys.stderr)
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines = ["| method | K | R | accuracy % | object patches kept % | background patches kept % | "
             "count q. (all counted objects keep a patch) | count acc. %, all visible | count acc. %, some lost |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['method']} | {r['layer']} | {r['keep']} | {pct(r['accuracy'])} | "
                     f"{pct(r['object_patches_kept'])} | {pct(r['background_patches_kept'])} | "
                     f"{r['count_questions']} ({r['count_all_visible']}) | {pct(r['count_accuracy_all_visible'])} | "
                     f"{pct(r['count_accuracy_some_lost'])} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out + ".json").write_text(json.dumps({"n": args.n, "avg_keep": args.avg_keep,
                                                        "results": results}, indent=1) + "\n")
        Path(args.out + ".md").write_text(
            f"# Which patches pruning keeps: shipped model, {args.n} test questions (seed 0), A = {args.avg_keep}\n\n"
            f"`python benchmarks/object_evidence.py --n {args.n} --out {args.out}`. Object patches: cells at least "
            "a quarter covered by an object (or its most covered cell); a counted object is *lost* when none of its patches reached layer K.\n\n"
            f"{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
