#!/usr/bin/env bash
# GPU device check, run from the checkout on a machine with an NVIDIA GPU (H100/H200), no network,
# with that machine's own python + jax[cuda]. Usage: bench/device_check.sh OUT.json
# Whole script < 8 minutes. Each part merges its results into OUT.json under its own key.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: bench/device_check.sh OUT.json}"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ] && .venv/bin/python -c "import jax" 2>/dev/null; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
status=0

# ---- imports first: fail in seconds, not minutes --------------------------------------------
echo "== imports ($PY)"
if ! timeout 60 "$PY" - <<'PY'
import jax, jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import pallas_kernels
from pallas_kernels import KVCache, AttentionMetadata, write_kv, ragged_paged_attention
print("jax", jax.__version__, "backend", jax.default_backend(), "devices", jax.devices())
assert jax.default_backend() == "gpu", "no GPU backend: install jax[cuda12] on this machine"
PY
then
  echo "imports FAILED"; exit 2
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv,noheader 2>/dev/null || true

# ---- kernels: Pallas vs reference on random batches, then timings next to a device copy -------
echo "== kernels"
timeout 400 "$PY" bench/kernels.py --impls reference,pallas --cases 3 --check --sweep --json "$OUT" --json-key kernels \
  || { echo "kernels FAILED (rc=$?)"; status=1; }

timeout 300 "$PY" bench/device_e2e.py --json "$OUT" --json-key e2e || { echo "e2e FAILED (rc=$?)"; status=1; }

exit $status
