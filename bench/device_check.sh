#!/usr/bin/env bash
# GPU device check: every pending GPU acceptance point (issues 12, 15, 17) in one prepared script,
# run from the checkout on a machine with an NVIDIA GPU (H100/H200), no network, with that
# machine's own python + jax[cuda]. Usage:
#   [PHASES="..."] [BUDGET_S=540] bench/device_check.sh OUT.json
# Phases run in this order (by acceptance value), each only when PHASES names it (default: all but
# weightcopy; "quant" names qmatmul int8 fp8 int4 kvfp8 quanthlo) and only when the time left of BUDGET_S covers
# its timeout; else it logs "skipped: budget" and stays in the to-do file ($DEVICE_CHECK_TODO,
# default /tmp/jaxllm_device_check.todo). PHASES=rest runs that file's phases: the second call on
# the same, still warm machine (its compile cache in /tmp/jaxllm_xla is warm too).
# Timeouts are sized from the 2026-11-26 H200 logs (bench/results/2026-11-26-h200-run*.log): imports
# 10-15 s; HF model build 7-8 s, HF batch 1 23.6 tok/s, static batch 8 28.6 s for 16 requests;
# jaxllm engine start 28-35 s then (load 9-17 s + 8 buckets compiled in 17-19 s with the layer scan),
# allowed 60 s here because the GPU now unrolls the 40 layers (on CPU unrolling tripled the compile);
# 64 requests 8.4 s at 1,188 tok/s; batch-1 decode 3 s; step memory 21 s; kernels 28 s; ragged 11 s;
# sweep 20 s.
#   phase      timeout  what (expected on the H200)
#   imports      60 s   jax/flax/msgspec/Pallas imports, GPU backend assert (10-15 s)
#   e2e         300 s   issue 12: HF generate batch 1 (2 requests, ~17 s; 35 s on 2026-12-04) and static
#                       batch 8 (16 requests, ~29 s; 50 s), copy/matmul, then jaxllm: the 64-request workload
#                       and batch-1 decode vs the weight-read roofline, (with "profile") that workload twice
#                       more under jax.profiler (first 12 steps, 20 steady decode steps; ~30 s), summarised
#                       (bench/profile_report.py: device time by category, host idle, top ops) into
#                       e2e.profile_mixed / e2e.profile_decode, and (with "article") the article-sized run on
#                       the same engine (max_num_seqs 256, bench/article.py): 512 chat-like requests,
#                       158,357 output tokens = ~53 s at 3,000 tok/s. ~140 s + the article's ~60 s; the
#                       article stops 15 s before the timeout whatever it has done (--article-stop-by)
#                       With "article" the engine has max_num_seqs 256 and max_model_len 2048 (the 64
#                       requests still run at most 64 at once); without it, 64 and 1024 as on 2026-11-26
#   e2e_retry   200 s   only if e2e left no batch-1 figure: no HF, gpu_memory_utilization 0.6
#   article     180 s   only if neither e2e run stored the article run: --article-only, no HF
#   sampler  60+150 s   bench/sampler_branches.py (the sampling program alone, cond vs select, S 1/64/256, V 32k/128k,
#                       ~20 s), then e2e's jaxllm rows (no HF) with JAXLLM_SAMPLER_BRANCHES=cond: the branching
#                       sampler (an XLA conditional blocks the host on a GPU) against the default branchless one in e2e
#   profile     150 s   only if e2e did not store the profiles: its own engine (64 sequences, max_model_len
#                       1024), no HF: the 64-request run, batch-1 decode and the two profiled runs
#   attn13b 60+45+45 s the Pallas attention at the 13B shapes (40/40 heads, d128), ragged contexts: decode
#                       64 seqs U[64,768] (vs the reference, --check), 256 seqs U[64,1024], and the article's
#                       mixed step (255 decodes + a 160-token chunk) with the decodes split out vs in q tiles
#                       (pallas_tiles, the path before 2026-12-05); each row also as pallas_mha16 (the MHA decode
#                       kernel, 16 kv heads per program, JAXLLM_DECODE_MHA_GROUP=16): the kernel A/B at the
#                       13B's batches (~35-40 s: one more kernel compile per row); e2e's warm-up now times the
#                       variants itself and records its choice (e2e JSON "decode_attention")
#   qmatmul      90 s   bench/quant_matmul.py: the Pallas int8/fp8 matmul (the GPU default for steps of <= 64
#                       tokens since 2026-12-05) vs XLA's dot, 13B projections, M 1/16/64 (~40 compiles, ~40 s)
#   int8, fp8   120 s   issue 17: e2e without HF, --quantization int8 / fp8 (~90 s: start + runs; the Pallas
#                       matmul on; 2026-12-04's rows are XLA's dot: JAXLLM_QUANT_MATMUL=xla gives those again)
#   int4        120 s   4-bit weights: e2e without HF, --quantization int4 (dummy weights rounded to int4
#                       at load, groups of 128; sized like int8, one more quantize pass at load). After
#                       lora, so that issue 15's figure keeps its place in a first call
#   lora        200 s   issue 15: bench/lora.py on the 13B shape, dummy bf16, 4 rank-16 adapters, batch
#                       16: decode step with 0/1/4 adapters vs a plain engine (~170 s: two engine starts)
#   kvfp8        90 s   issue 17: --kv-cache-dtype fp8 without the warm-up: its KV block count (maximum
#                       concurrency, vs e2e's) and a batch-1 decode (~60 s)
#   quanthlo     60 s   issue 17: bench/quant_hlo.py on the GPU (is the int8 convert fused into the dot?)
#   memory       60 s   does the compiled step update the KV cache in place (21 s)
#   kernels      90 s   Pallas vs reference on random batches + timings next to a device copy (28 s)
#   ragged    30+30 s   ragged decode and SmolLM2 shapes (11 s)
#   sweep        60 s   tile/warp/stage sweep (20 s)
#   spec        120 s   n-gram speculative decoding (lowest priority): bench/spec_decode.py on the 13B
#                       shape, dummy bf16, K=4, vLLM's prompt_lookup 5..5, batch 1 and 8, workloads
#                       repeat and chat, plain vs spec on one runner (tok/s, steps, drafts, mean
#                       accepted, same output; rc 1 if outputs differ or anything compiles after
#                       warm-up). Sized like int8: one engine start (~35 s: 10 buckets) + 8 runs of
#                       96 tokens. Random weights: the prompts are random ids (no tokenizer), so
#                       acceptance measures how soon the random model's greedy output loops (the
#                       tiny dummy llama on CPU loops at once: mean accepted 4.7-5.0 of K+1 = 5), not
#                       prompt lookup on real text; what it gives is a draft step's cost vs a decode
#                       step's on the GPU at near-full acceptance (steps, tok/s), an upper bound
#   moe         110 s   mixture of experts: bench/moe.py on a 2-layer Mixtral-8x7B-shaped dummy (bf16, 5.6 GB of
#                       experts: the full 93 GB model fits an H200 only without HF), batch 1/16/64 decode steps:
#                       the grouped ragged_dot experts vs the same MoE computed densely vs a dense model of
#                       the same active parameters; tok/s and the active-weight-read roofline fraction
#                       (9 compiles + 3 dummy inits, ~60 s expected; lowest priority, after spec)
#   weightcopy ~900 s   (only when named) the layer loop's weight reads: five batch-1 decode variants
#                       (WC_VARIANTS="1 2 4": only those, 110 s each; variant 0 = e2e's batch-1 row)
# lora sits before int4/kvfp8/quanthlo: with two calls in 15 minutes of device time it is the only way
# issue 15 gets a GPU figure (kvfp8 + quanthlo fit a second call's tail; lora's 200 s does not).
# Each phase merges its results into OUT.json under its own key after every sub-step, so a timeout
# keeps what was measured; OUT.json's "device_check" key records each phase's timeout, wall time
# and exit status, and the phases skipped. HLO dumps come back as one hlo.tgz beside OUT.json.
# DEVICE_CHECK_SMOKE=1: the same control flow on CPU with tiny shapes (--smoke), no GPU assert
# (tests/bench/test_device_check.py); the kernel phases and weightcopy are skipped there.
#
# The device machine lacks msgspec (and its flax may differ): carry wheels. Once, in the repo root
# of the machine that calls the device (".whl/" is in .gitignore):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl msgspec==0.23.0 flax==0.12.12
# then in the run (carry [".whl"]), before this script:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site || exit
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
export DEVICE_CHECK_SMOKE="${DEVICE_CHECK_SMOKE:-0}"
SMOKE=$DEVICE_CHECK_SMOKE
BUDGET_S="${BUDGET_S:-540}"
TODO_FILE="${DEVICE_CHECK_TODO:-/tmp/jaxllm_device_check.todo}"
ORDER="e2e article profile attn13b sampler qmatmul int8 fp8 lora int4 kvfp8 quanthlo memory kernels ragged sweep spec moe weightcopy"
PHASES="${PHASES:-e2e article profile attn13b sampler qmatmul int8 fp8 lora int4 kvfp8 quanthlo memory kernels ragged sweep spec moe}"
if [ "$PHASES" = rest ]; then
  [ -f "$TODO_FILE" ] || { echo "PHASES=rest: no $TODO_FILE (a fresh machine?): name the phases"; exit 2; }
  PHASES="$(cat "$TODO_FILE")"
  echo "PHASES=rest: the phases the last run left undone: '${PHASES}'"
fi
words=""; for p in $PHASES; do [ "$p" = quant ] && p="qmatmul int8 fp8 int4 kvfp8 quanthlo"; words+=" $p"; done
PHASES="$words "
todo=()
for p in $ORDER; do [[ "$PHASES" == *" $p "* ]] && todo+=("$p"); done
want() { [[ " ${todo[*]:-} " == *" $1 "* ]]; }
status=0
t_start=$SECONDS
left() { echo $((BUDGET_S - (SECONDS - t_start))); }
phase() { echo; echo "== $1  (t=$((SECONDS - t_start))s, $(left)s of ${BUDGET_S}s left)"; }
save_todo() { echo "${todo[*]:-}" >"$TODO_FILE"; }
done_phase() { local keep=() p; for p in "${todo[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done; todo=("${keep[@]}"); save_todo; }
json_has() { "$PY" -c 'import json, sys
d = json.load(open(sys.argv[1]))
for k in sys.argv[2:]:
    d = d.get(k) if isinstance(d, dict) else None
sys.exit(0 if d else 1)' "$OUT" "$@" 2>/dev/null; }  # present and not 0/empty
record() {  # record NAME TIMEOUT WALL RC|skipped: OUT.json's "device_check" key
  "$PY" - "$OUT" "$@" "$BUDGET_S" "$SMOKE" <<'PY'
import json, os, sys
path, name, timeout, wall, rc, budget, smoke = sys.argv[1:]
doc = json.load(open(path)) if os.path.exists(path) else {}
os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
dc = doc.setdefault("device_check", {"budget_s": int(budget), "smoke": smoke == "1", "phases": {}, "skipped": []})
if rc == "skipped":
    dc["skipped"].append(name)
else:
    dc["phases"][name] = {"timeout_s": int(timeout), "wall_s": int(wall), "rc": int(rc)}
json.dump(doc, open(path, "w"), indent=2)
PY
}
# finish NAME RC: a failure (not 0, not 99 = skipped) marks the run failed; a phase that ran leaves the to-do
finish() { [ "$2" -ne 0 ] && [ "$2" -ne 99 ] && status=1; [ "$2" -ne 99 ] && done_phase "$1"; return 0; }
# run NAME TIMEOUT CMD...: runs CMD under `timeout` when the budget covers TIMEOUT, else logs
# "skipped: budget" and returns 99 (the phase stays in the to-do file); records either way.
run() {
  local name=$1 t=$2 l; shift 2
  l=$(left)
  if [ "$t" -gt "$l" ]; then
    echo; echo "== $name: skipped: budget (its timeout ${t}s > ${l}s left)"; record "$name" "$t" 0 skipped; return 99
  fi
  phase "$name (timeout ${t}s)"
  local t0=$SECONDS rc
  timeout "$t" "$@"; rc=$?
  [ $rc -eq 124 ] && echo "$name: TIMED OUT after ${t}s"
  record "$name" "$t" $((SECONDS - t0)) $rc
  return $rc
}
smoke_args=(); [ "$SMOKE" = 1 ] && smoke_args=(--smoke)
HLO="${DEVICE_CHECK_HLO:-/tmp/jaxllm_device_check_hlo}"  # HLO dumps: one hlo.tgz beside OUT at the end
rm -rf "$HLO"
PROF="${DEVICE_CHECK_PROFILE:-/tmp/jaxllm_device_check_profile}"  # traces (summaries go to OUT.json; archives beside it)
rm -rf "$PROF"
save_todo
echo "device_check: phases '${todo[*]:-}', budget ${BUDGET_S}s, smoke=$SMOKE, python $PY"

# ---- imports first: fail in seconds, not minutes --------------------------------------------
phase "imports ($PY)"
if ! timeout 60 "$PY" - <<'PY'
import os
import jax, jax.numpy as jnp, flax, msgspec
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import pallas_kernels
from pallas_kernels import KVCache, AttentionMetadata, write_kv, ragged_paged_attention
import jaxllm.llm, checkpoints.dummy
print("jax", jax.__version__, "flax", flax.__version__, "msgspec", msgspec.__version__,
      "backend", jax.default_backend(), "devices", jax.devices())
if os.environ.get("DEVICE_CHECK_SMOKE") != "1":
    assert jax.default_backend() == "gpu", "no GPU backend: install jax[cuda] on this machine"
    try:  # the HF side's versions (smoke: left out, 3-4 s of imports that print only; CPU has no triton)
        import torch, transformers, triton
        print("torch", torch.__version__, "transformers", transformers.__version__, "triton", triton.__version__)
    except ImportError as e:
        print("optional:", e)
PY
then
  echo "imports FAILED"; record imports 60 $((SECONDS - t_start)) 2; exit 2
fi
record imports 60 $((SECONDS - t_start)) 0
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.memory,driver_version --format=csv,noheader 2>/dev/null || true

# ---- issue 12: end to end on the Llama-2-13B shape (dummy bf16), HF on the same card -------------
# JAX's default allocator here (one preallocated pool, as users run it): with
# XLA_PYTHON_CLIENT_PREALLOCATE=false the pool grows in doubling regions and refused the 13B
# cache its statistics allowed (GPU run 3, 2026-11-26). HF runs first and frees the card.
E2E=(env -u XLA_PYTHON_CLIENT_PREALLOCATE "$PY" bench/device_e2e.py "${smoke_args[@]}")
article_args=()
want article && article_args=(--article-requests 512 --max-num-seqs 256 --max-model-len 2048)
profile_args=()
want profile && profile_args=(--profile "$PROF")
has_article() {  # an article run that made tokens (one cut off at once by its stop-by time does not count)
  json_has e2e article output_tokens || json_has e2e_retry article output_tokens || json_has article article output_tokens; }
stop_by() { echo --article-stop-by $(($(date +%s) + $1 - 15)); }  # the article run ends 15 s before the kill
if want e2e; then
  run e2e 300 "${E2E[@]}" --hf-batch1-requests 2 "${profile_args[@]}" "${article_args[@]}" $(stop_by 300) \
    --json "$OUT" --json-key e2e
  rc=$?; finish e2e $rc
  if [ $rc -ne 99 ] && ! json_has e2e roofline; then
    echo "e2e left no batch-1 figure: once more without HF and with gpu_memory_utilization 0.6"
    run e2e_retry 200 "${E2E[@]}" --skip-hf --gpu-memory-utilization 0.6 "${article_args[@]}" $(stop_by 200) \
      --json "$OUT" --json-key e2e_retry
  fi
  has_article && done_phase article
  json_has e2e profile_decode && done_phase profile
fi
if want article; then
  run article 180 "${E2E[@]}" --article-only --max-num-seqs 256 --max-model-len 2048 $(stop_by 180) \
    --json "$OUT" --json-key article
  finish article $?
fi
# the sampler's branches A/B: since 2026-12-04 a GPU samples without lax.cond (each XLA conditional
# blocks the host until the device reaches it); this runs e2e's jaxllm part with the old branching
# sampler (JAXLLM_SAMPLER_BRANCHES=cond): its 64-request and batch-1 rows beside e2e's (or profile's)
if want sampler; then
  sb_args=(); [ "$SMOKE" = 1 ] && sb_args=(--rows 1 8 --vocab 512 --iters 3)
  run sampler_bench 60 "$PY" bench/sampler_branches.py "${sb_args[@]}" --json "$OUT" --json-key sampler_branches
  rc=$?; [ $rc -ne 0 ] && [ $rc -ne 99 ] && status=1
  run sampler 150 env JAXLLM_SAMPLER_BRANCHES=cond "${E2E[@]}" --skip-hf --json "$OUT" --json-key e2e_sampler_cond
  finish sampler $?
fi
if want profile; then  # alone (e2e did not run or left no profile): its own engine, the 64-request config
  run profile 150 "${E2E[@]}" --skip-hf --profile "$PROF" --json "$OUT" --json-key profile
  finish profile $?
fi

gpu_only() { if [ "$SMOKE" = 1 ]; then echo; echo "== $1: skipped: smoke (GPU only)"; done_phase "$1"; return 1; fi; }
# ---- issue 12: the decode attention kernel at the e2e model's shapes (40 q = 40 kv heads, d128) ------
# the 64-request run's decode steps ran ~1.6x their weights+KV floor and the article's ~2.2x (the
# excess grows with the KV read); the kernels phase's 89% is for 32/8 heads. Two ragged decode batches:
# the 64-request run's (64 seqs, contexts U[64, 768]) and the article's (256 seqs, U[64, 1024]).
if want attn13b && gpu_only attn13b; then
  run attn13b 60 "$PY" bench/attention_kernels.py --impls reference,pallas,pallas_mha16 --only decode --ragged --check \
    --batch 64 --context 768 --heads 40 --kv-heads 40 --json "$OUT" --json-key kernels_13b_b64
  rc=$?
  if [ $rc -ne 99 ]; then
    run attn13b_256 45 "$PY" bench/attention_kernels.py --impls pallas,pallas_mha16 --only decode --ragged \
      --batch 256 --context 1024 --heads 40 --kv-heads 40 --json "$OUT" --json-key kernels_13b_b256
    rc2=$?
    # the article's steady step: 255 decodes + a 160-token prompt chunk, decodes split out vs all in q tiles
    # (and split out through the MHA decode kernel, pallas_mha16)
    rc3=99
    if [ $rc2 -ne 99 ]; then
      run attn13b_mixed 45 "$PY" bench/attention_kernels.py --impls pallas,pallas_tiles,pallas_mha16 \
        --only mixed --batch 255 --context 1024 --mixed-prefill 160 --heads 40 --kv-heads 40 --check \
        --json "$OUT" --json-key kernels_13b_mixed
      rc3=$?
    fi
    [ $rc3 -ne 99 ] && finish attn13b $rc && finish attn13b $rc2 && finish attn13b $rc3
  fi
fi
# ---- issue 17: the Pallas int8/fp8 matmul vs XLA's dot, one projection at a time (13B shapes) -----
if want qmatmul && gpu_only qmatmul; then
  run qmatmul 90 "$PY" bench/quant_matmul.py --json "$OUT" --json-key quant_matmul
  finish qmatmul $?
fi
# ---- issue 17: int8/fp8 weights (target: batch-1 decode >= 1.6x bf16's e2e row) --------------------
for q in int8 fp8; do
  if want "$q"; then
    run "$q" 120 "${E2E[@]}" --skip-hf --quantization "$q" --json "$OUT" --json-key "e2e_$q"
    finish "$q" $?
  fi
done
# ---- issue 15: multi-LoRA decode step on the 13B shape --------------------------------------------
if want lora; then
  lora_args=(--model llama-2-13b --load-format dummy --dtype bfloat16 --kv-cache-memory-bytes $((2 << 30)))
  [ "$SMOKE" = 1 ] && lora_args=(--model tiny-llama --load-format dummy --batch 4 --input-len 8 --output-len 4
                                 --repeats 1 --kv-cache-memory-bytes $((1 << 20)))
  run lora 200 "$PY" bench/lora.py "${lora_args[@]}" --plain-baseline --json "$OUT" --json-key lora
  finish lora $?
fi

# ---- 4-bit weights (--quantization int4 at load: RTN, groups of 128) on the e2e workload -----------
if want int4; then
  run int4 120 "${E2E[@]}" --skip-hf --quantization int4 --json "$OUT" --json-key e2e_int4
  finish int4 $?
fi

# ---- issue 17: fp8 KV's maximum concurrency (its block count; the warm-up is skipped) and a batch-1 decode
if want kvfp8; then
  run kvfp8 90 "${E2E[@]}" --skip-hf --kv-cache-dtype fp8 --decode-only --no-warmup --json "$OUT" --json-key e2e_kv_fp8
  finish kvfp8 $?
fi
if want quanthlo; then  # where the s8 -> float converts sit in the GPU's optimized HLO (log only)
  run quanthlo 60 "$PY" bench/quant_hlo.py
  finish quanthlo $?
fi

# ---- step memory: is the KV cache updated in place? (1 GiB K + 1 GiB V, 4 layers) ---------------
if want memory; then
  mem_args=(); [ "$SMOKE" = 1 ] && mem_args=(--cache-mib 4 --hidden 128 --layers 2 --max-num-seqs 4 --max-num-batched-tokens 32)
  run memory 60 "$PY" bench/step_memory.py --probes "${mem_args[@]}" --hlo-dir "$HLO/step" \
    --json "$OUT" --json-key step_memory
  rc=$?; finish memory $rc
  if [ $rc -eq 1 ]; then
    echo "the step copies the cache"
    run memory_reference 60 "$PY" bench/step_memory.py --impl reference "${mem_args[@]}" --json "$OUT" \
      --json-key step_memory_reference
  fi
fi

# ---- kernels: compiled Pallas vs reference, then timings next to a device copy (GPU only) -------
if want kernels && gpu_only kernels; then
  run kernels 90 "$PY" bench/attention_kernels.py --impls reference,pallas --cases 2 --check --json "$OUT" --json-key kernels
  finish kernels $?
fi
if want ragged && gpu_only ragged; then
  run ragged 30 "$PY" bench/attention_kernels.py --impls reference,pallas --only decode --ragged --check \
    --json "$OUT" --json-key kernels_ragged
  rc=$?
  if [ $rc -ne 99 ]; then
    run ragged_smollm2 30 "$PY" bench/attention_kernels.py --impls reference,pallas --batch 64 --context 1024 --heads 9 \
      --kv-heads 3 --head-dim 64 --prefill-tokens 1024 --check --json "$OUT" --json-key kernels_smollm2
    rc2=$?; [ $rc2 -ne 99 ] && finish ragged $rc && finish ragged $rc2
  fi
fi
if want sweep && gpu_only sweep; then
  run sweep 60 "$PY" bench/attention_kernels.py --impls pallas --sweep --skip-bench --iters 10 --json "$OUT" --json-key sweep
  finish sweep $?
fi

# ---- speculative decoding (lowest priority): plain vs n-gram drafts on one runner, 13B shape ------
if want spec; then
  spec_args=(--model llama-2-13b --load-format dummy --dtype bfloat16 --kv-cache-memory-bytes $((2 << 30)))
  [ "$SMOKE" = 1 ] && spec_args=(--smoke)
  run spec 120 "$PY" bench/spec_decode.py "${spec_args[@]}" --batch 1 8 --workloads repeat chat \
    --json "$OUT" --json-key spec_decode
  finish spec $?
fi

# ---- mixture of experts: grouped (ragged_dot) vs dense-all-experts vs dense-active, 2-layer Mixtral shape
if want moe; then
  moe_args=(--preset mixtral-8x7b --layers 2 --dtype bfloat16 --batches 1 16 64 --iters 10 --rounds 2)
  [ "$SMOKE" = 1 ] && moe_args=(--preset tiny-mixtral --batches 1 --iters 2 --rounds 1)
  moe_models=(moe-grouped moe-dense dense-active moe-int8)  # moe-int8: int8 experts on the default (grouped) path
  [ "$SMOKE" = 1 ] && moe_models=(moe-grouped moe-dense dense-active)  # the smoke test keeps its time; int8 row: bench/RESULTS.md
  run moe 110 "$PY" bench/moe.py "${moe_args[@]}" --models "${moe_models[@]}" --json "$OUT" --json-key moe
  finish moe $?
fi

# ---- weightcopy (only when named): the layer loop's weight reads --------------------------------
# The default on GPU is per-layer weights with the loop unrolled (JAXLLM_LAYER_LOOP=unroll, no
# copy); the scan copied each weight out of its stacked array before the gemm (batch-1 decode at 27%
# of the weight-read roofline, 2026-11-26). A/B on batch-1 decode: 0 unroll (default); 1 scan;
# 2 scan + XLA's dynamic-slice fusion; 3 the same with cuBLAS gemms; 4 scan + the Pallas
# stacked_matmul (JAXLLM_STACKED_MATMUL=1) reading w[layer] in place.
# WC_VARIANTS="1 2 4" runs only those decode variants (no stacked_matmul bench, no step-memory runs):
# variant 0's figure is e2e's batch-1 row when e2e ran in the same call.
if want weightcopy && gpu_only weightcopy; then
  wc_ok=1 wc_all=1; [ -n "${WC_VARIANTS:-}" ] && wc_all=0
  if [ $wc_all = 1 ]; then
    run stacked_matmul 90 "$PY" bench/stacked_matmul.py --json "$OUT" --json-key stacked_matmul
    rc=$?; [ $rc -eq 99 ] && wc_ok=0; [ $rc -ne 0 ] && [ $rc -ne 99 ] && status=1
  fi
  variants=("unroll|" "scan|" "scan|--xla_gpu_enable_dynamic_slice_fusion=true"
            "scan|--xla_gpu_enable_dynamic_slice_fusion=true --xla_gpu_enable_triton_gemm=false" "scan|STACKED")
  for i in ${WC_VARIANTS:-${!variants[@]}}; do
    loop="${variants[$i]%%|*}"; flags="${variants[$i]#*|}"; extra=(JAXLLM_LAYER_LOOP="$loop")
    if [ "$flags" = STACKED ]; then flags=""; extra+=(JAXLLM_STACKED_MATMUL=1); fi
    xf="${XLA_FLAGS:-} $flags"; xf="${xf# }"; xf="${xf% }"  # " " alone: XLA reads it as a flags file and aborts
    if [ -n "$xf" ]; then extra+=(XLA_FLAGS="$xf"); else extra=(-u XLA_FLAGS "${extra[@]}"); fi
    run "decode1_variant$i" 110 env -u XLA_PYTHON_CLIENT_PREALLOCATE "${extra[@]}" \
      "$PY" bench/device_e2e.py --decode-only --json "$OUT" --json-key "decode1_variant$i"
    rc=$?; [ $rc -eq 99 ] && wc_ok=0; [ $rc -ne 0 ] && [ $rc -ne 99 ] && status=1
  done
  for loop in unroll scan; do
    [ $wc_all = 1 ] || break
    run "step_memory_$loop" 90 "$PY" bench/step_memory.py --layer-loop "$loop" --hlo-dir "$HLO/step_$loop" \
      --json "$OUT" --json-key "step_memory_$loop"
    rc=$?; [ $rc -eq 99 ] && wc_ok=0; [ $rc -ne 0 ] && [ $rc -ne 99 ] && status=1
  done
  [ $wc_ok = 1 ] && done_phase weightcopy
fi

phase "done"
if [ -d "$HLO" ]; then tar czf "$(dirname "$OUT")/hlo.tgz" -C "$HLO" . && echo "HLO dumps: $(dirname "$OUT")/hlo.tgz"; fi
# the profiles' traces and the profiled buckets' optimized HLO, one archive per profile (the device tool
# brings back files of at most 16 MiB: a larger one is left behind with a line saying so)
for name in decode mixed; do
  d="$PROF/$name"; [ -d "$d" ] || continue
  tgz="$(dirname "$OUT")/profile_$name.tgz"
  tar czf "$tgz" -C "$d" . 2>/dev/null || continue
  if [ "$(stat -c %s "$tgz")" -gt $((15 << 20)) ]; then
    rm -f "$tgz"; tar czf "$tgz" -C "$d" --exclude='*.xplane.pb' --exclude='perfetto_trace.json.gz' . 2>/dev/null
  fi
  if [ "$(stat -c %s "$tgz")" -gt $((15 << 20)) ]; then echo "profile $name: archive over 15 MiB, left in $d"; rm -f "$tgz"
  else echo "profile $name: $tgz ($(du -h "$tgz" | cut -f1))"; fi
done
if [ -n "${todo[*]:-}" ]; then
  echo "left undone (skipped: budget): ${todo[*]}  -> next call on this machine: PHASES=rest bench/device_check.sh OUT2.json"
else
  echo "every requested phase ran"
fi
exit $status
