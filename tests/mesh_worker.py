"""Run one family on 8 simulated CPU devices under several meshes and print what test_mesh.py
asserts, as one JSON line. Started by tests/test_mesh.py in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (set before jax is imported; the rest of the
suite runs on one device).

    python tests/mesh_worker.py FAMILY MODEL_DIR OUT.npz

MODEL_DIR is a tiny random Hugging Face model that the test built (`build`, with torch, in the
test process: this process never imports torch). OUT.npz receives the inputs and the
single-device logits, which the test compares with transformers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import PIL.Image

sys.path.insert(0, str(Path(__file__).parent))

MESHES = ("data=1,model=8", "data=2,model=4", "data=8,model=1")
BATCH = 8
PRUNE = dict(layer=2, keep=3)
PROMPTS = ["What is in the image?", "Describe it.", "How many circles are there?", "Is there a cat?",
           "What colour is the square?", "Describe the photo in detail please.", "yes or no?", "Count them."]
# parameters whose shards the test checks (path in the parameter tree)
WATCHED = {"q": ("layers", "attn", "q"), "k": ("layers", "attn", "k"), "o": ("layers", "attn", "o"),
           "gate": ("layers", "mlp", "gate"), "down": ("layers", "mlp", "down"), "embed": ("embed",),
           "lm_head": ("lm_head",)}


def images(seed: int, sizes) -> list:
    rng = np.random.default_rng(seed)
    return [PIL.Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


SIZES = {
    "llava": [(40, 40)] * BATCH,
    "llava_next": [(32, 64), (64, 32), (64, 64), (32, 96), (96, 32), (64, 64), (32, 64), (40, 40)],
    "qwen2_5_vl": [(112, 112), (140, 112), (112, 140), (112, 112), (168, 112), (112, 168), (140, 140), (112, 112)],
}


def build(family: str, work: Path):
    """A tiny random Hugging Face model of the family (imports torch): (directory, torch model)."""
    import hf_tiny

    if family == "llava":  # 8 query heads over 4 kv heads: on model=8 the kv heads are replicated
        d, tm, _ = hf_tiny.build_tiny_llava(work / family, seed=5, text_extra={"num_attention_heads": 8})
    elif family == "llava_next":  # 8 query and 8 kv heads: everything splits on model=8
        d, tm, _ = hf_tiny.build_tiny_llava_next(work / family, seed=6, num_kv_heads=8,
                                                 text_extra={"num_attention_heads": 8})
    else:  # 4 heads, 2 kv heads: kv heads replicated on model=4 and 8, query heads on model=8
        d, tm = hf_tiny.build_tiny_qwen2_5_vl(work / family, seed=7)
    return d, tm


def encode(model, sizes, seed):
    from ep_jax.runtime.api import extra_arrays

    template = getattr(model.preset, "template", None) or model.family.default_template
    enc = model.processor.encode(PROMPTS, images(seed, sizes), template=template, pad_side="left")
    return enc, extra_arrays(enc)


def torch_logits(tm, arrays: dict) -> np.ndarray:
    """transformers' logits for the inputs the worker saved (`arrays`: its OUT.npz)."""
    import torch

    t = {k: torch.tensor(np.asarray(v).astype(np.int64) if v.dtype.kind in "iu" else np.asarray(v))
         for k, v in arrays.items() if k not in ("logits", "lengths")}
    if "image_grid_thw" in t:
        t["mm_token_type_ids"] = (t["input_ids"] == tm.config.image_token_id).long()
    with torch.no_grad():
        return tm(**t).logits.numpy()


def run(model, enc, extra, sizes):
    """Unpruned and pruned logits, kept positions and greedy tokens of one model."""
    import ep_jax
    from ep_jax import PruneConfig

    args = (enc["input_ids"], enc["pixel_values"], enc["attention_mask"])
    full = ep_jax.forward(model, *args, **extra)
    pruned = ep_jax.forward(model, *args, prune=PruneConfig(**PRUNE), **extra)
    gen = ep_jax.run_generation(model, images(0, sizes), PROMPTS, max_new_tokens=5, prune=PruneConfig(**PRUNE))
    return full, pruned, gen


def shard_report(model, gen) -> dict:
    from ep_jax.runtime.model import get_path
    from ep_jax.runtime.sharding import shard_shapes
    from flax import nnx

    params = nnx.to_pure_dict(model.state)
    out = {name: {"full": list(get_path(params, path).shape),
                  "shards": sorted(map(list, shard_shapes(get_path(params, path))))}
           for name, path in WATCHED.items()}
    for i, seg in enumerate(gen.prefill.cache.segments):
        out[f"cache{i}"] = {"full": list(seg.keys.shape), "shards": sorted(map(list, shard_shapes(seg.keys)))}
    return out


def max_diff(a, b, valid) -> float:
    return float(np.abs(np.asarray(a)[valid] - np.asarray(b)[valid]).max())


def main(family: str, directory: Path, out: Path) -> dict:
    import jax

    import ep_jax
    from ep_jax import compile_stats

    sizes = SIZES[family]
    ref_model = ep_jax.load(directory)
    enc, extra = encode(ref_model, sizes, 0)
    valid = np.asarray(enc["attention_mask"]).astype(bool)
    ref_full, ref_pruned, ref_gen = run(ref_model, enc, extra, sizes)
    np.savez(out, logits=ref_full.logits, **{k: np.asarray(v) for k, v in enc.items()})
    report = {"devices": jax.device_count(), "batch": BATCH,
              "kept_tokens": int(ref_pruned.kept_mask.sum()), "real_tokens": int(valid.sum()),
              "new_tokens": sum(map(len, ref_gen.token_ids)), "meshes": {}}
    for mesh in MESHES:
        model = ep_jax.load(directory, mesh=mesh)
        full, pruned, gen = run(model, enc, extra, sizes)
        row_valid = ref_pruned.row_valid
        entry = {
            "full": max_diff(full.logits, ref_full.logits, valid),
            "pruned": max_diff(pruned.logits, ref_pruned.logits, row_valid),
            "kept_equal": bool(np.array_equal(pruned.kept_mask, ref_pruned.kept_mask)
                               and np.array_equal(pruned.positions, ref_pruned.positions)),
            "tokens_equal": gen.token_ids == ref_gen.token_ids,
            "shards": shard_report(model, gen),
        }
        if mesh == "data=2,model=4":  # new images and prompts of the same buckets: nothing compiles
            before = compile_stats(model)["compiles"]
            enc2, extra2 = encode(model, sizes, 1)
            ep_jax.forward(model, enc2["input_ids"], enc2["pixel_values"], enc2["attention_mask"],
                           prune=ep_jax.PruneConfig(**PRUNE), **extra2)
            entry["compiles"] = [before, compile_stats(model)["compiles"]]
        report["meshes"][mesh] = entry
    return report


if __name__ == "__main__":
    print("MESH-REPORT " + json.dumps(main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))))
