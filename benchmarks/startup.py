"""Start-up: wall time from `python -m ep_jax.generate` to the first answer of the shipped
model, cold (an empty compilation cache) and warm (a second process with the cache the first
one filled), with the split the command itself reports (`--json` timings) and Python's import
time measured apart.

    python benchmarks/startup.py [--runs 3] [--out benchmarks/startup-cpu] [--baseline DIR]

Each run is a fresh process (nothing shared but the cache directory); medians are printed.
`--baseline DIR` also times the same command in another checkout (e.g. an older commit made
with `git worktree add DIR COMMIT`), alternating with this one, wall time only.
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


def run(cache: str, root: Path = ROOT) -> dict:
    env = {**os.environ, "EP_JAX_COMPILATION_CACHE": cache, "PYTHONPATH": str(root)}
    t0 = time.perf_counter()
    r = subprocess.run(COMMAND, cwd=root, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"the command failed in {root} ({r.returncode}):\n{r.stderr}")
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
    p.add_argument("--baseline", type=Path, default=None, help="another checkout to time the same way")
    args = p.parse_args(argv)
    cold, warm, base = [], [], []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory() as cache:
            cold.append(run(cache))
            warm.append(run(cache))
        if args.baseline is not None:
            with tempfile.TemporaryDirectory() as cache:
                base.append(run(cache, args.baseline.resolve())["wall_s"])
        print(f"run {i + 1}/{args.runs}: cold {cold[-1]['wall_s']:.2f} s, warm {warm[-1]['wall_s']:.2f} s"
              + (f", baseline {base[-1]:.2f} s" if base else ""), file=sys.stderr)
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
    if base:
        lines.append(f"\nBaseline `{args.baseline}` (same command, fresh process each time, alternating with the "
                     f"runs above): median wall {statistics.median(base):.2f} s.")
    table = "\n".join(lines)
    print(table)
    if args.out:
        doc = {"command": " ".join(["python", *COMMAND[1:]]), "runs": args.runs, "machine": platform.platform(),
               "cpus": os.cpu_count(), "medians": rows, "cold": cold, "warm": warm, "import_s": imports,
               "baseline": None if args.baseline is None else {"dir": str(args.baseline), "wall_s": base}}
        Path(args.out + ".json").write_text(json.dumps(doc, indent=1) + "\n")
        flags = "" if args.baseline is None else f" --baseline {args.baseline}"
        Path(args.out + ".md").write_text(
            f"# Start-up of `python -m ep_jax.generate` (shipped model, one question)\n\n"
            f"`python benchmarks/startup.py --runs {args.runs} --out {args.out}{flags}` on {platform.platform()}, "
            f"{os.cpu_count()} CPUs; medians of {args.runs} fresh processes each. *cold*: an empty compilation "
            f"cache; *warm*: a second process reusing the cache the first filled. *import*: `import "
            f"ep_jax.runtime.api, ep_jax.checkpoint` alone; the other columns are the command's own `--json` "
            f"timings (compile = tracing + lowering + XLA compilation or cache read).\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
