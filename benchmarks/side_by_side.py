"""Prefill and time to first token of several pruning settings measured side by side in one run:
every setting compiled first (compile time recorded apart), then rounds in which the settings
alternate, each round starting with the next one, so that a slower or busier moment of the
machine hits them all alike; the first round warms up and is not counted. The prefill is
compiled without decode room (a generation's cache is a little larger). Used by the family benchmarks (`llava_next_prefill.py`,
`qwen_prefill.py`).

TTFT is what a request pays: preprocessing from the raw inputs (`encode()`: pixels, tokens;
then spans and budgets in `api.prepare`), the prefill, and the first greedy token.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from ep_jax.runtime import api
from ep_jax.runtime.engine import compile_stats, compiled


def compile_settings(model, enc: dict, settings: dict) -> dict[str, dict]:
    """name -> {fn, args, keep (R of example 0, None unpruned), n (its N), compile_s, s, ttft}."""
    more = api.extra_arrays(enc)
    runs = {}
    for name, prune in settings.items():
        inputs, spans, stage, extra = api.prepare(model, enc["input_ids"], enc["pixel_values"], enc["attention_mask"],
                                                  prune=prune, **more)
        args = (model.state, inputs, spans, extra)
        before = compile_stats(model)["compile_s"]
        fn = compiled(model, api.prefill_logits, dict(stage=stage, decode_room=0, all_logits=False), args)
        runs[name] = dict(fn=fn, args=args, prune=prune, keep=None if extra is None else int(extra["keep"][0]),
                          n=int(spans.counts()[0]), compile_s=compile_stats(model)["compile_s"] - before, s=[], ttft=[])
        print(f"compiled {name} in {runs[name]['compile_s']:.1f} s", file=sys.stderr)
    return runs


def time_rounds(model, runs: dict[str, dict], encode: Callable[[], dict], rounds: int,
                vision: Callable[[], object] | None = None) -> list[float]:
    """Fills each run's "s" (prefill) and "ttft" lists; returns the vision-only times (seconds)."""
    vision_s = []
    if vision is not None:
        jax.block_until_ready(vision())
    order = list(runs.values())
    for i in range(rounds + 1):  # the first round warms up
        for r in order[i % len(order):] + order[:i % len(order)]:  # each round starts with another setting
            t0 = time.perf_counter()
            fresh = encode()
            inputs, spans, _, extra = api.prepare(model, fresh["input_ids"], fresh["pixel_values"],
                                                  fresh["attention_mask"], prune=r["prune"],
                                                  **api.extra_arrays(fresh))
            t1 = time.perf_counter()
            logits, _ = r["fn"](model.state, inputs, spans, extra)
            jax.block_until_ready(logits)
            t2 = time.perf_counter()
            int(np.argmax(np.asarray(logits)[0]))
            if i:
                r["s"].append(t2 - t1)
                r["ttft"].append(time.perf_counter() - t0)
        if vision is not None:
            t0 = time.perf_counter()
            jax.block_until_ready(vision())
            if i:
                vision_s.append(time.perf_counter() - t0)
        print(f"round {i}/{rounds} done", file=sys.stderr)
    return vision_s


def summary_rows(runs: dict[str, dict], analytic: Callable[[int], float]) -> list[dict]:
    """Medians and speedups against the "unpruned" run; `analytic(R)` the FLOPs speedup at R."""
    base = runs["unpruned"]
    base_ms, base_ttft = 1e3 * statistics.median(base["s"]), 1e3 * statistics.median(base["ttft"])
    rows = []
    for name, r in runs.items():
        ms, ttft = 1e3 * statistics.median(r["s"]), 1e3 * statistics.median(r["ttft"])
        keep = r["n"] if r["keep"] is None else r["keep"]
        rows.append({"setting": name, "R": keep, "prefill_ms": ms, "speedup": base_ms / ms,
                     "ttft_ms": ttft, "ttft_speedup": base_ttft / ttft,
                     "analytic_flops_speedup": 1.0 if r["keep"] is None else analytic(keep),
                     "compile_s": r["compile_s"], "runs_ms": [1e3 * t for t in r["s"]]})
    return rows


def markdown_table(rows: list[dict]) -> list[str]:
    lines = ["| setting | R | prefill ms | prefill speedup | TTFT ms | TTFT speedup | analytic FLOPs speedup "
             "(decoder) | compile s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    return lines + [f"| {r['setting']} | {r['R']} | {r['prefill_ms']:.0f} | {r['speedup']:.2f}x | {r['ttft_ms']:.0f} | "
                    f"{r['ttft_speedup']:.2f}x | {r['analytic_flops_speedup']:.2f}x | {r['compile_s']:.1f} |"
                    for r in rows]


def decoder_table(rows: list[dict], vision_ms: float) -> list[str]:
    """The prefill less the vision tower (timed alone in the same rounds): the part pruning acts on."""
    base = rows[0]["prefill_ms"] - vision_ms
    lines = [f"Vision tower + merger alone: {vision_ms:.0f} ms = {100 * vision_ms / rows[0]['prefill_ms']:.1f} % of "
             "the unpruned prefill (pruning cannot shorten it). The decoder's part, prefill less the vision tower:", "",
             "| setting | decoder ms (prefill - vision) | decoder speedup | analytic FLOPs speedup (decoder) |",
             "|---|---:|---:|---:|"]
    return lines + [f"| {r['setting']} | {r['prefill_ms'] - vision_ms:.0f} | {base / (r['prefill_ms'] - vision_ms):.2f}x | "
                    f"{r['analytic_flops_speedup']:.2f}x |" for r in rows]


def write_outputs(out: str | None, title: str, command: str, text: str, data: dict) -> None:
    """Print the table; with `out`, write OUT.json (data) and OUT.md (title, the command, the
    device, the table)."""
    from ep_jax import bench_setup

    print(text)
    if out:
        Path(out + ".json").write_text(json.dumps(data, indent=1) + "\n")
        Path(out + ".md").write_text(f"# {title}\n\n`{command}` on this machine ({jax.devices()[0].device_kind}, "
                                     f"{bench_setup.machine_info()['cpu_count']} cores).\n\n{text}\n")
