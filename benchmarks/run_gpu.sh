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
