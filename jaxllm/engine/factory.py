"""build_engine(config): load weights and tokenizer, size the KV cache, compile every bucket, and
hand a ready LLMEngine back. This is where the host engine meets jax."""
from __future__ import annotations

import hashlib
import os
import sys
import time

import msgspec

from jaxllm.config import EngineConfig
from jaxllm.engine.engine import LLMEngine


def _info(msg: str) -> None:
    print(f"[jaxllm] {msg}", file=sys.stderr, flush=True)


def resolve_dtype(name: str):
    import jax
    import jax.numpy as jnp

    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


def enable_compile_cache(config: EngineConfig) -> str:
    """JAX's persistent compilation cache, one directory per (model, engine config): a restart
    with the same settings loads every bucket's executable instead of compiling it."""
    import jax

    key = hashlib.sha256(msgspec.json.encode(config)).hexdigest()[:16]
    root = os.environ.get("JAXLLM_COMPILE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jaxllm", "xla"))
    path = os.path.join(root, key)
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def build_engine(config: EngineConfig, *, compile_cache: bool = True, warmup: bool = True) -> LLMEngine:
    import jax

    from checkpoints import load_checkpoint, load_tokenizer
    from jaxllm.models.llama import build_model
    from jaxllm.runner.model_runner import ModelRunner, kv_cache_blocks
    from jaxllm.tokenizer import TokenIdsOnlyTokenizer

    config.validate()
    if config.tensor_parallel_size > len(jax.devices()):
        raise ValueError(f"tensor_parallel_size={config.tensor_parallel_size} is invalid: only "
                         f"{len(jax.devices())} {jax.default_backend()} device(s) are present")
    if config.tensor_parallel_size != 1:
        raise ValueError(f"tensor_parallel_size={config.tensor_parallel_size} is not supported yet (only 1)")
    t0 = time.perf_counter()
    if compile_cache:
        enable_compile_cache(config)
    dtype = resolve_dtype(config.dtype)
    load_format = {"safetensors": "hf"}.get(config.load_format, config.load_format)
    ckpt = load_checkpoint(config.model or "smollm2-135m", load_format, dtype=dtype, seed=config.seed)
    mc = ckpt.config
    tokenizer = load_tokenizer(ckpt.tokenizer_source, mc) or TokenIdsOnlyTokenizer(mc.vocab_size, mc.eos_token_ids)
    max_model_len = config.max_model_len or mc.max_position_embeddings
    if max_model_len > mc.max_position_embeddings:
        raise ValueError(f"max_model_len={max_model_len} is invalid: the model supports at most "
                         f"{mc.max_position_embeddings} positions")
    config = msgspec.structs.replace(config, max_model_len=max_model_len)
    model = build_model(mc, ckpt.params, dtype)
    del ckpt
    num_blocks = kv_cache_blocks(mc, config.block_size, dtype, config.kv_cache_memory_bytes,
                                 config.gpu_memory_utilization)
    runner = ModelRunner(model, block_size=config.block_size, num_blocks=num_blocks, max_model_len=max_model_len,
                         max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
                         eos_token_ids=tokenizer.eos_token_ids)
    engine = LLMEngine(config, runner, tokenizer)
    tokens = num_blocks * config.block_size
    _info(f"model {config.model or 'smollm2-135m'} ({mc.architecture}, {mc.num_params / 1e6:.0f}M params, "
          f"{jax.numpy.dtype(dtype).name}) loaded in {time.perf_counter() - t0:.1f}s")
    _info(f"KV cache: {num_blocks} blocks x {config.block_size} tokens = {tokens} tokens; maximum concurrency "
          f"at max_model_len={max_model_len}: {tokens / max_model_len:.1f}x")
    _info(f"buckets: {runner.buckets.describe()}")
    if warmup:
        secs = runner.warmup()
        _info(f"warm-up compiled {len(runner.buckets.all())} buckets in {secs:.1f}s "
              f"(engine ready {time.perf_counter() - t0:.1f}s after start)")
    return engine
