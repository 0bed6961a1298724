"""`python -m ep_jax.serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) for ep_jax
models, with per-request EntropyPrune settings and dynamic batching.

    POST /v1/chat/completions   OpenAI chat completions: text and image_url parts (data URLs;
                                local paths with --allow-local-files), max_tokens, temperature,
                                top_p, seed, stop, stream (server-sent events), usage; the extra
                                field "ep_prune": {"method", "layer", "keep" | "avg_keep" |
                                "keep_ratio", "source"} (default: the model preset's pruning)
    GET  /v1/models             the one model served
    GET  /health                status and counters (requests served, batches run, queue)

Needs the `serve` extra (`pip install -e .[serve]`). `ep_jax/serve/app.py` parses requests,
`ep_jax/serve/batcher.py` batches them onto the one thread that runs the model.
"""
