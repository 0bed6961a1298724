"""Start-up: wall time from `python -m ep_jax.generate` to the first answer of the shipped
model, cold (an empty compilation cache) and warm (a second process with the cache the first
one filled), with the split the command itself reports (`--json` timings) and Python's import
time measured apart.

    python benchmarks/startup.py [--runs 3] [--out benchmarks/startup-cpu]

Each run is a fresh process (nothing shared but the cache directory); medians are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMAND = [sys.executable, "-m", "ep_jax.generate", "--image", "examples/scene_count_0007.png",
           "--prompt", "How many circles are there?", "--json"]
SPLIT = ("load_s", "tokenizer_ms", "preprocess_ms", "compile_s", "prefill_ms", "decode_ms")


def run(cache: str) -> dict:
    env = {**os.environ, "EP_JAX_COMPILATION_CACHE": cache}
    t0 = time.perf_counter()
    r = subprocess.run(COMMAND, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"the command failed ({r.returncode}):\n{r.stderr}")
    out = json.loads(r.stdout)
    return {"wall_s": wall, "answer": out["answers"][0], **out["timings"]}


def import_seconds() -> float:
    code = "import time; t = time.perf_counter(); import ep_jax.runtime.api, ep_jax.checkpoint; print(time.perf_counter() - t)"
    return float(subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout)


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3, help="cold and warm runs each (default 3)")
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = p.parse_args(argv)
    cold, warm = [], []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory() as cache:
            cold.append(run(cache))
            warm.append(run(cache))
        print(f"run {i + 1}/{args.runs}: cold {cold[-1]['wall_s']:.2f} s, warm {warm[-1]['wall_s']:.2f} s",
              file=sys.stderr)
    imports = [import_seconds() for _ in range(args.runs)]
    rows = []
    for name, runs in (("cold", cold), ("warm", warm)):
        row = {"start": name, "wall_s": median(runs, "wall_s"), "import_s": statistics.median(imports)}
        row.update({k: median(runs, k) for k in SPLIT})
        rows.append(row)
    header = ("| start | wall s | import s | load s | tokenizer ms | preprocess ms | compile s | prefill ms | "
              "decode ms |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [header] + [
        f"| {r['start']} | {r['wall_s']:.2f} | {r['import_s']:.2f} | {r['load_s']:.2f} | {r['tokenizer_ms']:.0f} | "
        f"{r['preprocess_ms']:.0f} | {r['compile_s']:.2f} | {r['prefill_ms']:.0f} | {r['decode_ms']:.0f} |"
        for r in rows
    ]
    table = "\n".join(lines)
    print(table)
    if args.out:
        doc = {"command": " ".join(["python", *COMMAND[1:]]), "runs": args.runs, "machine": platform.platform(),
               "cpus": os.cpu_count(), "medians": rows, "cold": cold, "warm": warm, "import_s": imports}
        Path(args.out + ".json").write_text(json.dumps(doc, indent=1) + "\n")
        Path(args.out + ".md").write_text(
            f"# Start-up of `python -m ep_jax.generate` (shipped model, one question)\n\n"
            f"`python benchmarks/startup.py --runs {args.runs} --out {args.out}` on {platform.platform()}, "
            f"{os.cpu_count()} CPUs; medians of {args.runs} fresh processes each. *cold*: an empty compilation "
            f"cache; *warm*: a second process reusing the cache the first filled. *import*: `import "
            f"ep_jax.runtime.api, ep_jax.checkpoint` alone; the other columns are the command's own `--json` "
            f"timings (compile = tracing + lowering + XLA compilation or cache read).\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
