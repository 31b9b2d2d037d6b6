#!/usr/bin/env bash
# GPU device check, run from the checkout on a machine with an NVIDIA GPU (H100/H200), no network,
# with that machine's own python + jax[cuda]. Usage: bench/device_check.sh OUT.json
# PHASES="memory e2e" bench/device_check.sh OUT.json runs only those phases (default: all of
# kernels ragged sweep memory e2e; imports always; "weightcopy" is an extra experiment, ~5 min;
# "quant" runs issue 17's int8/fp8 weights and fp8 KV cache end to end, ~6 min).
# Whole script < 8 minutes (each phase has its own timeout). Each phase merges its results into
# OUT.json under its own key, after every sub-phase, so a timeout keeps what was measured.
#   imports (60 s) -> kernels: Pallas vs reference on random batches + decode/prefill timings next to
#   a device copy (150 s) -> extra decode shapes (60 s) -> tile/warp/stage sweep (90 s)
#   -> step memory: does the compiled step update the KV cache in place (30 s)
#   -> end to end: Llama-2-13B shapes, dummy bf16 weights, HF generate vs jaxllm (200 s).
# If the Pallas kernels fail their check, the end-to-end part runs on the reference attention
# (JAXLLM_ATTENTION_IMPL=reference) so the engine figures still come back, marked as such.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: bench/device_check.sh OUT.json}"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ] && .venv/bin/python -c "import jax" 2>/dev/null; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
export JAXLLM_COMPILE_CACHE="${JAXLLM_COMPILE_CACHE:-/tmp/jaxllm_xla}"
PHASES="${PHASES:-kernels ragged sweep memory e2e}"
want() { [[ " $PHASES " == *" $1 "* ]]; }
status=0
kernels_rc=0
t_start=$SECONDS
phase() { echo; echo "== $1  (t=$((SECONDS - t_start))s)"; }

# ---- imports first: fail in seconds, not minutes --------------------------------------------
phase "imports ($PY)"
if ! timeout 60 "$PY" - <<'PY'
import jax, jax.numpy as jnp, flax, msgspec
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import pallas_kernels
from pallas_kernels import KVCache, AttentionMetadata, write_kv, ragged_paged_attention
import jaxllm.llm, checkpoints.dummy
print("jax", jax.__version__, "flax", flax.__version__, "msgspec", msgspec.__version__,
      "backend", jax.default_backend(), "devices", jax.devices())
assert jax.default_backend() == "gpu", "no GPU backend: install jax[cuda] on this machine"
try:
    import torch, transformers, triton
    print("torch", torch.__version__, "transformers", transformers.__version__, "triton", triton.__version__)
except ImportError as e:
    print("optional:", e)
PY
then
  echo "imports FAILED"; exit 2
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.memory,driver_version --format=csv,noheader 2>/dev/null || true

# ---- kernels: compiled Pallas vs reference, then timings next to a device copy ---------------
if want kernels; then
  phase "kernels: check + bench (Llama-style decode B64 x ctx2048, 32/8 heads, d128; 2048-token prefill)"
  timeout 150 "$PY" bench/kernels.py --impls reference,pallas --cases 2 --check --json "$OUT" --json-key kernels
  kernels_rc=$?
  [ $kernels_rc -eq 0 ] || { echo "kernels FAILED (rc=$kernels_rc)"; status=1; }
fi

if want ragged; then
  phase "kernels: ragged decode (contexts U[64, 2048]) and SmolLM2 shapes"
  timeout 30 "$PY" bench/kernels.py --impls reference,pallas --only decode --ragged --check \
    --json "$OUT" --json-key kernels_ragged || status=1
  timeout 30 "$PY" bench/kernels.py --impls reference,pallas --batch 64 --context 1024 --heads 9 --kv-heads 3 \
    --head-dim 64 --prefill-tokens 1024 --check --json "$OUT" --json-key kernels_smollm2 || status=1
fi

if want sweep; then
  phase "kernels: sweep"
  timeout 90 "$PY" bench/kernels.py --impls pallas --sweep --skip-bench --iters 10 --json "$OUT" --json-key sweep || status=1
fi

e2e_env=()
e2e_args=()
if want memory; then
  phase "step memory: is the KV cache updated in place? (1 GiB K + 1 GiB V, 4 layers)"
  timeout 60 "$PY" bench/step_memory.py --probes --hlo-dir "$(dirname "$OUT")/hlo" --json "$OUT" --json-key step_memory
  mem_rc=$?
  if [ $mem_rc -eq 1 ]; then  # leave room for the copy so the e2e figures still come back
    echo "the step copies the cache"; status=1; e2e_args=(--gpu-memory-utilization 0.5)
    timeout 60 "$PY" bench/step_memory.py --impl reference --json "$OUT" --json-key step_memory_reference
  fi
fi

# ---- end to end --------------------------------------------------------------------------------
if want e2e; then
  if [ $kernels_rc -ne 0 ]; then e2e_env=(JAXLLM_ATTENTION_IMPL=reference); echo "(e2e on the reference attention)"; fi
  phase "end to end (llama-2-13b shapes, dummy bf16) ${e2e_env[*]} ${e2e_args[*]}"
  # JAX's default allocator here (one preallocated pool, as users run it): with
  # XLA_PYTHON_CLIENT_PREALLOCATE=false the pool grows in doubling regions and refused the 13B
  # cache its statistics allowed (GPU run 3, 2026-11-26). HF runs first and frees the card.
  if ! timeout 200 env -u XLA_PYTHON_CLIENT_PREALLOCATE "${e2e_env[@]}" "$PY" bench/device_e2e.py \
      --json "$OUT" --json-key e2e "${e2e_args[@]}"; then
    echo "e2e FAILED: once more without HF and with gpu_memory_utilization 0.6"; status=1
    timeout 120 env -u XLA_PYTHON_CLIENT_PREALLOCATE "${e2e_env[@]}" "$PY" bench/device_e2e.py \
      --json "$OUT" --json-key e2e_retry --skip-hf --gpu-memory-utilization 0.6 || echo "e2e retry FAILED (rc=$?)"
  fi
fi

# ---- optional (PHASES="weightcopy"): the layer loop's weight reads ----------------------------
# The scan over stacked weights copies each weight out of its stacked array before the gemm (GPU
# HLO, 2026-11-26: batch-1 decode at 27% of the weight-read roofline). The default on GPU is now
# per-layer weights with the loop unrolled (JAXLLM_LAYER_LOOP=unroll, no copy). A/B on batch-1 decode:
#   0 unroll (default); 1 scan; 2 scan + XLA's dynamic-slice fusion; 3 the same with cuBLAS gemms;
#   4 scan + the Pallas stacked_matmul (JAXLLM_STACKED_MATMUL=1) reading w[layer] in place.
if want weightcopy; then
  phase "stacked_matmul vs XLA dot on a dynamically indexed layer (13B projections)"
  timeout 90 "$PY" bench/stacked_matmul.py --json "$OUT" --json-key stacked_matmul || status=1
  variants=("unroll|" "scan|" "scan|--xla_gpu_enable_dynamic_slice_fusion=true"
            "scan|--xla_gpu_enable_dynamic_slice_fusion=true --xla_gpu_enable_triton_gemm=false" "scan|STACKED")
  for i in "${!variants[@]}"; do
    loop="${variants[$i]%%|*}"; flags="${variants[$i]#*|}"; extra=(JAXLLM_LAYER_LOOP="$loop")
    if [ "$flags" = STACKED ]; then flags=""; extra+=(JAXLLM_STACKED_MATMUL=1); fi
    phase "batch-1 decode, variant $i: ${extra[*]} XLA_FLAGS='$flags'"
    timeout 150 env -u XLA_PYTHON_CLIENT_PREALLOCATE XLA_FLAGS="${XLA_FLAGS:-} $flags" "${extra[@]}" "$PY" \
      bench/device_e2e.py --decode-only --json "$OUT" --json-key "decode1_variant$i" || status=1
  done
  for loop in unroll scan; do
    timeout 90 "$PY" bench/step_memory.py --layer-loop "$loop" --hlo-dir "$(dirname "$OUT")/hlo_$loop" \
      --json "$OUT" --json-key "step_memory_$loop" || status=1
  done
fi

# ---- optional (PHASES="quant"): issue 17 on the GPU, ~6 min ------------------------------------
# Llama-2-13B-shaped dummy: batch-1 decode and the 64-request workload with int8 and fp8 weights
# (bf16 is the e2e phase's row: run PHASES="e2e quant" for one run), then fp8 KV's blocks (maximum
# concurrency) against the e2e row's. Target: batch-1 decode >= 1.6x bf16's with int8/fp8 weights.
if want quant; then
  for q in int8 fp8; do
    phase "end to end, --quantization $q (no HF)"
    timeout 150 env -u XLA_PYTHON_CLIENT_PREALLOCATE "$PY" bench/device_e2e.py --skip-hf --quantization "$q" \
      --json "$OUT" --json-key "e2e_$q" || status=1
  done
  phase "end to end, --kv-cache-dtype fp8 (no HF)"
  timeout 150 env -u XLA_PYTHON_CLIENT_PREALLOCATE "$PY" bench/device_e2e.py --skip-hf --kv-cache-dtype fp8 \
    --json "$OUT" --json-key e2e_kv_fp8 || status=1
fi

phase "done"
exit $status
