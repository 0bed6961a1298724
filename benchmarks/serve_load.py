"""Load test of `python -m ep_jax.serve` with the official `openai` client on loopback.

The server runs in this process (uvicorn on a thread, the app of `ep_jax.serve`, so that the
`small` bench shape with random weights can be served without writing a checkpoint); clients
are threads. For each model, pruning setting and concurrency (1, 4, 16 clients), a bounded
number of requests is sent (`--requests` per level, each client sending its share back to
back) and every answer is checked: each request is answered exactly once, with text.
Non-streaming requests give requests/s, tokens/s and latency; then streaming requests (a
quarter as many) give the time to first token. The same is run against a server with
--max-batch-size 1 (one request at a time) for the batching speedup.

    python benchmarks/serve_load.py --out benchmarks/serve-load-cpu    # ~10 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class InProcessServer:
    def __init__(self, model, model_id: str, max_batch: int, window_ms: float, max_queue: int = 256):
        import uvicorn

        from ep_jax.serve.app import ServeOptions, create_app

        self.port = free_port()
        opts = ServeOptions(model_id=model_id, max_batch=max_batch, window_s=window_ms / 1e3, max_queue=max_queue)
        self.app = create_app(model, opts)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)

    def stats(self) -> dict:
        return dict(self.app.state.batcher.stats)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def png_data_url(array) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def run_level(client, model_id, messages, *, clients: int, requests: int, max_tokens: int, prune, stream: bool):
    """`requests` requests from `clients` threads; per request (latency s, ttft s, tokens, text)."""
    extra = {"ep_prune": prune}

    def one(_):
        t0 = time.perf_counter()
        if not stream:
            r = client.chat.completions.create(model=model_id, messages=messages, max_tokens=max_tokens,
                                               extra_body=extra)
            return time.perf_counter() - t0, None, r.usage.completion_tokens, r.choices[0].message.content
        ttft, text, tokens = None, "", 0
        for c in client.chat.completions.create(model=model_id, messages=messages, max_tokens=max_tokens,
                                                stream=True, stream_options={"include_usage": True},
                                                extra_body=extra):
            ttft = ttft or time.perf_counter() - t0  # the first chunk leaves with the first token
            if c.choices and c.choices[0].delta.content:
                text += c.choices[0].delta.content
            if c.usage is not None:
                tokens = c.usage.completion_tokens
        return time.perf_counter() - t0, ttft, tokens, text

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        out = list(pool.map(one, range(requests)))
    return time.perf_counter() - t0, out


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def write(args, rows) -> None:
    """OUT.json and OUT.md of the rows so far (rewritten after each level)."""
    for row in rows:
        base = next((r for r in rows if r["model"] == row["model"] and r["prune"] == row["prune"]
                     and r["clients"] == row["clients"] and r["mode"] == "one at a time"), None)
        row["batching_speedup"] = (row["requests_per_s"] / base["requests_per_s"]
                                   if base and row["mode"] == "batched" else None)

    from ep_jax.bench_setup import machine_info

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": " ".join(sys.argv), "machine": machine_info(), "max_tokens": args.max_tokens,
            "window_ms": args.window_ms, "max_batch": args.max_batch}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [f"# Serving load test ({meta['machine']['cpu']}, {meta['machine']['backend']})", "",
             f"`{meta['command']}`: the `openai` client on loopback, in-process server, max_tokens "
             f"{args.max_tokens}, batch window {args.window_ms:g} ms, max batch {args.max_batch}. "
             + ("Every request was answered exactly once (answered = requests = served by the server)."
              if not lost(rows) else "REQUESTS WERE LOST: see answered vs requests."), "",
             "| model | pruning | mode | clients | requests | answered | batches | req/s | tok/s | p50 s | p95 s "
             "| p50 TTFT s (stream) | batching speedup |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sp = "" if r["batching_speedup"] is None else f"{r['batching_speedup']:.2f}x"
        ttft = "n/a" if r["p50_ttft_s"] is None else f"{r['p50_ttft_s']:.3f}"
        lines.append(f"| {r['model']} | {r['prune']} | {r['mode']} | {r['clients']} | {r['requests']} | "
                     f"{r['answered']} | {r['batches']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
                     f"{r['p50_latency_s']:.3f} | {r['p95_latency_s']:.3f} | {ttft} | {sp} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="shipped,small", help="comma list: shipped, small (bench shape, random)")
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--requests", type=int, default=32, help="non-streaming requests per level (bounded)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--window-ms", type=float, default=10.0)
    p.add_argument("--budget-s", type=float, default=1500, help="stop starting new levels after this long")
    p.add_argument("--out", required=True, help="writes OUT.json and OUT.md")
    args = p.parse_args()

    import openai

    import ep_jax
    from ep_jax import bench_setup

    started = time.perf_counter()
    rows = []
    for name in args.models.split(","):
        if name == "shipped":
            model, model_id = ep_jax.load(), "scenes-llava-tiny"
            image = (ROOT / "examples" / "scene_color_0000.png").read_bytes()
            url = "data:image/png;base64," + base64.b64encode(image).decode()
            question = "What color is the star?"
            prunes = {"none": {"method": "none"}, "entropy (preset A=109)": None}
        else:
            cfg = bench_setup.get_config("small")
            model = bench_setup.random_model(cfg, bench_setup.default_dtype())
            model._processor = bench_setup.build_processor(cfg)
            model_id, url, question = "bench-small", png_data_url(bench_setup.photo()), bench_setup.PROMPT
            a = round(64 * cfg.image_seq_len / bench_setup.REFERENCE_VISUAL)
            prunes = {"none": {"method": "none"}, f"entropy A={a} (64/576)": {"method": "entropy", "layer": 2,
                                                                               "avg_keep": a}}
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                 {"type": "text", "text": question}]}]
        for mode, max_batch in (("batched", args.max_batch), ("one at a time", 1)):
            server = InProcessServer(model, model_id, max_batch, args.window_ms)
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="none", max_retries=0,
                                   timeout=600)
            try:
                for label, prune in prunes.items():
                    # warm-up: compile every batch size a level can use
                    for stream in (False, True):
                        for c in sorted({1, 2, 4, 8, 16, max_batch}):
                            if c <= max_batch:
                                run_level(client, model_id, messages, clients=c, requests=c,
                                          max_tokens=args.max_tokens, prune=prune, stream=stream)
                    for clients in map(int, args.clients.split(",")):
                        if mode != "batched" and clients == 1:
                            continue  # the same as batched with one client
                        if time.perf_counter() - started > args.budget_s:
                            print("time budget spent: stopping", file=sys.stderr)
                            break
                        before = server.stats()
                        wall, out = run_level(client, model_id, messages, clients=clients, requests=args.requests,
                                              max_tokens=args.max_tokens, prune=prune, stream=False)
                        after = server.stats()
                        _, sout = run_level(client, model_id, messages, clients=clients,
                                            requests=max(clients, args.requests // 4),
                                            max_tokens=args.max_tokens, prune=prune, stream=True)
                        ttfts = [o[1] for o in sout if o[1] is not None]
                        texts = {t for *_, t in out}
                        lat = [o[0] for o in out]
                        row = {
                            "model": model_id, "prune": label, "mode": mode, "clients": clients,
                            "requests": len(out), "answered": sum(t is not None for *_, t in out),
                            "served_by_server": after["requests_served"] - before["requests_served"],
                            "batches": after["batches_run"] - before["batches_run"],
                            "requests_per_s": len(out) / wall,
                            "tokens_per_s": sum(o[2] for o in out) / wall,
                            "p50_latency_s": statistics.median(lat), "p95_latency_s": pct(lat, 0.95),
                            "p50_ttft_s": statistics.median(ttfts) if ttfts else None,
                            "distinct_answers": len(texts),
                        }
                        rows.append(row)
                        print(json.dumps(row), file=sys.stderr)
                        write(args, rows)
            finally:
                server.close()
    write(args, rows)
    print(Path(args.out).with_suffix(".md").read_text())
    return 1 if lost(rows) else 0


def lost(rows) -> list:
    return [r for r in rows if not r["answered"] == r["requests"] == r["served_by_server"]]


if __name__ == "__main__":
    sys.exit(main())
