"""The HTTP side of `python -m ep_jax.serve`: OpenAI's chat-completions API on FastAPI.

Requests are parsed and checked here (each problem a 4xx in OpenAI's error shape, naming the
field); images are decoded here; the model runs on the `Batcher`'s worker thread.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import dataclasses
import io
import json
import math
import queue
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ep_jax.errors import EpJaxError
from ep_jax.serve.batcher import Batcher, Job

PRUNE_KEYS = {"method", "layer", "keep", "avg_keep", "keep_ratio", "source"}


@dataclasses.dataclass
class ServeOptions:
    model_id: str
    allow_local_files: bool = False
    max_request_bytes: int = 32 << 20
    max_tokens_default: int = 256
    max_images: int = 8
    max_batch: int = 8
    window_s: float = 0.01
    max_queue: int = 64


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        kind = ("invalid_request_error" if self.status < 500 else
                "server_overloaded" if self.status == 503 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


# ---------------------------------------------------------------------- request parsing
def _number(body, name, default, lo, hi, *, integer=False, lo_open=False):
    v = body.get(name, default)
    if v is None:
        v = default
    ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok_type or not math.isfinite(v) or v > hi or (v <= lo if lo_open else v < lo):
        kind = "an integer" if integer else "a number"
        span = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise ApiError(400, f"{name}={v!r:.40}: need {kind} in {span}", name, "invalid_value")
    return v


def read_image(url: str, allow_local_files: bool):
    """An image_url part's url (a data URL; a local path or file:// URL with --allow-local-files)
    -> an RGB PIL image, or ApiError 400."""
    import PIL.Image

    from ep_jax.image_files import load_image

    if not isinstance(url, str) or not url:
        raise ApiError(400, "image_url.url must be a non-empty string", "messages", "invalid_image_url")
    if url.startswith("data:"):
        head, sep, data = url[5:].partition(",")
        media = head.split(";")[0].strip().lower()
        if not sep or ";base64" not in head.lower():
            raise ApiError(400, "image_url: a data URL must be data:image/<type>;base64,<data>", "messages",
                           "invalid_image_url")
        if media and not media.startswith("image/"):
            raise ApiError(400, f"image_url: the data URL holds {media!r}, not an image", "messages",
                           "invalid_image_url")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "image_url: the data URL is not valid base64", "messages", "invalid_image_url") from None
        try:
            im = PIL.Image.open(io.BytesIO(raw))
        except Exception as e:  # noqa: BLE001 - any decoder refusal is a bad input
            raise ApiError(400, f"image_url: the data URL's bytes are not an image PIL can read ({type(e).__name__})",
                           "messages", "invalid_image") from None
        try:
            return load_image(im)
        except EpJaxError as e:
            raise ApiError(400, f"image_url: {e}", "messages", "invalid_image") from None
    if url.startswith(("http://", "https://")):
        raise ApiError(400, "image_url: remote URLs are not fetched; send the image as a data URL "
                       "(data:image/png;base64,...)", "messages", "invalid_image_url")
    if not allow_local_files:
        raise ApiError(400, "image_url: local files are refused; send a data URL, or start the server with "
                       "--allow-local-files", "messages", "invalid_image_url")
    path = Path(url[7:] if url.startswith("file://") else url)
    try:
        return load_image(path)
    except (EpJaxError, OSError) as e:
        raise ApiError(400, f"image_url: {e}", "messages", "invalid_image") from None


def parse_messages(messages, opts: ServeOptions) -> tuple[str, list]:
    """OpenAI messages -> (prompt text, images). System and user text parts are joined by
    newlines; image parts go to the model in order (the chat template places them)."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "messages", "invalid_value")
    texts, images = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a role", "messages", "invalid_value")
        if m["role"] not in ("system", "developer", "user"):
            raise ApiError(400, f"messages[{i}].role {m['role']!r}: only system and user messages are supported "
                           "(one question per request; no multi-turn history)", "messages", "invalid_value")
        content = m.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of parts", "messages",
                           "invalid_value")
        for j, part in enumerate(parts):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                images.append(read_image(url, opts.allow_local_files))
            else:
                raise ApiError(400, f"messages[{i}].content[{j}]: need a text part or an image_url part",
                               "messages", "invalid_value")
    if len(images) > opts.max_images:
        raise ApiError(400, f"{len(images)} images: at most {opts.max_images} per request", "messages",
                       "too_many_images")
    prompt = "\n".join(t for t in texts if t)
    if not prompt.strip():
        raise ApiError(400, "the messages hold no text", "messages", "invalid_value")
    return prompt, images


def parse_prune(spec, preset, family=None):
    """The `ep_prune` extra field -> PruneConfig | None (absent: the preset's default)."""
    from ep_jax.cli.generate import METHODS, prune_config
    from ep_jax.runtime.api import default_prune

    if spec is None:
        return default_prune(preset)
    if not isinstance(spec, dict) or set(spec) - PRUNE_KEYS:
        raise ApiError(400, f"ep_prune must be an object with keys among {sorted(PRUNE_KEYS)}", "ep_prune",
                       "invalid_value")
    method = spec.get("method", "entropy")
    if method not in METHODS:
        raise ApiError(400, f"ep_prune.method {method!r}: use one of {METHODS}", "ep_prune", "invalid_value")
    budgets = [k for k in ("keep", "avg_keep", "keep_ratio") if spec.get(k) is not None]
    if len(budgets) > 1:
        raise ApiError(400, f"ep_prune: give one budget, not {budgets}", "ep_prune", "invalid_value")
    for k in ("keep", "avg_keep"):
        if k in budgets:
            _number(spec, k, None, 0, 1 << 30, integer=True)
    if "keep_ratio" in budgets:
        _number(spec, "keep_ratio", None, 0, 1)
    layer = spec.get("layer")
    if layer is not None and layer != "auto":
        _number(spec, "layer", None, 1, 1 << 16, integer=True)
    if method == "none" and (budgets or layer is not None):
        raise ApiError(400, "ep_prune: method 'none' takes no budget or layer", "ep_prune", "invalid_value")
    args = argparse.Namespace(prune=method, prune_layer=None if layer is None else str(layer),
                              keep=spec.get("keep"), keep_avg=spec.get("avg_keep"), keep_ratio=spec.get("keep_ratio"),
                              score_source=spec.get("source", "query"))
    try:
        return prune_config(args, preset, family)
    except EpJaxError as e:
        raise ApiError(400, f"ep_prune: {e}", "ep_prune", "invalid_value") from None


def parse_request(body, model, opts: ServeOptions, loop) -> Job:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
    name = body.get("model", opts.model_id)
    if name != opts.model_id:
        raise ApiError(404, f"the model {name!r} does not exist; this server serves {opts.model_id!r}", "model",
                       "model_not_found")
    if "messages" not in body:
        raise ApiError(400, "missing required field: messages", "messages", "missing_required_parameter")
    if body.get("n") not in (None, 1):
        raise ApiError(400, "n: only n=1 is supported", "n", "invalid_value")
    context = model.config.text.max_position_embeddings
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", opts.max_tokens_default, 1, context, integer=True)
    temperature = _number(body, "temperature", 0.0, 0, 2)
    top_p = _number(body, "top_p", 1.0, 0, 1, lo_open=True)
    top_k = _number(body, "top_k", 0, 0, 1 << 20, integer=True)
    seed = _number(body, "seed", 0, -(1 << 63), (1 << 63) - 1, integer=True)
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "stop must be a string or a list of up to 4 non-empty strings", "stop", "invalid_value")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false", "stream", "invalid_value")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", "stream_options", "invalid_value")
    prune = parse_prune(body.get("ep_prune"), model.preset, model.family)
    prompt, images = parse_messages(body["messages"], opts)
    # the prompt's length with its images (the chat template's, as run_generation encodes it;
    # the pixels are computed once, in the batch)
    template = getattr(model.preset, "template", None) or model.family.default_template
    try:
        n = model.processor.prompt_length(prompt, images, template=template)
    except EpJaxError as e:
        raise ApiError(400, str(e), "messages", "invalid_value") from None
    if n >= context:
        raise ApiError(400, f"the prompt takes {n} tokens (with its images); the model context is {context}",
                       "messages", "context_length_exceeded")
    max_tokens = min(max_tokens, context - n)  # as OpenAI-compatible servers do: the answer ends at the context
    return Job(prompt=prompt, images=images, max_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p),
               top_k=top_k, seed=seed, prune=prune, stop=tuple(stop), stream=stream, loop=loop,
               events=asyncio.Queue(), prompt_tokens=n,
               include_usage=bool(options.get("include_usage")))


# ---------------------------------------------------------------------- the app
def create_app(model, opts: ServeOptions, batcher: Batcher | None = None):
    import contextlib

    batcher = batcher or Batcher(model, max_batch=opts.max_batch, window_s=opts.window_s, max_queue=opts.max_queue)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await run_in_threadpool(batcher.stop)  # uvicorn has drained the connections by now

    app = FastAPI(title="ep_jax", lifespan=lifespan)
    app.state.batcher = batcher

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return error_response(e)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return error_response(ApiError(e.status_code, str(e.detail), None, "not_found" if e.status_code == 404 else None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e):
        return error_response(ApiError(400, str(e), None, "invalid_value"))

    @app.exception_handler(Exception)
    async def server_error(request, e):
        return error_response(ApiError(500, f"internal error ({type(e).__name__}); see the server log"))

    @app.get("/health")
    async def health():
        s = dict(batcher.stats)
        s["batch_sizes"] = {str(k): v for k, v in sorted(s["batch_sizes"].items())}
        return {"status": "ok", "model": opts.model_id, "queued": batcher.queued(), "max_batch": opts.max_batch,
                "max_queue": opts.max_queue, **s}

    def model_card():
        return {"id": opts.model_id, "object": "model", "created": created, "owned_by": "ep_jax"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str):
        if name != opts.model_id:
            raise ApiError(404, f"the model {name!r} does not exist", "model", "model_not_found")
        return model_card()

    async def read_body(request: Request) -> bytes:
        limit = opts.max_request_bytes
        too_large = ApiError(413, f"the request is larger than the limit of {limit} bytes (--max-request-mb)",
                             None, "request_too_large")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > 4 * limit:
            raise too_large  # answered at once (the client may see the connection close while sending)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > 4 * limit:
                raise too_large
            if size <= limit:
                chunks.append(chunk)
        if size > limit:  # read to the end (up to 4x the limit) so that the client gets the 413
            raise too_large
        return b"".join(chunks)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        raw = await read_body(request)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})", None, "invalid_json") from None
        loop = asyncio.get_running_loop()
        try:
            job = await run_in_threadpool(parse_request, body, model, opts, loop)
        except EpJaxError as e:
            raise ApiError(400, str(e), None, "invalid_value") from None
        try:
            batcher.submit(job)
        except queue.Full:
            raise ApiError(503, f"the server is at its queue limit ({opts.max_queue} requests); retry shortly",
                           None, "queue_full", headers={"Retry-After": "1"}) from None
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        now = int(time.time())
        if job.stream:
            return StreamingResponse(_sse(job, rid, now, opts.model_id), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        while True:
            kind, payload = await job.events.get()
            if kind == "done":
                break
            if kind == "error":
                raise _as_api_error(payload)
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": now, "model": opts.model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": payload["text"]},
                         "finish_reason": payload["finish_reason"], "logprobs": None}],
            "usage": _usage(payload),
        })

    return app


def _usage(r: dict) -> dict:
    return {"prompt_tokens": r["prompt_tokens"], "completion_tokens": r["completion_tokens"],
            "total_tokens": r["prompt_tokens"] + r["completion_tokens"]}


def _as_api_error(e: Exception) -> ApiError:
    if isinstance(e, EpJaxError):
        return ApiError(400, str(e), None, "invalid_value")
    return ApiError(500, f"internal error ({type(e).__name__}); see the server log")


async def _sse(job: Job, rid: str, created: int, model_id: str):
    """OpenAI's stream: a role chunk, content chunks, a finish chunk, a usage chunk, [DONE]. The
    role chunk goes out with the first generated token (OpenAI's timing, so a client's time to the
    first chunk is the time to the first token, whatever that token's text)."""
    def chunk(delta, finish=None, usage=None, choices=True):
        d = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_id,
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}] if choices else []}
        if usage is not None:
            d["usage"] = usage
        return f"data: {json.dumps(d)}\n\n"

    started = False
    while True:
        kind, payload = await job.events.get()
        if not started:
            started = True
            yield chunk({"role": "assistant", "content": ""})
        if kind == "first":
            continue
        if kind == "delta":
            yield chunk({"content": payload})
        elif kind == "done":
            yield chunk({}, payload["finish_reason"])
            if job.include_usage:
                yield chunk(None, usage=_usage(payload), choices=False)
            break
        else:
            yield f"data: {json.dumps(_as_api_error(payload).body())}\n\n"
            break
    yield "data: [DONE]\n\n"
