"""Write a random HF LLaVA checkpoint of a given size with numpy only, then (in a subprocess)
convert it and report peak RSS. Used by test_convert to check that conversion streams."""

import json
import sys
from pathlib import Path

import numpy as np


def probe_hf_config(text_layers=8, hidden=512, vocab=32000) -> dict:
    """The config.json of the probes' LLaVA: a small vision tower, a decoder of `text_layers`."""
    return {
        "model_type": "llava",
        "vision_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
        "text_config": {"model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
                        "intermediate_size": 4 * hidden, "num_hidden_layers": text_layers,
                        "num_attention_heads": 8, "num_key_value_heads": 8},
        "image_token_index": 5,
    }


def write_random_checkpoint(dst: Path, text_layers=8, hidden=512, vocab=32000, shards=4):
    from safetensors.numpy import save_file

    from ep_jax import hf
    from ep_jax.checkpoint import _shapes
    from ep_jax.runtime.model import abstract_model
    from ep_jax.config import LlavaConfig
    from ep_jax.families import get as get_family

    hf_cfg = probe_hf_config(text_layers, hidden, vocab)
    cfg = LlavaConfig.from_hf_dict(hf_cfg)
    _, state = abstract_model(get_family("llava"), cfg, np.float32)
    shapes = _shapes(state)
    rng = np.random.default_rng(0)
    params = {}
    for entry in hf.weight_table(cfg):
        shape = shapes
        for p in entry.path:
            shape = shape[p]
        params_leaf = params
        for p in entry.path[:-1]:
            params_leaf = params_leaf.setdefault(p, {})
        params_leaf[entry.path[-1]] = np.zeros(shape, np.float32)
    tensors = [(n, (rng.standard_normal(a.shape) * 0.02).astype(np.float32)) for n, a in hf.iter_hf_export(params, cfg)]
    dst.mkdir(parents=True, exist_ok=True)
    total = sum(a.nbytes for _, a in tensors)
    per = total / shards
    groups, size = [[]], 0
    for n, a in tensors:
        if size > per and len(groups) < shards:
            groups.append([])
            size = 0
        groups[-1].append((n, a))
        size += a.nbytes
    weight_map = {}
    for i, g in enumerate(groups):
        f = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(dict(g), str(dst / f))
        weight_map.update({n: f for n, _ in g})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (dst / "config.json").write_text(json.dumps(hf_cfg))
    return total


def anon_rss_mib() -> float:
    """Anonymous resident memory: what the process allocated, without the page cache of the
    memory-mapped shards (reclaimable, so it does not count against RAM)."""
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class PeakSampler:
    """Polls anonymous RSS every millisecond in a thread and keeps the maximum."""

    def __init__(self):
        import threading

        self.peak = anon_rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, anon_rss_mib())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, anon_rss_mib())


if __name__ == "__main__":
    # argv: src dst dtype -> prints "baseline_mib peak_mib"
    import ep_jax.checkpoint  # noqa: F401  (imports before the baseline)
    import jax
    import orbax.checkpoint  # noqa: F401
    from safetensors import safe_open  # noqa: F401

    jax.numpy.zeros(1).block_until_ready()
    from ep_jax.checkpoint import convert_hf

    base = anon_rss_mib()
    sampler = PeakSampler()
    convert_hf(sys.argv[1], sys.argv[2], dtype=sys.argv[3], progress=False)
    peak = sampler.stop()
    print(f"{base:.1f} {peak:.1f}")
