#!/usr/bin/env bash
# GPU results in one command (LLaVA-1.5-7B shapes, bfloat16, random weights):
#
#     bash benchmarks/run_gpu.sh            # writes benchmarks/gpu-<device>-7b.{json,md,png} and more
#
# Needs a CUDA build of jaxlib of the pinned version, e.g.
#     pip install "jax[cuda12]==$(python -c 'import jax; print(jax.__version__)')"
# Takes ~10 minutes on one H100 (14 GB of weights; ~30 GB of device memory at batch 8).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${1:-benchmarks}

"$PY" - <<'PYEOF'
import jax
if jax.default_backend() == "cpu":
    raise SystemExit(f"run_gpu.sh: JAX sees no accelerator ({jax.devices()}); install a CUDA jaxlib")
print("device:", jax.devices()[0].device_kind, "| jax", jax.__version__)
PYEOF
KIND=$("$PY" -c "import jax, re; print(re.sub('[^a-z0-9]+', '-', jax.devices()[0].device_kind.lower()).strip('-'))")

# 1. The table: unpruned vs A = 192/128/64 x entropy/fastv/random/pool, batch 1, decode at every R.
"$PY" -m ep_jax.bench speed --config 7b --dtype bfloat16 --decode all --out "$OUT" --name "gpu-$KIND-7b"
# 2. MFU at a serving batch (unpruned and A=64 entropy).
"$PY" -m ep_jax.bench speed --config 7b --dtype bfloat16 --batch 8 --budgets none,64 --methods entropy \
    --decode none --no-profile --out "$OUT" --name "gpu-$KIND-7b-batch8"
# 3. Compile time from abstract parameters at two depths.
"$PY" -m ep_jax.bench compile --config 7b --layers 8,32 --dtype bfloat16 --out "$OUT" --name "gpu-$KIND-compile-7b"
echo "wrote $OUT/gpu-$KIND-7b.{json,md,png}, $OUT/gpu-$KIND-7b-batch8.*, $OUT/gpu-$KIND-compile-7b.*"

# 4. Several devices and the attention dispatch (not yet run on a GPU).
#    cuDNN attention against the einsum path (bfloat16, padded prompt + a decode step), then the
#    7b speed table on a mesh of every visible GPU (tensor parallel) and data parallel at batch 32.
"$PY" - <<'PYEOF'
import jax, numpy as np, jax.numpy as jnp
from ep_jax.nn import attention
from ep_jax.nn.layers import attend_causal
rng = np.random.default_rng(0)
q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.bfloat16) for s in ((4, 1024, 32, 128), (4, 1024, 8, 128), (4, 1024, 8, 128)))
valid = np.ones((4, 1024), bool); valid[1, :300] = False
rows = np.arange(1024); mask = (rows[None, None] <= rows[None, :, None]) & valid[:, None]
want = np.asarray(attend_causal(q, k, v, mask), np.float32)
assert attention.choose(q, k, causal=True) == "cudnn", attention.choose(q, k, causal=True)
got = np.asarray(jax.jit(lambda *a: attention.attention(*a, causal=True))(q, k, v, mask), np.float32)
err = float(np.abs(got[valid] - want[valid]).max())
print(f"cudnn vs einsum attention, bfloat16: max abs diff {err:.2e}")
assert err < 3e-2, err
PYEOF
N=$("$PY" -c "import jax; print(jax.device_count())")
if [ "$N" -gt 1 ]; then
    "$PY" -m ep_jax.bench speed --config 7b --dtype bfloat16 --batch 8 --budgets none,64 --methods entropy \
        --decode none --no-profile --mesh "model=$N" --out "$OUT" --name "gpu-$KIND-7b-model$N"
    "$PY" -m ep_jax.bench speed --config 7b --dtype bfloat16 --batch 32 --budgets none,64 --methods entropy \
        --decode none --no-profile --mesh "data=$N" --out "$OUT" --name "gpu-$KIND-7b-data$N"
fi
