"""Dynamic batching: requests that arrive within a short window with the same settings run as
one `run_generation` call, on one worker thread (every JAX call of the server is made there).

A batch is padded to a power of two (at most `max_batch`) with repeats of its last request, so
that any mix of concurrent users reuses the few compiled batch sizes. Greedy requests batch
together when their settings (max_tokens, pruning, streaming) match; a sampled request
(temperature > 0) runs alone, so that its `seed` gives the answer `ep_jax.generate` gives.
When a batch fails with an error about its inputs, each request is run again alone, so that one
bad request fails only itself.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import queue
import sys
import threading
import time
import traceback
from typing import Any

from ep_jax.errors import EpJaxError

_STOP = object()


@dataclasses.dataclass
class Job:
    """One chat completion: its inputs, settings, and the way back to its HTTP handler."""

    prompt: str
    images: list  # PIL images
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    prune: Any  # PruneConfig | None
    stop: tuple[str, ...]
    stream: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    prompt_tokens: int = 0
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    sent: str = ""  # the text streamed so far: a greedy request rerun alone (its batch failed) resumes after it
    arrived: float = dataclasses.field(default_factory=time.perf_counter)

    @property
    def key(self):
        """Requests with equal keys can share a batch (None: runs alone)."""
        if self.temperature > 0:
            return None
        return (self.max_tokens, self.prune, self.stream, self.top_k)

    def emit(self, kind: str, payload=None) -> None:
        """Hand an event to the request's handler (thread-safe): ("delta", text),
        ("done", result dict) or ("error", exception)."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))


def cut_at_stop(text: str, stops) -> tuple[str, bool]:
    """`text` up to the first stop string (OpenAI's `stop`: not included), and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class Batcher:
    def __init__(self, model, *, max_batch: int = 8, window_s: float = 0.01, max_queue: int = 64):
        self.model = model
        self.max_batch = max_batch
        self.window_s = window_s
        self.queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self.stats = {"requests_served": 0, "requests_failed": 0, "batches_run": 0, "largest_batch": 0,
                      "rejected_full": 0, "batch_sizes": collections.Counter()}
        self._thread = threading.Thread(target=self._loop, name="ep_jax-model", daemon=True)
        self._pending: collections.deque = collections.deque()

    # ------------------------------------------------------------------ life cycle
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is queued, then end the worker thread."""
        if self._thread.is_alive():
            self.queue.put(_STOP)
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queue a job; `queue.Full` when the queue is at its bound (the caller answers 503)."""
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            self.stats["rejected_full"] += 1
            raise

    def queued(self) -> int:
        return self.queue.qsize() + len(self._pending)

    # ------------------------------------------------------------------ worker
    def _next(self, timeout: float | None):
        if self._pending:
            return self._pending.popleft()
        return self.queue.get(timeout=timeout) if timeout is not None else self.queue.get()

    def _collect(self, first: Job) -> list[Job]:
        batch = [first]
        if first.key is None:
            return batch
        for job in list(self._pending):  # compatible requests that waited behind another batch
            if len(batch) < self.max_batch and job.key == first.key:
                self._pending.remove(job)
                batch.append(job)
        deadline = time.perf_counter() + self.window_s
        while len(batch) < self.max_batch:
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            try:
                job = self.queue.get(timeout=left)
            except queue.Empty:
                break
            if job is _STOP:
                self._pending.append(job)
                break
            if job.key == first.key:
                batch.append(job)
            else:
                self._pending.append(job)
        return batch

    def _loop(self) -> None:
        while True:
            first = self._next(None)
            if first is _STOP:
                if self._pending:  # jobs that arrived after the stop request: still answer them
                    self._pending.append(_STOP)
                    continue
                return
            batch = self._collect(first)
            try:
                self._run(batch)
            except EpJaxError as e:
                if len(batch) == 1:
                    self._fail(batch[0], e)
                else:  # one bad input fails only its own request
                    for job in batch:
                        try:
                            self._run([job])
                        except Exception as e1:  # noqa: BLE001 - handed to the request
                            self._fail(job, e1)
            except Exception as e:  # noqa: BLE001 - a bug: the requests get a 500, the server lives on
                traceback.print_exc(file=sys.stderr)
                for job in batch:
                    self._fail(job, e)

    def _fail(self, job: Job, e: Exception) -> None:
        self.stats["requests_failed"] += 1
        job.emit("error", e)

    def _run(self, batch: list[Job]) -> None:
        from ep_jax.runtime.api import run_generation

        size = 1
        while size < len(batch):
            size *= 2
        size = min(size, self.max_batch) if len(batch) <= self.max_batch else len(batch)
        padded = batch + batch[-1:] * (size - len(batch))
        eos = set(self.model.config.eos_ids or ())
        first = batch[0]
        on_token = self._streamer(batch, eos) if first.stream else None
        gen = run_generation(
            self.model, [job.images or None for job in padded], [job.prompt for job in padded],
            max_new_tokens=first.max_tokens, temperature=first.temperature, top_p=first.top_p, top_k=first.top_k,
            seed=first.seed, prune=first.prune, on_token=on_token,
        )
        prompt_tokens = gen.inputs["attention_mask"].sum(1)
        self.stats["batches_run"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
        self.stats["batch_sizes"][len(batch)] += 1
        for i, job in enumerate(batch):
            ids = gen.token_ids[i]
            text, hit = cut_at_stop(gen.texts[i], job.stop)
            ended = hit or (bool(ids) and ids[-1] in eos)
            result = {"text": text, "finish_reason": "stop" if ended else "length",
                      "prompt_tokens": int(prompt_tokens[i]), "completion_tokens": len(ids),
                      "batch_size": len(batch)}
            if job.stream and text.startswith(job.sent) and len(text) > len(job.sent):  # what was held back
                job.emit("delta", text[len(job.sent):])
            self.stats["requests_served"] += 1
            job.emit("done", result)

    def _streamer(self, batch: list[Job], eos: set[int]):
        """The `on_token` callback of a streaming batch: each request gets the new text of its
        row as it is decoded; text that could be the start of a stop string, or a character
        whose bytes are not all decoded yet, is held back until it is certain."""
        proc = self.model.processor
        produced = [[] for _ in batch]
        finished = [False] * len(batch)
        holdback = [max((len(s) for s in job.stop), default=1) - 1 for job in batch]

        def on_token(tokens):
            for i, job in enumerate(batch):
                if finished[i]:
                    continue
                if not produced[i]:
                    job.emit("first", None)  # the stream's first chunk leaves now: time to first token
                if tokens[i] in eos:
                    finished[i] = True
                    continue
                produced[i].append(tokens[i])
                text, hit = cut_at_stop(proc.decode(produced[i]), job.stop)
                if hit:
                    finished[i] = True
                elif holdback[i]:
                    text = text[:max(len(text) - holdback[i], len(job.sent))]
                text = text.rstrip("\ufffd")
                if len(text) > len(job.sent) and text.startswith(job.sent):
                    job.emit("delta", text[len(job.sent):])
                    job.sent = text

        return on_token
