"""The decode attention kernel of an MHA model on a GPU, picked at warm-up by measurement.

`choose_decode_kernel(runner)` runs once, at the start of `ModelRunner.warmup`, before any step bucket
compiles; its choice becomes a static argument of every forward program (executables.py:
`decode_mha_group=` -> the model -> parallel/ops.paged_attention -> ragged_paged_attention ->
decode_rows), so the decode-only steps and the mixed steps' decode rows run the same kernel. Nothing
global is written (no environment variable).

When it tunes: the GPU backend, the Pallas decode kernel (no JAXLLM_ATTENTION_IMPL=reference), an MHA
model (q heads per kv head 1), a generate runner on one process, and JAXLLM_DECODE_MHA_GROUP unset or
"tune" (its default). "off", "auto" or "<G>" are used as given, untimed. Never on CPU / TPU (the
reference attention), for GQA models (the variant is MHA-only), for embed / classify runners
(prefill steps only) or on several processes (each would time alone, and might pick its own
kernel). Tensor parallel: timed on one device at the local head count (kv heads / tp), what each
device's kernel runs under shard_map.

What it times (pallas_kernels/attention/tune.py): the one-head kernel and G in (8, 16, 32) (the
distinct ones over the local heads), on one layer of a synthetic paged cache with the model's kv
heads, head dim, block size and cache dtype (fp8 with per-head scales), block tables of the runner's
width (max_model_len: the kernels plan their split-K from it), contexts drawn uniformly in
[C / 2, C] with C = min(max_model_len, 1024), S = the largest decode bucket whose cache fits in
min(1 GiB, a third of the device's free memory; the KV cache is already allocated), the model's
attention scale and soft cap (no sliding window: the full-attention layers are the costly ones).
The choice, its timings and what was dropped land on the runner (`decode_mha_group`,
`decode_tuning`) and in one start-up line.
"""
from __future__ import annotations

import types

import jax

from pallas_kernels.attention.decode_mha import ENV_VAR, TUNE, env_setting, resolve_mha_group
from pallas_kernels.attention.dispatch import resolve_impl
from pallas_kernels.attention.tune import (candidate_groups, label, synthetic_cache_bytes, synthetic_decode_batch,
                                           tune_decode_group)

CONTEXT = 1024  # tokens of context the synthetic sequences have, at most (and max_model_len)
CACHE_BYTES = 1 << 30  # the synthetic cache's cap (K and V pages of one layer)
FREE_SHARE = 3  # ... and at most this fraction of the device's free memory (fills are on device)


def say(msg: str) -> None:
    """The engine's start-up line (jaxllm/engine/factory.py `_info`: stderr, hidden above INFO)."""
    from jaxllm.engine.factory import _info  # the runner is built by the factory: imported by then

    _info(f"decode attention: {msg}")


def _backend() -> str:
    return jax.default_backend()  # one place (tests fake a GPU here)


def skip_reason(runner) -> str | None:
    """Why this runner does not tune (None: it does). See the module doc."""
    c = runner.model_config
    q_per_kv = c.num_heads // c.num_kv_heads
    if _backend() != "gpu":
        return f"{_backend()} backend"
    impl = resolve_impl(runner.attention_impl, types.SimpleNamespace(decode_only=True))
    if impl != "pallas_decode":
        return f"attention impl {impl}"
    if q_per_kv != 1:
        return f"GQA ({q_per_kv} q heads per kv head): the one-head kernel"
    if runner.pooling:
        return f"task {runner.task}: prefill steps only"
    if jax.process_count() > 1:
        return f"{jax.process_count()} processes: each would pick alone; the one-head kernel"
    return None


def synthetic_seqs(runner, context: int, cache_dtype, free_bytes: int | None) -> int:
    """S for the synthetic batch: the largest decode bucket whose one-layer cache fits the cap, else as many
    sequences as fit (at least 1)."""
    c = runner.model_config
    kvh = c.num_kv_heads // runner.tensor_parallel_size
    cap = CACHE_BYTES if free_bytes is None else min(CACHE_BYTES, free_bytes // FREE_SHARE)
    size = lambda s: synthetic_cache_bytes(s, context, runner.block_size, kvh, c.head_dim, cache_dtype)  # noqa: E731
    fits = [s for s in runner.buckets.decode if size(s) <= cap]
    if fits:
        return max(fits)
    return max(1, cap // max(1, size(1)))


def _free_bytes() -> int | None:
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def choose_decode_kernel(runner, log=say) -> dict:
    """Sets `runner.decode_mha_group` (the G decode steps run; None = the one-head kernel),
    `runner.decode_mha_group_arg` (the forward programs' static argument: None leaves the kernels'
    default, 0 = the one-head kernel, G) and `runner.decode_tuning` (returned): {"mode": "tuned" |
    "env" | "skipped" | "failed", "reason", and when tuned "group", "times_ms", "dropped", "seconds",
    "num_seqs", "context", "num_kv_heads", "cache_dtype"}."""
    c = runner.model_config
    q_per_kv = c.num_heads // c.num_kv_heads
    gpu = _backend() == "gpu"
    setting = env_setting()
    if setting != TUNE:  # the user's choice, as the kernels read it at trace time
        group = resolve_mha_group(None, q_per_kv) if gpu else None
        info = {"mode": "env", "reason": f"{ENV_VAR}={setting}", "group": group}
        if gpu:
            log(f"{label(group)} from {ENV_VAR}={setting} (not tuned)")
        return _set(runner, info, None)
    reason = skip_reason(runner)
    if reason is not None:
        if gpu:
            log(f"not tuned ({reason})")
        return _set(runner, {"mode": "skipped", "reason": reason, "group": None}, None)
    kvh = c.num_kv_heads // runner.tensor_parallel_size
    cache_dtype = runner.kv_cache.dtype
    context = min(runner.max_model_len, CONTEXT)
    info = {"mode": "tuned", "reason": "", "num_kv_heads": kvh, "context": context,
            "cache_dtype": jax.numpy.dtype(cache_dtype).name}
    try:
        num_seqs = synthetic_seqs(runner, context, cache_dtype, _free_bytes())
        info["num_seqs"] = num_seqs
        q, cache, metadata = synthetic_decode_batch(
            num_seqs=num_seqs, num_kv_heads=kvh, head_dim=c.head_dim, block_size=runner.block_size,
            max_blocks=runner.max_blocks_per_seq, context=context, cache_dtype=cache_dtype, q_dtype=runner.state_dtype)
        result = tune_decode_group(q, cache, metadata, candidate_groups(kvh, q_per_kv), log=log,
                                   sm_scale=c.attention_scale, soft_cap=c.attn_logit_softcap)
        del q, cache, metadata
    except Exception as e:  # noqa: BLE001 - e.g. no memory for the synthetic cache: keep the default kernel
        first = (str(e).strip().splitlines() or [""])[0]
        log(f"tuning failed ({type(e).__name__}: {first}); the one-head kernel")
        return _set(runner, {**info, "mode": "failed", "reason": f"{type(e).__name__}: {first}", "group": None}, 0)
    info.update(result.as_dict())
    tp = f", {kvh} heads per device of tp={runner.tensor_parallel_size}" if runner.tensor_parallel_size > 1 else ""
    log(f"{result.describe()} (S={num_seqs}, contexts <= {context}, {info['cache_dtype']} cache{tp})")
    return _set(runner, info, result.group or 0)


def _set(runner, info: dict, arg: int | None) -> dict:
    runner.decode_mha_group = info.get("group")
    runner.decode_mha_group_arg = arg
    runner.decode_tuning = info
    return info
