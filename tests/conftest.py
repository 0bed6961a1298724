import atexit
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Compiled programs go to a cache of this test session only (shared with the subprocesses the
# CLI tests start), never to the user's ~/.cache/ep_jax.
if "EP_JAX_COMPILATION_CACHE" not in os.environ:
    os.environ["EP_JAX_COMPILATION_CACHE"] = tempfile.mkdtemp(prefix="ep_jax-test-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["EP_JAX_COMPILATION_CACHE"], ignore_errors=True)
sys.path.insert(0, str(Path(__file__).parent))
# A suite started in the background of a non-interactive shell inherits SIGINT ignored, and so
# would every command it starts; the tests that send a real Ctrl-C need it delivered.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import jax  # noqa: E402

# Parity tolerances (1e-4 vs PyTorch float32) assume true float32 matmuls; on GPUs XLA would
# otherwise use TF32 for float32 dots. No effect on CPU.
jax.config.update("jax_default_matmul_precision", "highest")

import numpy as np
import pytest


def photo(name: str = "astronaut", size: int | None = None) -> np.ndarray:
    """A real photo from scikit-image (offline), optionally downscaled."""
    import skimage.data
    from PIL import Image

    img = getattr(skimage.data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    if size is not None:
        img = np.asarray(Image.fromarray(img).resize((size, size)))
    return img


TINY_CONFIGS = {
    # MHA, penultimate CLIP layer, CLS dropped (LLaVA-1.5 defaults)
    "mha": dict(num_kv_heads=4, vision_feature_layer=-2, strategy="default"),
    # GQA, last CLIP layer, CLS kept, tied embeddings, transformers-5 key layout
    "gqa": dict(num_kv_heads=2, vision_feature_layer=-1, strategy="full", tie=True, layout="v5"),
}


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """name -> (hf_dir, torch_model, hf_processor) of tiny random LLaVA checkpoints."""
    from hf_tiny import build_tiny_llava

    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = build_tiny_llava(tmp_path_factory.mktemp(name), seed=len(cache), **TINY_CONFIGS[name])
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tiny_model(tiny_dirs):
    """name -> ep_jax Model loaded from the HF directory (float32)."""
    import ep_jax

    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = ep_jax.load(tiny_dirs(name)[0])
        return cache[name]

    return get
