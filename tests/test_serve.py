"""`python -m ep_jax.serve`: the OpenAI-compatible server in a subprocess on a free loopback
port, driven by the official `openai` client (and raw HTTP for malformed requests)."""

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import openai  # (test dependency, requirements-test.txt; fastapi/uvicorn come with ep_jax.serve)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
MODEL_ID = "scenes-llava-tiny"


def examples():
    return json.loads((EXAMPLES / "examples.json").read_text())


def data_url(path: Path, media="image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(path.read_bytes()).decode()


def image_message(url: str, question: str) -> list:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *flags):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ep_jax.serve", "--port", str(self.port), "--log-level", "warning", *flags],
            cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        deadline = time.time() + 90
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.proc.stdout.read()}")
            try:
                self.health()
                break
            except OSError:
                if time.time() > deadline:
                    self.stop()
                    raise
                time.sleep(0.2)
        self.client = openai.OpenAI(base_url=f"{self.base}/v1", api_key="none", max_retries=0, timeout=120)

    def health(self) -> dict:
        with urllib.request.urlopen(f"{self.base}/health", timeout=5) as r:
            return json.loads(r.read())

    def post(self, body: bytes, path="/v1/chat/completions"):
        """(status, headers, JSON body) of a raw POST."""
        req = urllib.request.Request(self.base + path, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, r.headers, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, e.headers, json.loads(e.read())

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


@pytest.fixture(scope="module")
def server():
    s = Server("--batch-window-ms", "300", "--max-batch-size", "4", "--max-request-mb", "1")
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def offline():
    """ep_jax.generate (greedy, the preset's pruning, and unpruned) on each example alone."""
    import ep_jax
    from ep_jax.image_files import load_image

    model = ep_jax.load()
    out = {"text only": ep_jax.generate(model, [None], ["How many circles are there?"], max_new_tokens=32)[0]}
    for e in examples():
        im = [load_image(EXAMPLES / e["file"])]
        out[e["file"]] = ep_jax.generate(model, [im], [e["question"]], max_new_tokens=32)[0]
        out[e["file"], "none"] = ep_jax.generate(model, [im], [e["question"]], max_new_tokens=32, prune=None)[0]
    return out


def ask(server, e, **kw):
    kw.setdefault("max_tokens", 32)
    return server.client.chat.completions.create(
        model=MODEL_ID, messages=image_message(data_url(EXAMPLES / e["file"]), e["question"]), **kw)


def test_models_and_health(server):
    assert [m.id for m in server.client.models.list().data] == [MODEL_ID]
    h = server.health()
    assert h["status"] == "ok" and h["model"] == MODEL_ID


def test_chat_equals_generate_and_stream_equals_chat(server, offline):
    e = examples()[0]
    r = ask(server, e)
    assert r.choices[0].message.content == offline[e["file"]]
    assert r.choices[0].finish_reason == "stop" and r.object == "chat.completion"
    assert r.usage.prompt_tokens > 196 and r.usage.completion_tokens >= 1
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(ask(server, e, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    # pruning per request
    r = ask(server, e, extra_body={"ep_prune": {"method": "none"}})
    assert r.choices[0].message.content == offline[e["file"], "none"]
    r = ask(server, e, extra_body={"ep_prune": {"method": "entropy", "keep_ratio": 0.6}})
    assert isinstance(r.choices[0].message.content, str)
    # a text-only request
    r = server.client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "How many circles are there?"}], max_tokens=32)
    assert r.choices[0].message.content == offline["text only"]
    # max_tokens and stop
    r = ask(server, e, max_tokens=1, extra_body={"ep_prune": {"method": "none"}})
    assert r.choices[0].finish_reason in ("length", "stop") and r.usage.completion_tokens == 1
    word = offline[e["file"]]
    r = ask(server, e, stop=[word[1:]])
    assert r.choices[0].message.content == word[:1] and r.choices[0].finish_reason == "stop"
    chunks = list(ask(server, e, stop=["x" * 6, word[1:]], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == word[:1]


def test_concurrent_requests_are_batched_and_equal_generate(server, offline):
    before = server.health()
    items = examples()[:4]
    barrier = threading.Barrier(len(items))

    def one(e):
        barrier.wait()
        return ask(server, e).choices[0].message.content

    with ThreadPoolExecutor(len(items)) as pool:
        answers = list(pool.map(one, items))
    assert answers == [offline[e["file"]] for e in items]
    after = server.health()
    assert after["requests_served"] - before["requests_served"] == len(items)
    assert after["batches_run"] - before["batches_run"] < len(items)  # at least two shared a batch
    assert after["largest_batch"] >= 2


def _error(status, body, code=None):
    assert set(body) == {"error"} and isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert {"type", "param", "code"} <= set(body["error"])
    if code is not None:
        assert body["error"]["code"] == code
    return status


@pytest.mark.parametrize("case,status", [
    ("malformed json", 400), ("missing messages", 400), ("unknown model", 404), ("non-image data url", 400),
    ("bad image bytes", 400), ("temperature out of range", 400), ("top_p zero", 400), ("bad ep_prune", 400),
    ("local file refused", 400), ("too large", 413), ("unknown route", 404), ("assistant turn", 400),
])
def test_errors_are_openai_shaped(server, case, status):
    e = examples()[0]
    good = {"model": MODEL_ID, "messages": image_message(data_url(EXAMPLES / e["file"]), e["question"]),
            "max_tokens": 8}
    path = "/v1/chat/completions"
    if case == "malformed json":
        body = b'{"model": "x", "messages": ['
    else:
        d = dict(good)
        if case == "missing messages":
            d.pop("messages")
        elif case == "unknown model":
            d["model"] = "gpt-17"
        elif case == "non-image data url":
            d["messages"] = image_message("data:text/plain;base64," + base64.b64encode(b"hello").decode(), "hi")
        elif case == "bad image bytes":
            d["messages"] = image_message("data:image/png;base64," + base64.b64encode(b"not a png").decode(), "hi")
        elif case == "temperature out of range":
            d["temperature"] = 7
        elif case == "top_p zero":
            d["top_p"] = 0
        elif case == "bad ep_prune":
            d["ep_prune"] = {"method": "entropy", "keep_ratio": 3}
        elif case == "local file refused":
            d["messages"] = image_message(str(EXAMPLES / e["file"]), "hi")
        elif case == "too large":
            d["padding"] = "x" * (1 << 21)
        elif case == "unknown route":
            path = "/v1/completions/nothing"
        elif case == "assistant turn":
            d["messages"] = d["messages"] + [{"role": "assistant", "content": "green"}]
        body = json.dumps(d).encode()
    got, _, payload = server.post(body, path)
    assert _error(got, payload) == status, payload
    assert server.health()["status"] == "ok"  # a bad request never takes the server down


def test_openai_client_errors(server):
    e = examples()[0]
    with pytest.raises(openai.NotFoundError):
        server.client.chat.completions.create(model="nope", messages=image_message(data_url(EXAMPLES / e["file"]), "hi"))
    with pytest.raises(openai.BadRequestError):
        ask(server, e, temperature=-1)


def test_overload_gives_503_and_sigterm_drains(tmp_path):
    s = Server("--max-queue", "1", "--max-batch-size", "1", "--batch-window-ms", "0", "--allow-local-files")
    try:
        e = examples()[0]
        body = json.dumps({"model": MODEL_ID, "messages": image_message(str(EXAMPLES / e["file"]), e["question"]),
                           "max_tokens": 200, "ep_prune": {"method": "none"}, "temperature": 1.0}).encode()
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda _: s.post(body), range(8)))
        codes = sorted(r[0] for r in results)
        assert 200 in codes and 503 in codes, codes
        for code, headers, payload in results:
            if code == 503:
                assert headers["Retry-After"] and _error(code, payload, "queue_full")
            else:
                assert code == 200 and payload["choices"][0]["message"]["content"] is not None
        assert s.health()["rejected_full"] == codes.count(503)
        # SIGTERM while a request is in flight: it is answered, then the server exits 0
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(s.post, body)
            time.sleep(0.5)
            s.proc.send_signal(signal.SIGTERM)
            code, _, payload = pending.result(timeout=60)
        assert code == 200 and payload["object"] == "chat.completion"
        assert s.proc.wait(timeout=30) == 0
    finally:
        s.stop()


def test_bad_flags_fail_before_loading():
    r = subprocess.run([sys.executable, "-m", "ep_jax.serve", "--port", "70000"], capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: --port 70000")
