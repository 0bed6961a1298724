"""`python -m ep_jax.bench speed --vs-hf`: the same random weights through transformers' PyTorch LLaVA, same prompt, same
threads, unpruned, measured in the same process right after the ep_jax runs.

The model is exported with `checkpoint.export_hf` (what `convert/ep_to_hf.py` runs) and loaded
with `LlavaForConditionalGeneration.from_pretrained`. Prefill is one forward pass with the KV
cache on and only the last position's logits (`logits_to_keep=1`, as ep_jax computes them);
decode is a plain greedy loop over the cache, one forward per token, no `generate()` overhead —
the fastest way to drive the PyTorch model, so the ratio does not flatter ep_jax.
"""

from __future__ import annotations

import inspect
import os
import statistics
import tempfile
import time
from typing import Any, Callable

import numpy as np

from ep_jax.bench_speed import Inputs

TORCH_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def measure_hf(model, inputs: Inputs, *, dtype: str, runs: int, warmup: int, max_new: int,
               jax_prefill: Callable[[], Any], jax_decode: Callable[[], Any], jax_logits: np.ndarray | None,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Each timed HF call alternates with the same ep_jax call (unpruned prefill; decode of
    `max_new` tokens), so both frameworks see the same state of the machine."""
    import torch
    import transformers
    from transformers import LlavaForConditionalGeneration

    from ep_jax.checkpoint import export_hf

    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(threads)
    torch_dtype = getattr(torch, TORCH_DTYPES[dtype])
    with tempfile.TemporaryDirectory(prefix="ep_bench_hf_") as tmp:
        t0 = time.perf_counter()
        export_hf(model, tmp)
        hf = LlavaForConditionalGeneration.from_pretrained(tmp, dtype=torch_dtype).eval()
        convert_s = time.perf_counter() - t0
    log(f"HF model exported + loaded in {convert_s:.1f} s (attention: {hf.config._attn_implementation})")

    ids = torch.as_tensor(inputs.input_ids, dtype=torch.long)
    pix = torch.as_tensor(np.asarray(inputs.pixel_values, np.float32)).to(torch_dtype)
    mask = torch.as_tensor(inputs.attention_mask, dtype=torch.long)

    def prefill():
        return hf(input_ids=ids, pixel_values=pix, attention_mask=mask, use_cache=True, logits_to_keep=1)

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    with torch.inference_mode():
        out = prefill()
        logits = out.logits[:, -1].float().numpy()
        prefill_s, jax_prefill_s = [], []
        for i in range(warmup + runs):
            t_hf, t_jax = timed(prefill), timed(jax_prefill)
            if i >= warmup:
                prefill_s.append(t_hf)
                jax_prefill_s.append(t_jax)

        # transformers 5.x renamed past_key_values to cache (the old name still works, deprecated).
        cache_arg = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
        decode_s, jax_decode_s = [], []
        for i in range(warmup + runs):
            out = prefill()  # a fresh cache: the decode loop grows it in place
            past, token = getattr(out, cache_arg), out.logits[:, -1].argmax(-1, keepdim=True)
            t0 = time.perf_counter()
            for _ in range(max_new - 1):
                out = hf(input_ids=token, use_cache=True, logits_to_keep=1, **{cache_arg: past})
                past, token = getattr(out, cache_arg), out.logits[:, -1].argmax(-1, keepdim=True)
            t_hf = time.perf_counter() - t0
            t_jax = timed(jax_decode)  # the first of its max_new tokens comes from the prefill, like HF's
            if i >= warmup:
                decode_s.append(t_hf)
                jax_decode_s.append(t_jax)
    del hf

    prefill_ms = 1e3 * statistics.median(prefill_s)
    decode_ms = 1e3 * statistics.median(decode_s) / (max_new - 1)
    jax_prefill_ms = 1e3 * statistics.median(jax_prefill_s)
    jax_decode_ms = 1e3 * statistics.median(jax_decode_s) / (max_new - 1)
    batch = inputs.input_ids.shape[0]
    result = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "xla_threads": f"XLA:CPU's default intra-op pool: one thread per core ({threads})"
        if _on_cpu() else "n/a (accelerator)",
        "dtype": dtype,
        "export_and_load_s": convert_s,
        "hf_prefill_ms": prefill_ms,
        "hf_prefill_ms_runs": [1e3 * t for t in prefill_s],
        "hf_decode_ms_per_step": decode_ms,
        "hf_decode_tokens_per_s": 1e3 * batch / decode_ms,
        "ep_jax_prefill_ms": jax_prefill_ms,
        "ep_jax_prefill_ms_runs": [1e3 * t for t in jax_prefill_s],
        "ep_jax_decode_ms_per_step": jax_decode_ms,
        "prefill_ratio": jax_prefill_ms / prefill_ms,
        "decode_ratio": jax_decode_ms / decode_ms,
        "method": "HF and ep_jax calls alternate (HF, ep_jax, HF, ep_jax, ...), medians of each",
        "last_logits_max_abs_diff": None if jax_logits is None else float(np.max(np.abs(jax_logits - logits))),
    }
    log(f"HF PyTorch: prefill {prefill_ms:.1f} ms, decode {decode_ms:.1f} ms/token; ep_jax/HF ratio: prefill "
        f"{result['prefill_ratio']:.2f}, decode {result['decode_ratio']:.2f}")
    return result


def _on_cpu() -> bool:
    import jax

    return jax.default_backend() == "cpu"
