"""`python -m ep_jax.serve`: the command line of the server (see `ep_jax/serve/__init__.py`).

Flags are checked before the model loads (exit 2 and one `error:` line, as every ep_jax
command). SIGTERM (or Ctrl-C) stops accepting connections, finishes the requests in flight and
exits 0 (130 after Ctrl-C; a second Ctrl-C stops at once).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from ep_jax.cli import add_debug_flag, run_cli
from ep_jax.errors import InputError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ep_jax.serve",
                                description="Serve an ep_jax model over OpenAI's chat-completions API.")
    p.add_argument("--model", help="ep_jax checkpoint or Hugging Face directory (default: the shipped model)")
    p.add_argument("--model-id", help="the model name clients send (default: the model folder name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="parameter dtype (default: as saved)")
    p.add_argument("--layout", choices=["auto", "stacked", "per_layer"], default="auto")
    p.add_argument("--allow-local-files", action="store_true",
                   help="accept image_url parts naming files on this machine (path or file://)")
    p.add_argument("--max-batch-size", type=int, default=8, help="requests per model call")
    p.add_argument("--batch-window-ms", type=float, default=10.0,
                   help="how long the first request of a batch waits for others")
    p.add_argument("--max-queue", type=int, default=64, help="queued requests before 503 + Retry-After")
    p.add_argument("--max-request-mb", type=float, default=32.0, help="larger request bodies get 413")
    p.add_argument("--max-tokens-default", type=int, default=256, help="max_tokens when a request gives none")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_debug_flag(p)
    return p


def check_args(args) -> None:
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port {args.port}: need 0..65535")
    for flag, value in (("--max-batch-size", args.max_batch_size), ("--max-queue", args.max_queue),
                        ("--max-tokens-default", args.max_tokens_default)):
        if value < 1:
            raise InputError(f"{flag} {value}: need an int >= 1")
    if not 0 <= args.batch_window_ms <= 10_000:
        raise InputError(f"--batch-window-ms {args.batch_window_ms}: need 0..10000")
    if not 0 < args.max_request_mb <= 4096:
        raise InputError(f"--max-request-mb {args.max_request_mb}: need a size in (0, 4096]")
    if args.model is not None and not Path(args.model).exists():
        raise InputError(f"--model {args.model}: no such file or folder")


def _run(args) -> int:
    check_args(args)
    try:
        import uvicorn

        from ep_jax.serve.app import ServeOptions, create_app  # FastAPI
    except ImportError as e:
        raise InputError(f"the server needs FastAPI and uvicorn ({e})", fix="pip install -e '.[serve]'") from None
    from ep_jax import checkpoint, presets

    model_path = args.model or presets.default_model_path()
    model = checkpoint.load(model_path, dtype=args.dtype, layout=args.layout)
    opts = ServeOptions(
        model_id=args.model_id or Path(os.path.abspath(model_path)).name, allow_local_files=args.allow_local_files,
        max_request_bytes=int(args.max_request_mb * (1 << 20)), max_tokens_default=args.max_tokens_default,
        max_batch=args.max_batch_size, window_s=args.batch_window_ms / 1e3, max_queue=args.max_queue,
    )
    app = create_app(model, opts)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=None)
    server = uvicorn.Server(config)
    print(f"ep_jax: serving {opts.model_id} ({model_path}) on http://{args.host}:{args.port}/v1", file=sys.stderr)
    # uvicorn drains the requests in flight on SIGTERM, then raises the signal again for the
    # previous handler: this one, so that a drained shutdown exits 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run()
    print("ep_jax: server stopped", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    return run_cli(build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
