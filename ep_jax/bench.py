"""Benchmarks: `python -m ep_jax.bench {speed,compile,quality} ...`.

speed    measured wall time of prefill / time to first token / decode, unpruned and pruned
         (each budget x method) in one run, next to the analytic FLOPs of `flops.py`; the prune
         stage's own cost; a component profile; optionally the same weights through Hugging Face
         transformers (PyTorch). Writes bench.json, bench.md and bench.png.
compile  lowering + compile time of prefill and decode step from abstract parameters, at two depths.
quality  accuracy of the pruning methods (forwards to `ep_jax.quality`).

Modules: bench_setup (shapes, inputs), bench_speed (timing), bench_compile, bench_report
(targets, markdown, plot). `--vs-hf` runs benchmarks/hf_reference.py, which drives PyTorch and so
lives outside the library (torch is a test/benchmark-only dependency). Committed results:
benchmarks/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from ep_jax.cli import add_mesh_argument, run_cli
from ep_jax.errors import InputError
from ep_jax.files import atomic_path, check_output_dir, write_text
from ep_jax.runtime.sharding import mesh_from_flag, parse_mesh
from ep_jax.runtime.sharding import describe as describe_mesh

METHODS = ("entropy", "fastv", "random", "pool")
DEFAULT_MIN_LAYERS = 3  # K = 2 needs L >= 3


def _hf_reference():
    """benchmarks/hf_reference.py (PyTorch side of --vs-hf), loaded from the repository."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "hf_reference.py"
    if not path.exists():
        raise InputError(f"--vs-hf needs {path} (run from a clone of the ep_jax repository)")
    if importlib.util.find_spec("torch") is None:
        raise InputError("--vs-hf needs PyTorch: pip install -r requirements-test.txt")
    spec = importlib.util.spec_from_file_location("ep_jax_hf_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ep_jax.bench", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("speed", help="measured prefill/decode time, pruned vs unpruned, vs analytic FLOPs")
    s.add_argument("--config", default="small", help="tiny | small | 1b | 7b (LLaVA-1.5-7B shapes)")
    s.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="parameter dtype (default: float32 on CPU, bfloat16 on GPU/TPU; see benchmarks/README.md)")
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--layout", choices=["auto", "stacked", "per_layer"], default="auto",
                   help="decoder weight layout (runtime.model.LAYOUTS; auto: per_layer on CPU for layers >= 4 MiB)")
    s.add_argument("--budgets", default="none,192,128,64",
                   help="'none' (unpruned) and A values quoted for N=576; scaled by N/576 for other N")
    s.add_argument("--methods", default="entropy,fastv,random,pool", help=f"comma list of {', '.join(METHODS)}")
    s.add_argument("--layer", type=int, default=2, help="K, the first decoder layer on the pruned sequence")
    s.add_argument("--runs", type=int, default=5, help="timed runs per measurement (median reported)")
    s.add_argument("--warmup", type=int, default=1, help="untimed runs before them")
    s.add_argument("--max-new-tokens", type=int, default=64, help="decode length")
    s.add_argument("--decode", choices=["ends", "all", "none"], default="ends",
                   help="which R to time decode at: unpruned and the smallest R (default), every R, or none")
    s.add_argument("--padding", choices=["exact", "bucket"], default="exact",
                   help="prompt at its exact length (default), or left-padded to the Processor's length buckets "
                        "as ep_jax.generate does (576 + ~60 tokens -> 640)")
    s.add_argument("--no-profile", action="store_true", help="skip the component profile")
    s.add_argument("--vs-hf", action="store_true", help="also time transformers' PyTorch LLaVA, same weights")
    s.add_argument("--seed", type=int, default=0)
    add_mesh_argument(s)
    s.add_argument("--out", default="bench_out", help="directory for bench.json / bench.md / bench.png")
    s.add_argument("--name", default="bench", help="file stem of the outputs (default: bench)")

    c = sub.add_parser("compile", help="lower + compile time from abstract parameters (nothing allocated)")
    c.add_argument("--config", default="7b")
    c.add_argument("--layers", default=None, help="two (or more) decoder depths, e.g. 8,32 (default: L/4,L)")
    c.add_argument("--layouts", default="stacked,per_layer",
                   help="decoder weight layouts to compile (runtime.model.LAYOUTS, comma list; default both)")
    c.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    c.add_argument("--batch", type=int, default=1)
    c.add_argument("--budget", default="64", help="also compile the entropy-pruned prefill at this A ('none': skip)")
    c.add_argument("--out", default=None, help="directory for the outputs")
    c.add_argument("--name", default="compile", help="file stem of the outputs (default: compile)")

    q = sub.add_parser("quality", help="accuracy of the pruning methods (ep_jax.quality)", add_help=False)
    q.add_argument("rest", nargs=argparse.REMAINDER)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["quality"]:
        from ep_jax import quality  # written separately; imported only when asked for

        return quality.main(argv[1:])
    command = "python -m ep_jax.bench " + " ".join(shlex.quote(a) for a in argv)
    return run_cli(build_parser(), lambda args: (_speed if args.command == "speed" else _compile_cmd)(args, command),
                   argv)


def _other_load(seconds: float = 1.0) -> list[str]:
    """Other processes that used >= 20% of a core over the last `seconds` (timings taken beside
    them are contaminated). Empty if psutil is missing."""
    try:
        import psutil
    except ImportError:
        return []
    procs = [p for p in psutil.process_iter(["pid", "cmdline"]) if p.pid != os.getpid()]
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(seconds)
    busy = []
    for p in procs:
        try:
            pct = p.cpu_percent(None)
        except psutil.Error:
            continue
        if pct >= 20.0:
            busy.append(f"{p.pid} {pct:.0f}% {' '.join(p.info['cmdline'] or [])[:100]}")
    return busy


class _LoadMonitor:
    """Samples `_other_load` every `period` seconds in a daemon thread while the benchmark runs."""

    def __init__(self, period: float = 15.0):
        import threading

        self.seen: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(period,), daemon=True)

    def _loop(self, period: float) -> None:
        while not self._stop.wait(period):
            self.sample()

    def sample(self) -> None:
        for line in _other_load():
            pid, pct, cmd = line.split(" ", 2)
            self.seen[f"{pid} {cmd}"] = pct

    def __enter__(self):
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def report(self) -> list[str]:
        return [f"{k.split(' ', 1)[0]} (up to {v}) {k.split(' ', 1)[1]}" for k, v in self.seen.items()]


def _speed(args, command: str) -> int:
    import jax

    check_output_dir(args.out, "--out")
    from ep_jax import bench_setup

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise InputError(f"--methods {args.methods!r}: choose from {', '.join(METHODS)}")
    if args.runs < 1 or args.warmup < 0 or args.batch < 1 or args.max_new_tokens < 2:
        raise InputError("need --runs >= 1, --warmup >= 0, --batch >= 1, --max-new-tokens >= 2")
    with_unpruned, values = bench_setup.parse_budgets(args.budgets)
    if args.mesh is not None:
        parse_mesh(args.mesh)  # a bad flag is refused before anything is built
    cfg = bench_setup.get_config(args.config)
    budgets = bench_setup.resolve_budgets(values, cfg, args.layer)
    dtype = args.dtype or bench_setup.default_dtype()
    if args.vs_hf and jax.default_backend() != "cpu":
        raise InputError("--vs-hf runs transformers on the CPU, side by side with ep_jax on the same cores: "
                         "use it on a CPU backend (JAX_PLATFORMS=cpu)")
    with _LoadMonitor() as monitor:  # other CPU-heavy processes contaminate CPU timings: record them
        return _speed_run(args, command, cfg, budgets, methods, with_unpruned, dtype, monitor)


def _speed_run(args, command: str, cfg, budgets, methods, with_unpruned, dtype, monitor) -> int:
    import jax

    from ep_jax import bench_report, bench_setup, bench_speed

    t0 = time.perf_counter()
    model = bench_setup.random_model(cfg, dtype, args.seed, layout=args.layout, mesh=mesh_from_flag(args.mesh))
    jax.block_until_ready(model.state)
    init_s = time.perf_counter() - t0
    processor = bench_setup.build_processor(cfg)
    _log(f"{args.config}: random {dtype} weights in {init_s:.1f} s, {model.layout} decoder layout")
    result: dict[str, Any] = {
        "schema": 1,
        "command": command,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": args.config,
        "dtype": dtype,
        "layout": model.layout,
        "mesh": describe_mesh(model.mesh),
        "machine": bench_setup.machine_info(),
        "model": bench_setup.describe(cfg),
        "init_s": init_s,
        "methods_note": {
            "prefill_ms": "compiled prefill (vision tower, projector, merge, all decoder layers, prune stage, "
                          "KV cache, last-token logits), inputs already on the host as arrays",
            "ttft_ms": "host preprocessing (photo + prompt) + prefill + first greedy token",
            "decode_tokens_per_s": "greedy, one compiled while loop, batch x (new tokens - 1) / time",
            "scoring": "prune stage timed alone under jit on real layer K-1 tensors; also prefill minus the "
                       "pool method's prefill at the same R",
            "peak_memory": "device peak where the allocator reports it, else process peak RSS",
        },
    }
    speed = bench_speed.run_speed(model, processor, budgets=budgets, with_unpruned=with_unpruned, methods=methods,
                                  batch=args.batch, runs=args.runs, warmup=args.warmup, max_new=args.max_new_tokens,
                                  layer=args.layer, profile=not args.no_profile, decode=args.decode,
                                  padding=args.padding,
                                  log=_log)
    inputs, logits, jax_calls = speed.pop("_inputs"), speed.pop("_unpruned_logits"), speed.pop("_jax_unpruned")
    result.update(speed)
    result["explain"] = bench_report.explain(result)
    result["vs_hf"] = None
    if args.vs_hf:
        bench_hf = _hf_reference()
        base = next((r for r in result["rows"] if r["method"] == "none"), None)
        if base is None:
            raise InputError("--vs-hf compares unpruned runs: include 'none' in --budgets")
        result["vs_hf"] = bench_hf.measure_hf(
            model, inputs, dtype=dtype, runs=args.runs, warmup=args.warmup, max_new=args.max_new_tokens,
            jax_prefill=jax_calls["prefill"], jax_decode=jax_calls["decode"], jax_logits=logits, log=_log)
    result["mfu"] = bench_report.mfu(result)
    monitor.sample()
    result["other_cpu_load"] = monitor.report()
    result["quiet_cpu"] = not result["other_cpu_load"] if result["machine"]["backend"] == "cpu" else None
    result["targets"] = bench_report.targets(result)
    result["total_s"] = time.perf_counter() - t0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / f"{args.name}.json", json.dumps(result, indent=1) + "\n")
    write_text(out / f"{args.name}.md", bench_report.markdown(result))
    with atomic_path(out / f"{args.name}.png") as tmp:
        bench_report.plot(result, cfg, tmp)
    _log(f"wrote {out / args.name}.{{json,md,png}} in {result['total_s']:.0f} s")
    print(bench_report.markdown(result))
    return 0


def _compile_cmd(args, command: str) -> int:
    from ep_jax import bench_compile, bench_setup

    if args.out:
        check_output_dir(args.out, "--out")
    cfg = bench_setup.get_config(args.config)
    if args.layers is None:
        layers = [max(DEFAULT_MIN_LAYERS, cfg.text.num_layers // 4), cfg.text.num_layers]
    else:
        try:
            layers = [int(x) for x in args.layers.split(",") if x.strip()]
        except ValueError:
            raise InputError(f"--layers {args.layers!r}: give ints, e.g. 8,32") from None
    budget = None if args.budget == "none" else int(args.budget)
    layouts = tuple(x.strip() for x in args.layouts.split(",") if x.strip())
    bad = [x for x in layouts if x not in ("stacked", "per_layer")]
    if bad or not layouts:
        raise InputError(f"--layouts {args.layouts!r}: give stacked and/or per_layer")
    rows = bench_compile.run_compile(args.config, layers, args.dtype, args.batch, budget, log=_log, layouts=layouts)
    machine = bench_setup.machine_info()
    text = bench_compile.markdown(rows, machine, command)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        payload = {"command": command, "machine": machine, "rows": rows}
        write_text(out / f"{args.name}.json", json.dumps(payload, indent=1) + "\n")
        write_text(out / f"{args.name}.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
