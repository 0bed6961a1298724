"""Memory plan on paper: parameters and KV cache per device, at batch 32, with and without
EntropyPrune at the paper's budgets, for the large models on 8 x H100 (80 GB) and a TPU v5e-8
(16 GB HBM per chip), under every (data, model) mesh of 8 devices.

    python benchmarks/memory_plan.py [--batch 32] [--new-tokens 64] [--text-tokens 64]

Shapes are the public config.json values of each checkpoint (below); K and the budgets come from
the model presets (`models/*.json`, `ep_jax.presets`), R from `ep_jax.core.budget`, and which
dimension splits over the mesh from the runtime's own rules (`ep_jax.runtime.sharding`), so the
per-device numbers follow the code. bfloat16 weights and cache. Not counted: activations (a
prefill of 32 x ~3k tokens needs a few GB more), XLA workspace, the compiled programs.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from ep_jax.core.budget import budget, ratio_budget
from ep_jax.nn.partition import partition_spec
from ep_jax.presets import get as get_preset
from ep_jax.runtime.sharding import param_axes

GB = 1e9
BYTES = 2  # bfloat16
MESHES = ((8, 1), (4, 2), (2, 4), (1, 8))
DEVICES = {"8xH100 (80 GB)": 80 * GB, "TPU v5e-8 (16 GB)": 16 * GB}


@dataclass(frozen=True)
class Shapes:
    """Public config.json shapes: decoder, vision tower, visual tokens per image."""

    preset: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    vision_layers: int
    vision_hidden: int
    vision_ffn: int
    vision_heads: int
    projector_in: int  # projector / merger input width
    visual_tokens: int  # N per image assumed for the cache (see notes)
    note: str


MODELS = (
    Shapes("llava-1.5-7b", 32, 4096, 32, 32, 128, 11008, 32064, 24, 1024, 4096, 16, 1024, 576,
           "CLIP ViT-L/14-336: N = 576"),
    Shapes("llava-1.5-13b", 40, 5120, 40, 40, 128, 13824, 32064, 24, 1024, 4096, 16, 1024, 576,
           "CLIP ViT-L/14-336: N = 576"),
    Shapes("llava-v1.6-34b-hf", 60, 7168, 56, 8, 128, 20480, 64064, 24, 1024, 4096, 16, 1024, 2880,
           "AnyRes, a 2x2-tile image: N ~ 2,880"),
    Shapes("qwen2.5-vl-72b-instruct", 80, 8192, 64, 8, 128, 29568, 152064, 32, 1280, 3420, 16, 5120, 1296,
           "a 1008x1008 image: 36x36 merged patches, N = 1,296"),
)


def parameters(m: Shapes) -> list[tuple[tuple, tuple[int, ...]]]:
    """(path, shape) of every large parameter, named as in ep_jax's parameter tree."""
    L, d, f = m.layers, m.hidden, m.ffn
    VL, vd, vf = m.vision_layers, m.vision_hidden, m.vision_ffn
    vh = m.vision_heads
    out = [
        (("layers", "attn", "q"), (L, d, m.heads, m.head_dim)),
        (("layers", "attn", "k"), (L, d, m.kv_heads, m.head_dim)),
        (("layers", "attn", "v"), (L, d, m.kv_heads, m.head_dim)),
        (("layers", "attn", "o"), (L, m.heads, m.head_dim, d)),
        (("layers", "mlp", "gate"), (L, d, f)),
        (("layers", "mlp", "up"), (L, d, f)),
        (("layers", "mlp", "down"), (L, f, d)),
        (("layers", "input_norm", "scale"), (L, d)),
        (("layers", "post_norm", "scale"), (L, d)),
        (("embed",), (m.vocab, d)),
        (("lm_head",), (d, m.vocab)),
        (("proj1",), (m.projector_in, d)),
        (("proj2",), (d, d)),
    ]
    if m.preset.startswith("qwen"):  # fused qkv and SwiGLU MLP in the vision blocks
        out += [(("vision", "blocks", "qkv"), (VL, vd, 3 * vd)), (("vision", "blocks", "proj"), (VL, vd, vd)),
                (("vision", "blocks", "mlp", "gate"), (VL, vd, vf)), (("vision", "blocks", "mlp", "up"), (VL, vd, vf)),
                (("vision", "blocks", "mlp", "down"), (VL, vf, vd))]
    else:
        out += [(("vision", "layers", name), (VL, vd, vh, vd // vh)) for name in ("q", "k", "v")]
        out += [(("vision", "layers", "o"), (VL, vh, vd // vh, vd)), (("vision", "layers", "fc1"), (VL, vd, vf)),
                (("vision", "layers", "fc2"), (VL, vf, vd))]
    return out


def per_device_bytes(shape, axes, mesh: dict) -> float:
    spec = partition_spec(shape, axes, mesh)
    split = 1
    for entry in spec:
        for name in (entry if isinstance(entry, tuple) else (entry,)):
            split *= mesh.get(name, 1) if name else 1
    return math.prod(shape) * BYTES / split


def param_bytes(m: Shapes, mesh: dict) -> tuple[float, float]:
    """(total, per device) parameter bytes."""
    params = parameters(m)
    total = sum(math.prod(s) * BYTES for _, s in params)
    per = sum(per_device_bytes(s, param_axes(p), mesh) for p, s in params)
    return total, per


def kept(m: Shapes, label: str) -> int:
    """R of one image under a budget label ("A=128": layer-averaged; "r=0.25": ratio of N)."""
    preset = get_preset(m.preset)
    if label.startswith("r="):
        return ratio_budget(float(label[2:]), m.layers, preset.prune_layer, m.visual_tokens)
    return budget(int(label[2:]), m.layers, preset.prune_layer, m.visual_tokens)


def budgets(m: Shapes) -> list[str]:
    preset = get_preset(m.preset)
    if preset.budgets:
        return [f"A={a}" for a in preset.budgets]
    return ["r=0.25", "r=0.125"]  # Qwen2.5-VL: ratios of each image's N (preset notes)


def kv_bytes(m: Shapes, mesh: dict, batch: int, text: int, new: int, keep: int | None) -> float:
    """KV cache per device: both segments (layers 0..K-1 over all tokens, K..L-1 over the kept)."""
    prompt = text + m.visual_tokens
    layer_k = get_preset(m.preset).prune_layer if keep is not None else m.layers
    rows = [(layer_k, prompt + new), (m.layers - layer_k, text + (keep or 0) + new)]
    total = 0.0
    for layers, length in rows:
        shape = (layers, batch, length, m.kv_heads, m.head_dim)
        total += 2 * per_device_bytes(shape, (None, "batch", None, "kv_heads", None), mesh)
    return total


def table(batch: int, text: int, new: int) -> list[dict]:
    rows = []
    for m in MODELS:
        for data, model in MESHES:
            mesh = {"data": data, "model": model}
            total, per = param_bytes(m, mesh)
            row = {"model": m.preset, "mesh": f"data={data},model={model}", "params_total_gb": total / GB,
                   "params_gb": per / GB, "kv_full_gb": kv_bytes(m, mesh, batch, text, new, None) / GB}
            for label in budgets(m):
                row[f"R_{label}"] = keep = kept(m, label)
                row[f"kv_{label}_gb"] = kv_bytes(m, mesh, batch, text, new, keep) / GB
            rows.append(row)
    return rows


def verdict(row: dict, capacity: float) -> str:
    pruned = min(v for k, v in row.items() if k.startswith("kv_") and k != "kv_full_gb")
    full = row["params_gb"] + row["kv_full_gb"]
    with_prune = row["params_gb"] + pruned
    limit = 0.9 * capacity / GB  # 10 % for activations and workspace
    if full <= limit:
        return "fits"
    return "fits pruned" if with_prune <= limit else "no"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--text-tokens", type=int, default=64, help="prompt tokens besides the image")
    ap.add_argument("--new-tokens", type=int, default=64, help="decode room")
    args = ap.parse_args(argv)
    rows = table(args.batch, args.text_tokens, args.new_tokens)
    print(f"batch {args.batch}, {args.text_tokens} text tokens + N visual per prompt, {args.new_tokens} new tokens; "
          "bfloat16; GB = 1e9 bytes, per device\n")
    for m in MODELS:
        labels = budgets(m)
        print(f"## {m.preset} ({m.note}; K = {get_preset(m.preset).prune_layer}; "
              + ", ".join(f"{lb} -> R = {kept(m, lb)}" for lb in labels) + ")")
        head = ["mesh", "params", "KV full"] + [f"KV {lb}" for lb in labels] + list(DEVICES)
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for row in (r for r in rows if r["model"] == m.preset):
            cells = [row["mesh"], f"{row['params_gb']:.1f}", f"{row['kv_full_gb']:.1f}"]
            cells += [f"{row[f'kv_{lb}_gb']:.1f}" for lb in labels]
            cells += [verdict(row, cap) for cap in DEVICES.values()]
            print("| " + " | ".join(cells) + " |")
        print(f"(parameters in all: {param_bytes(m, {})[0] / GB:.1f} GB)\n")


if __name__ == "__main__":
    main()
