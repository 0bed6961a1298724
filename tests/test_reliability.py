"""Every bad input ends in one clear error (exit 2 and one `error:` line from the CLI, an
error naming the argument from the API), checked before anything heavy is loaded; bugs show
their traceback; Ctrl-C exits 130 with one line; non-finite numbers are reported, never
answered."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import photo

import ep_jax
from ep_jax.errors import EpJaxError, InputError, NumericalError

ROOT = Path(__file__).resolve().parent.parent
IMAGE = ROOT / "examples" / "scene_count_0007.png"


def cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "ep_jax.generate", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout, env={**os.environ, **(env or {})})


def one_error_line(r, match: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert match in lines[0], lines[0]
    assert r.stdout == ""


FLAG_CASES = {
    "max_new_tokens_0": (["--max-new-tokens", "0"], "max_new_tokens=0"),
    "temperature_nan": (["--temperature", "nan"], "temperature=nan"),
    "temperature_inf": (["--temperature", "inf"], "temperature=inf"),
    "temperature_negative": (["--temperature", "-1"], "temperature=-1"),
    "top_p_zero": (["--top-p", "0"], "top_p=0"),
    "top_p_above_one": (["--top-p", "1.5"], "top_p=1.5"),
    "top_k_negative": (["--top-k", "-1"], "top_k=-1"),
    "seed_too_big": (["--seed", "99999999999999999999999"], "seed=99999999999999999999999"),
    "keep_negative": (["--keep", "-3"], "--keep -3"),
    "keep_ratio_above_one": (["--keep-ratio", "2"], "--keep-ratio 2"),
    "keep_ratio_nan": (["--keep-ratio", "nan"], "--keep-ratio nan"),
    "prune_layer_zero": (["--prune-layer", "0"], "--prune-layer 0"),
    "prune_layer_word": (["--prune-layer", "two"], "--prune-layer 'two'"),
    "budget_without_method": (["--prune", "none", "--keep", "4"], "need a pruning method"),
    "stream_and_json": (["--stream", "--json"], "--stream and --json"),
    "explain_under_a_file": (["--explain", f"{IMAGE}/kept.png"], "is a file, not a folder"),
    "explain_is_a_folder": (["--explain", str(ROOT)], "is a directory"),
    "explain_without_pruning": (["--prune", "none", "--explain", "/tmp/x.png"], "--explain"),
    "two_prompts_three_images": (["--prompt", "b", "--image", str(IMAGE), "--image", str(IMAGE)], "2 prompts"),
}


@pytest.mark.parametrize("case", sorted(FLAG_CASES))
def test_bad_flags_fail_before_the_model_loads(case):
    extra, match = FLAG_CASES[case]
    t0 = time.perf_counter()
    r = cli("--image", IMAGE, "--prompt", "How many circles are there?", *extra)
    one_error_line(r, match)
    assert "using the shipped model" not in r.stderr  # nothing was loaded
    assert time.perf_counter() - t0 < 60


def test_bad_image_fails_before_the_model_loads(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    r = cli("--image", bad, "--prompt", "hi")
    one_error_line(r, str(bad))
    assert "using the shipped model" not in r.stderr


def test_not_a_checkpoint_and_a_missing_model(tmp_path):
    one_error_line(cli("--model", tmp_path, "--image", IMAGE, "--prompt", "hi"), "neither an ep_jax checkpoint")
    one_error_line(cli("--model", tmp_path / "nope", "--image", IMAGE, "--prompt", "hi"), "nope")


def test_invalid_utf8_prompt_is_one_error_line():
    r = subprocess.run([sys.executable, "-m", "ep_jax.generate", "--image", str(IMAGE), "--prompt",
                        os.fsdecode(b"caf\xe9 \xff?")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    one_error_line(r, "prompt")


def test_debug_shows_the_traceback_of_a_user_error():
    r = cli("--image", IMAGE, "--prompt", "x", "--max-new-tokens", "0", "--debug")
    assert r.returncode == 2 and "Traceback" in r.stderr and "error: max_new_tokens=0" in r.stderr
    r = cli("--image", IMAGE, "--prompt", "x", "--max-new-tokens", "0", env={"EP_JAX_DEBUG": "1"})
    assert r.returncode == 2 and "Traceback" in r.stderr


def test_a_bug_shows_its_traceback_and_says_it_is_a_bug():
    from ep_jax.cli import BUG_LINE, run_cli
    from ep_jax.cli.generate import build_parser

    def broken(args):
        raise ValueError("an internal shape mismatch")  # not an EpJaxError: a bug

    code = run_cli(build_parser(), broken, ["--image", "x", "--prompt", "y"])
    assert code == 1 and BUG_LINE


def test_interrupt_during_the_run_exits_130_with_one_line():
    """A real SIGINT while the model loads or compiles: exit 130, one line, no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "ep_jax.generate", "--image", str(IMAGE), "--prompt", "hi",
                             "--max-new-tokens", "64"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "EP_JAX_COMPILATION_CACHE": "off"})
    first = proc.stderr.readline()  # "using the shipped model ...": we are inside the run
    assert "using the shipped model" in first
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, err)
    assert err.strip().splitlines() == ["interrupted"], err


# ---------------------------------------------------------------------- the API
@pytest.fixture(scope="module")
def shipped():
    return ep_jax.load()


API_CASES = {
    "max_new_tokens_float": (dict(max_new_tokens=3.5), "max_new_tokens=3.5"),
    "max_new_tokens_bool": (dict(max_new_tokens=True), "max_new_tokens=True"),
    "temperature_nan": (dict(temperature=float("nan")), "temperature=nan"),
    "temperature_inf": (dict(temperature=math.inf), "temperature=inf"),
    "temperature_string": (dict(temperature="hot"), "temperature='hot'"),
    "top_p_zero": (dict(top_p=0.0), "top_p=0.0"),
    "top_k_float": (dict(top_k=2.5), "top_k=2.5"),
    "seed_huge": (dict(seed=10**30), "seed="),
    "prune_string": (dict(prune="entropy"), "prune='entropy'"),
}


@pytest.mark.parametrize("case", sorted(API_CASES))
def test_api_arguments_are_named_in_errors(case, shipped):
    kwargs, match = API_CASES[case]
    with pytest.raises(InputError, match=match.replace("(", r"\(").replace("[", r"\[")):
        ep_jax.generate(shipped, [photo()], ["What is it?"], **kwargs)


def test_api_bad_prompts_and_images(shipped):
    with pytest.raises(InputError, match="prompts"):
        ep_jax.generate(shipped, [photo()], None)
    with pytest.raises(InputError, match="prompt 0 is a NoneType"):
        ep_jax.generate(shipped, [photo()], [None])
    with pytest.raises(InputError, match="2 image entries for 1 prompts"):
        ep_jax.generate(shipped, [photo(), photo()], ["one prompt"])
    with pytest.raises(InputError, match="NaN"):
        ep_jax.generate(shipped, [np.full((32, 32, 3), np.nan, np.float32)], ["What?"])


def test_forward_checks_its_arrays(shipped):
    enc = shipped.processor.encode(["What?"], [photo()])
    with pytest.raises(InputError, match="attention_mask shape"):
        ep_jax.forward(shipped, enc["input_ids"], enc["pixel_values"], enc["attention_mask"][:, 1:])
    with pytest.raises(InputError, match="NaN"):
        ep_jax.forward(shipped, enc["input_ids"], np.full_like(enc["pixel_values"], np.nan))
    with pytest.raises(InputError, match="image tokens"):
        ep_jax.forward(shipped, enc["input_ids"], None)
    with pytest.raises(InputError, match="pass an ep_jax.PruneConfig"):
        ep_jax.forward(shipped, enc["input_ids"], enc["pixel_values"], prune="preset")


def test_nan_weights_are_reported_not_answered(shipped):
    """Weights that turned non-finite in memory: generation raises instead of an empty answer."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    state = jax.tree.map(lambda a: a, shipped.state)
    state["norm"]["scale"][...] = jnp.full_like(state["norm"]["scale"][...], jnp.nan)
    broken = dataclasses.replace(shipped, state=state, compiled={})
    with pytest.raises(NumericalError, match="NaN or infinite logits for example"):
        ep_jax.generate(broken, [photo()], ["What is it?"], max_new_tokens=3)
    assert isinstance(NumericalError("x"), EpJaxError)


_INTERRUPTED_LOADS = r'''
import os, signal, threading, time
from ep_jax import checkpoint
from ep_jax.cli import redeliver_swallowed_interrupts
redeliver_swallowed_interrupts()  # as the commands do (JAX's garbage-collection callback swallows one)
checkpoint.load()
t0 = time.perf_counter(); checkpoint.load(); took = time.perf_counter() - t0
interrupted = other = 0
for i in range(20):  # a SIGINT at 20 moments spread over a load: each must come out as KeyboardInterrupt
    timer = threading.Timer(took * i / 20, os.kill, (os.getpid(), signal.SIGINT))
    seen = False
    try:
        timer.start()
        try:
            checkpoint.load()
        except Exception as e:
            other += 1
            print(type(e).__name__, e)
        time.sleep(0.5)  # a signal that arrived after the load lands here
    except KeyboardInterrupt:
        seen = True
    try:
        timer.join()
    except KeyboardInterrupt:
        seen = True
    interrupted += seen
print("interrupted", interrupted, "other", other)
'''


def test_ctrl_c_during_a_checkpoint_restore_is_an_interrupt():
    """orbax turns a KeyboardInterrupt in the middle of a restore into a read error or loses it;
    held until the restore ends, every Ctrl-C comes out as KeyboardInterrupt (-> exit 130)."""
    r = subprocess.run([sys.executable, "-c", _INTERRUPTED_LOADS], capture_output=True, text=True, cwd=ROOT,
                       timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.stdout.strip().splitlines()[-1:] == ["interrupted 20 other 0"], (r.stdout, r.stderr[-2000:])


def test_a_ctrl_c_in_an_orbax_finalizer_is_not_dropped_as_an_abandoned_read(monkeypatch):
    """Around a restore, unraisable errors of orbax's abandoned reads are dropped; a Ctrl-C that
    lands in one of its coroutines' finalizers still reaches the hook before it (the one that
    delivers it again to the main code)."""
    import types

    from ep_jax import checkpoint

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(type(u.exc_value).__name__))
    orbax_code = types.SimpleNamespace(co_filename="/site-packages/orbax/checkpoint/restore.py")
    for exc in (KeyboardInterrupt(), RuntimeError("boom")):
        with checkpoint._abandoned_reads_quiet():
            sys.unraisablehook(types.SimpleNamespace(exc_value=exc, object=types.SimpleNamespace(cr_code=orbax_code)))
    assert seen == ["KeyboardInterrupt"]
