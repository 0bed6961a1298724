"""What the benchmarks run on: model shapes, a real photo, a realistic prompt, budgets.

Shared by every `python -m ep_jax.bench` subcommand (see `bench.py`). Models get random
weights (`checkpoint.init_model`): speed does not depend on the values, and no download is
needed. The prompt goes through the real `Processor` (LLaVA-1.5 chat template, CLIP image
preprocessing of a real photo) with a small word-level tokenizer built here, so the text part
has about as many tokens as a LLaMA tokenizer would give (~60).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ep_jax.config import LlavaConfig, TextConfig, VisionConfig
from ep_jax.families.llava import FAMILY as LLAVA
from ep_jax.errors import InputError

# Special tokens of the benchmark tokenizer; the configs below use the same ids.
UNK, BOS, EOS, PAD, IMAGE = 0, 1, 2, 3, 4
_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]

PROMPT = (
    "What is the person in the image wearing and holding, and what can be seen behind her? "
    "Describe the scene in detail."
)
PROMPT_TEMPLATE = "vicuna_v1"
REFERENCE_VISUAL = 576  # the budgets A = 192/128/64 are quoted for LLaVA-1.5's 576 visual tokens
DEFAULT_BUDGETS = (192, 128, 64)
DEFAULT_LAYER = 2  # K: the Entropy Collapse Layer setting of LLaVA-1.5-7B


def _llava(vision: VisionConfig, text: TextConfig) -> LlavaConfig:
    return LlavaConfig(vision=vision, text=text, image_token_id=IMAGE, pad_token_id=PAD,
                       eos_token_id=EOS, bos_token_id=BOS)


# Every decoder has enough layers for A = N/9 at K = 2 (the formula needs L·A >= K·N, i.e.
# L >= 18); 32 layers, as LLaVA-1.5-7B, give the same R/N as the 7B model for every budget.
CONFIGS: dict[str, LlavaConfig] = {
    # Test-sized: 36 visual tokens (84 px / 14), a few ms per prefill.
    "tiny": _llava(
        VisionConfig(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, image_size=84, patch_size=14),
        TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=20, num_heads=4,
                   num_kv_heads=4, head_dim=16, max_position_embeddings=512),
    ),
    # ViT 6x384 at 224/14 (256 visual tokens) + 32 x 512 decoder.
    "small": _llava(
        VisionConfig(hidden_size=384, intermediate_size=1536, num_layers=6, num_heads=6, image_size=224, patch_size=14),
        TextConfig(vocab_size=32064, hidden_size=512, intermediate_size=1408, num_layers=32, num_heads=8,
                   num_kv_heads=8, head_dim=64, max_position_embeddings=2048),
    ),
    # A CPU stand-in for the 7B: ViT-B width at 336/14 (576 visual tokens, as LLaVA-1.5) and a
    # 32-layer LLaMA decoder (same R per budget as the 7B). The decoder width and the tower's
    # depth are what keep the whole `speed` command near 10 minutes on 2 CPU cores; the tower
    # is ~7% of the prefill FLOPs, as in the ViT-B + 16x2048 sketch (LLaVA-1.5-7B: ~4%).
    "1b": _llava(
        VisionConfig(hidden_size=768, intermediate_size=3072, num_layers=6, num_heads=12, image_size=336,
                     patch_size=14),
        TextConfig(vocab_size=32064, hidden_size=1024, intermediate_size=2816, num_layers=32, num_heads=8,
                   num_kv_heads=8, head_dim=128, max_position_embeddings=4096),
    ),
    # LLaVA-1.5-7B: CLIP ViT-L/14-336 (576 tokens) + Vicuna-7B (32 x 4096, MLP 11008).
    "7b": _llava(VisionConfig(), TextConfig()),
}


def get_config(name: str, num_layers: int | None = None) -> LlavaConfig:
    try:
        cfg = CONFIGS[name]
    except KeyError:
        raise InputError(f"unknown bench config {name!r}; choose one of {sorted(CONFIGS)}") from None
    if num_layers is not None:
        cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_layers=num_layers))
    return cfg


def param_count(cfg: LlavaConfig) -> int:
    """Parameters of the model (from abstract shapes: nothing is allocated)."""
    import jax
    import jax.numpy as jnp

    from ep_jax.runtime.model import abstract_model

    _, state = abstract_model(LLAVA, cfg, jnp.float32)
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))


def describe(cfg: LlavaConfig) -> dict[str, Any]:
    v, t = cfg.vision, cfg.text
    return {
        "vision": f"CLIP ViT {v.num_layers}x{v.hidden_size} (MLP {v.intermediate_size}, {v.num_heads} heads) "
                  f"at {v.image_size}/{v.patch_size}, {cfg.vision_layers_used} layers used",
        "decoder": f"LLaMA {t.num_layers}x{t.hidden_size} (MLP {t.intermediate_size}, {t.num_heads} heads "
                   f"x {t.head_dim}, {t.num_kv_heads} kv heads, vocab {t.vocab_size})",
        "visual_tokens": cfg.image_seq_len,
        "params": param_count(cfg),
    }


# ------------------------------------------------------------------------------- budgets
@dataclasses.dataclass(frozen=True)
class Budget:
    """One budget: `A` as asked for N=576, the `A` used for this model's `N`, and `R`."""

    label: str  # the A of the command line (quoted for N=576)
    avg_keep: int  # A for this model's N (a fraction of N: 192/576 = 1/3, ...)
    keep: int  # R, visual tokens kept from layer K on
    effective_avg: float  # A actually achieved after flooring R


def resolve_budgets(values: list[int], cfg: LlavaConfig, layer: int) -> list[Budget]:
    from ep_jax.core.budget import budget, effective_avg

    n, num_layers = cfg.image_seq_len, cfg.text.num_layers
    out = []
    for a in values:
        scaled = int(round(a * n / REFERENCE_VISUAL))
        keep = budget(scaled, num_layers, layer, n)  # clear error if infeasible
        out.append(Budget(str(a), scaled, keep, effective_avg(keep, num_layers, layer, n)))
    return out


def parse_budgets(text: str) -> tuple[bool, list[int]]:
    """"none,192,128,64" -> (include the unpruned run, [192, 128, 64])."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    values = []
    for s in items:
        if s == "none":
            continue
        try:
            values.append(int(s))
        except ValueError:
            raise InputError(f"--budgets item {s!r}: give 'none' or an int A (e.g. none,192,128,64)") from None
    return "none" in items, values


# ------------------------------------------------------------------------------- inputs
def photo() -> np.ndarray:
    """A real photo (scikit-image's astronaut, 512x512 RGB; shipped with the package, offline)."""
    import skimage.data

    return skimage.data.astronaut()


def build_tokenizer():
    """A word-level tokenizer over the prompt's words: one token per word or punctuation mark,
    about what a LLaMA tokenizer gives for plain English, with BOS prepended."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from ep_jax.processing import TEMPLATES

    template = TEMPLATES[PROMPT_TEMPLATE]
    text = template.prefix + template.image_slot + PROMPT + template.suffix
    words = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    vocab = {tok: i for i, tok in enumerate(_SPECIALS)}
    for word, _ in words.pre_tokenize_str(text.replace("<image>", " ")):
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = words
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})


def build_processor(cfg: LlavaConfig):
    from ep_jax.processing import ImageProcessor, Processor

    size = cfg.vision.image_size
    return Processor(build_tokenizer(), ImageProcessor(size=size, crop_size=(size, size)),
                     image_seq_len=cfg.image_seq_len, image_token="<image>")


def encode(processor, batch: int, padding: str = "exact") -> dict[str, np.ndarray]:
    """The benchmark inputs for `batch` copies of (photo, prompt): at their exact length
    ("exact": the measured time is that of the real tokens), or left-padded to the Processor's
    length buckets as `ep_jax.generate` does ("bucket": 576 + ~60 tokens become 640)."""
    from ep_jax.processing import DEFAULT_BUCKETS

    if padding not in ("exact", "bucket"):
        raise InputError(f"padding={padding!r}: use 'exact' or 'bucket'")
    image = photo()
    buckets = DEFAULT_BUCKETS if padding == "bucket" else None
    return processor.encode([PROMPT] * batch, [image] * batch, template=PROMPT_TEMPLATE, bucket_sizes=buckets)


# ------------------------------------------------------------------------------- machine
def machine_info() -> dict[str, Any]:
    import jax
    import jaxlib

    dev = jax.devices()[0]
    cpu_model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def default_dtype() -> str:
    """float32 on CPU (measured faster there for prefill and decode, see benchmarks/README.md),
    bfloat16 on accelerators."""
    import jax

    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


# ------------------------------------------------------------------------------- model
def random_model(cfg: LlavaConfig, dtype: str, seed: int = 0, layout: str = "auto", family=LLAVA, mesh=None):
    """A `checkpoint.Model` with random weights, initialised like `init_model` (normal(0, 0.02),
    norm scales 1, biases 0) but leaf by leaf (numpy on CPU, where `jax.random` is ~10x slower;
    on the device elsewhere), so a 7B model never needs two copies in memory. With a `mesh`
    each leaf is placed on its shards as soon as it is made (`runtime.sharding`)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from ep_jax.runtime.model import DTYPES, abstract_model, from_params

    jdtype = DTYPES[dtype]
    abstract = nnx.to_pure_dict(abstract_model(family, cfg, jdtype)[1])
    rng = np.random.default_rng(seed)
    on_cpu = jax.default_backend() == "cpu"
    key = jax.random.key(seed)

    def fill(path, leaf):
        nonlocal key
        name = str(path[-1].key)
        if name == "scale":
            return jnp.ones(leaf.shape, jdtype)
        if name.endswith("bias"):
            return jnp.zeros(leaf.shape, jdtype)
        if on_cpu:
            return jnp.asarray((0.02 * rng.standard_normal(leaf.shape, dtype=np.float32)).astype(jdtype))
        key, sub = jax.random.split(key)
        return (0.02 * jax.random.normal(sub, leaf.shape, jnp.float32)).astype(jdtype)

    if mesh is None:
        params = jax.tree_util.tree_map_with_path(fill, abstract)
    else:
        from ep_jax.runtime.sharding import param_shardings

        def place(path, leaf, sharding):  # each leaf on its shards as soon as it is made
            return jax.device_put(fill(path, leaf), sharding)

        params = jax.tree_util.tree_map_with_path(place, abstract, param_shardings(abstract, mesh))
    return from_params(family, cfg, params, jdtype, layout=layout, mesh=mesh)
