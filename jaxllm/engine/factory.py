"""build_engine(config): load weights and tokenizer, size the KV cache, compile every bucket, and
hand a ready LLMEngine back. This is where the host engine meets jax."""
from __future__ import annotations

import functools
import logging
import os
import sys
import time

import msgspec

from jaxllm.config import EngineConfig
from jaxllm.engine.engine import LLMEngine


def _info(msg: str) -> None:
    """A start-up line on stderr; hidden when the `jaxllm` logger's level is set above INFO
    (the CLIs' `--log-level warning`). Unconfigured (the Python API), it prints."""
    if logging.getLogger("jaxllm").level <= logging.INFO:
        print(f"[jaxllm] {msg}", file=sys.stderr, flush=True)


def resolve_dtype(name: str):
    import jax
    import jax.numpy as jnp

    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


def enable_compile_cache(root: str | None = None) -> str:
    """JAX's persistent compilation cache in one directory for every model and engine config
    (``root``, else ``$JAXLLM_COMPILE_CACHE``, else ``~/.cache/jaxllm/xla``): a restart, or another
    engine whose compiled programs are the same, loads every bucket's executable instead of
    compiling it.

    The directory is deliberately not keyed by the engine config: JAX keys each entry by the
    program itself (its StableHLO without locations, compile options, device kinds and count,
    backend/jaxlib version, XLA flags), which is exactly "what changes shapes or code". Per field
    of EngineConfig:
    - change the program, so they get other entries by themselves: ``model``, ``load_format`` and
      ``dtype`` (model shapes, parameter dtype), ``hf_overrides`` (through the model config it edits),
      ``kv_cache_dtype`` (the cache's element type),
      ``tensor_parallel_size`` (mesh, shardings), ``enable_expert_parallel`` (the experts' shardings),
      ``max_num_seqs`` and ``max_num_batched_tokens`` (buckets, penalty-table rows),
      ``max_model_len`` (block-table width), ``block_size``, ``kv_cache_memory_bytes`` and
      ``gpu_memory_utilization`` (through the number of KV blocks, a dimension of the cache;
      on CPU the latter does not change it, so it shares entries);
    - never reach the program, so they must not key anything: ``seed`` (the host RNG that draws
      per-request seeds, and the dummy-weight key, a jit *argument*), ``enable_prefix_caching``
      (host block manager only), ``generation_config`` and ``override_generation_config`` (requests'
      default sampling values, and eos ids: host stop checks and per-row sampler inputs). Weights are arguments too, so dummy and real weights of one
      architecture share executables.
    A hash of the whole config in the path (as before) made a new ``--seed`` recompile everything."""
    import jax

    if root is None:
        root = os.environ.get("JAXLLM_COMPILE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jaxllm", "xla"))
    path = os.path.abspath(root)
    os.makedirs(path, exist_ok=True)
    if jax.config.jax_compilation_cache_dir != path:
        from jax.experimental.compilation_cache import compilation_cache

        jax.config.update("jax_compilation_cache_dir", path)
        # JAX opens the cache directory once per process: without a reset, a change of
        # $JAXLLM_COMPILE_CACHE within one process would keep writing into the first directory.
        compilation_cache.reset_cache()
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def allocate_runner(runner_cls, model, num_blocks: int, runner_kw: dict, *, shrink: bool, min_blocks: int = 16):
    """The runner with its KV cache allocated (blocked on, so a refusal surfaces here). The device
    allocator can refuse a size its statistics allowed (a growing pool extends in doubling regions,
    free holes are not contiguous): an auto-sized cache (`shrink`) then retries 10% smaller and
    says so; a configured size (kv_cache_memory_bytes) fails with the numbers."""
    import gc

    import jax

    while True:
        runner = runner_cls(model, num_blocks=num_blocks, **runner_kw)
        try:
            jax.block_until_ready(runner.kv_cache)
            return runner
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            del runner
            gc.collect()
            smaller = int(num_blocks * 0.9)
            if not shrink or smaller < min_blocks:
                raise ValueError(f"KV cache of {num_blocks} blocks does not fit in device memory "
                                 f"({str(e).splitlines()[0][:200]}); lower kv_cache_memory_bytes or "
                                 f"gpu_memory_utilization") from None
            _info(f"KV cache of {num_blocks} blocks refused by the device allocator; retrying with {smaller}")
            num_blocks = smaller


def resolve_task(config: EngineConfig, model_config, checkpoint_path: str | None) -> EngineConfig:
    """``config`` with ``task``, and for embed ``pooling_type`` / ``normalize`` / ``is_matryoshka``
    (+ ``matryoshka_dimensions``), resolved: "auto" is
    "embed" for a checkpoint without an LM head or with a sentence-transformers pooling config
    (checkpoints/pooling_config.py), else "generate"; unset pooling defaults come from that config,
    else LAST and normalize=True (Qwen3-Embedding's and e5-mistral's). Raises ValueError naming
    ``task`` when the checkpoint cannot do the task asked."""
    from checkpoints.pooling_config import read_matryoshka, read_pooling_config

    st = read_pooling_config(checkpoint_path) if checkpoint_path else None
    task = config.task
    num_labels = getattr(model_config, "num_labels", 0)
    if task == "auto":
        task = "classify" if num_labels else "embed" if (st is not None or not model_config.has_lm_head) else "generate"
    if task == "classify" and not num_labels:
        raise ValueError(f"task='classify' is invalid for this checkpoint: the {model_config.architecture} model "
                         f"has no classifier head (config.json architectures names no *ForSequenceClassification)")
    if task == "generate" and num_labels:
        raise ValueError(f"task='generate' is invalid for this checkpoint: it is a {model_config.architecture} "
                         f"sequence classifier (num_labels={num_labels}) without an LM head; use task='classify'")
    if task == "generate" and not model_config.has_lm_head:
        raise ValueError(f"task='generate' is invalid for this checkpoint: it is a {model_config.architecture} "
                         f"base model without an LM head (an embedding model); use task='embed'")
    pooling_type, normalize = config.pooling_type, config.normalize
    is_mat, mat_dims = config.is_matryoshka, config.matryoshka_dimensions
    if task == "classify":  # the head reads the last token's state as it is (as per request: add_requests.py)
        if pooling_type not in (None, "LAST"):
            raise ValueError(f"pooling_type={pooling_type!r} is invalid for task='classify': a classifier's head "
                             f"reads the last token (LAST)")
        if normalize:
            raise ValueError("normalize=True is invalid for task='classify': the head reads the hidden state "
                             "unnormalized (leave it unset or False)")
    if task == "embed":
        pooling_type = pooling_type or (st[0] if st else "LAST")
        normalize = (st[1] if st else True) if normalize is None else normalize
        if is_mat is None:
            is_mat, ckpt_dims = read_matryoshka(checkpoint_path) if checkpoint_path else (False, None)
            mat_dims = ckpt_dims if mat_dims is None else mat_dims
    return msgspec.structs.replace(config, task=task, pooling_type=pooling_type, normalize=normalize,
                                   is_matryoshka=is_mat, matryoshka_dimensions=mat_dims)


def generation_defaults(config: EngineConfig, *, flags: bool = False):
    """The ``GenerationDefaults`` (jaxllm/generation_config.py) of ``config``'s model: its files only, no
    weights. ``flags``: errors name the CLI flags instead of the EngineConfig fields."""
    from checkpoints.loader import resolve
    from jaxllm import generation_config

    fmt, path = resolve(config.model or "smollm2-135m", config.load_format)
    return generation_config.resolve(config.generation_config, config.override_generation_config, fmt, path,
                                     flags=flags)


def tokenizer_source(config: EngineConfig, checkpoint_source: tuple[str, str] | None) -> tuple[str, str] | None:
    """Where the tokenizer comes from (``checkpoints.load_tokenizer``'s source): vLLM's ``--tokenizer``
    (an HF tokenizer directory or a .gguf file) when set, else the checkpoint's own."""
    if config.tokenizer is None:
        return checkpoint_source
    return ("gguf" if config.tokenizer.endswith(".gguf") else "dir", config.tokenizer)


def _reload_weights(load_format: str, dtype, seed: int, shardings, hf_overrides, layout, quantization, *,
                    model: str, built_from: str | None = None):
    """The nnx state of the checkpoint an engine was built from (``model``), loaded and built again (the
    same shardings): ``reload_weights()`` (a level-2 sleep's wake-up reads no checkpoint: runner/sleep.py). A
    ``model`` other than ``built_from`` (``reload_weights(path)``: a trainer's new checkpoint) is read
    with load_format "auto"."""
    from flax import nnx

    from checkpoints import load_checkpoint
    from jaxllm.models.llama import build_model

    if built_from is not None and model != built_from:
        load_format = "auto"
    ckpt = load_checkpoint(model, load_format, dtype=dtype, seed=seed, shardings=shardings, hf_overrides=hf_overrides)
    return nnx.split(build_model(ckpt.config, ckpt.params, dtype, layout=layout, quantization=quantization))[1]


def build_engine(config: EngineConfig, *, compile_cache: bool = True, warmup: bool = True) -> LLMEngine:
    import jax

    from checkpoints import load_checkpoint, load_tokenizer
    from jaxllm.lora.config import LoRAConfig
    from jaxllm.models import prequantized
    from jaxllm.models.llama import build_model
    from jaxllm.runner import device_pool
    from jaxllm.runner.kv_cache_dtype import cache_dtype, check_kv_cache_dtype
    from jaxllm.runner.kv_sizing import kv_cache_blocks
    from jaxllm.runner.model_runner import ModelRunner
    from jaxllm.tokenizer import TokenIdsOnlyTokenizer
    from pallas_kernels import KVCache

    config.validate()
    check_kv_cache_dtype(config.kv_cache_dtype)  # before any weight is loaded
    pool = device_pool.claim(config.gpu_memory_utilization)  # before anything starts the backends
    tp = config.tensor_parallel_size
    mesh = layout_for = None
    if tp > 1:  # tp == 1 keeps the plain single-device path (no mesh, no shard_map)
        from jaxllm.parallel import TPLayout, make_mesh

        mesh = make_mesh(tp)  # ValueError naming tp and the device count when too few devices
        # model_config -> its TPLayout; ValueError naming the numbers when the model does not fit
        layout_for = functools.partial(TPLayout.plan, tp=tp, mesh=mesh, expert_parallel=config.enable_expert_parallel)
    elif config.enable_expert_parallel:  # vLLM's: an expert-parallel group of one device is no EP at all
        _info("enable_expert_parallel: a no-op at tensor_parallel_size=1 (every expert is on the one device)")
    t0 = time.perf_counter()
    if compile_cache:
        enable_compile_cache()
    dtype = resolve_dtype(config.dtype)
    load_format = {"safetensors": "hf"}.get(config.load_format, config.load_format)
    gen = generation_defaults(config)  # a bad generation_config.json fails before any weight is read
    # Dummy and Orbax weights are born in their shards; HF/GGUF numpy goes host → shards in build_model.
    shardings = (lambda mc: layout_for(mc).load_shardings(mc)) if layout_for else None
    ckpt = load_checkpoint(config.model or "smollm2-135m", load_format, dtype=dtype, seed=config.seed,
                           shardings=shardings, hf_overrides=config.hf_overrides)
    mc = ckpt.config
    config = resolve_task(config, mc, ckpt.path if ckpt.format in ("hf", "orbax") else None)
    layout = layout_for(mc) if layout_for else None
    if layout is not None and layout.expert_parallel:
        _info(f"expert parallelism: {mc.num_experts} experts, {mc.num_experts // tp} whole experts per device "
              f"over {tp} devices")
    tokenizer = (load_tokenizer(tokenizer_source(config, ckpt.tokenizer_source), mc, gen.eos_token_ids)
                 or TokenIdsOnlyTokenizer(mc.vocab_size, (*mc.eos_token_ids, *gen.eos_token_ids)))
    max_model_len = config.max_model_len or mc.max_model_len_limit
    if max_model_len > mc.max_model_len_limit:
        raise ValueError(f"max_model_len={max_model_len} is invalid: the model supports at most "
                         f"{mc.max_model_len_limit} positions")
    # the engine's config holds resolved values (what GetModelInfo and the CLIs report)
    config = msgspec.structs.replace(config, max_model_len=max_model_len, dtype=jax.numpy.dtype(dtype).name)
    kept = prequantized.method(ckpt.params)
    if config.quantization and ckpt.format == "gguf" and kept in (None, "int4") and kept != config.quantization:
        how = "in groups (int4)" if config.quantization == "int4" else "per output channel"
        _info(f"quantization={config.quantization!r}: re-quantizing {ckpt.path}'s dequantized GGUF weights {how} "
              f"(bench/RESULTS.md, \"Quantized weights\": the perplexity this costs)")
    quantization_asked = config.quantization
    model = build_model(mc, ckpt.params, dtype, layout=layout, quantization=quantization_asked)
    ckpt_kv_scales = ckpt.kv_scales  # an fp8 checkpoint's KV cache scales, or None
    del ckpt
    config = msgspec.structs.replace(config, quantization=model.quantization)  # a Q8_0 GGUF: "int8"
    runner_kw = dict(block_size=config.block_size, max_model_len=max_model_len, max_num_seqs=config.max_num_seqs,
                     max_num_batched_tokens=config.max_num_batched_tokens, eos_token_ids=tokenizer.eos_token_ids,
                     task=config.task, kv_cache_dtype=config.kv_cache_dtype,
                     lora_config=LoRAConfig.from_engine_config(config),
                     kv_scales_fixed=config.kv_cache_dtype == "fp8",  # set at start below: no per-write absmax
                     num_speculative_tokens=spec.num_speculative_tokens if (spec := config.speculative()) else 0,
                     hybrid_kv_cache=not config.disable_hybrid_kv_cache_manager)
    kv_groups = model.kv_cache_groups(not config.disable_hybrid_kv_cache_manager)  # the runner's (kv_cache_groups.py)
    reserve = 0
    accelerator = jax.local_devices()[0].platform != "cpu"
    if config.kv_cache_memory_bytes is None and accelerator:
        # Profiling pass: what one step of the largest bucket needs besides weights and cache.
        probe = ModelRunner(model, num_blocks=-(-max_model_len // config.block_size), **runner_kw)
        reserve = probe.workspace_bytes()
        del probe
        _info(f"profiling pass: a step needs {reserve / 2**20:.0f} MiB of working memory")
    stats = jax.local_devices()[0].memory_stats() if accelerator else None
    if stats:
        gib = 2 ** 30
        _info(f"device memory: limit {stats.get('bytes_limit', 0) / gib:.1f} GiB, in use "
              f"{stats.get('bytes_in_use', 0) / gib:.1f} GiB, pool {stats.get('pool_bytes', 0) / gib:.1f} GiB, "
              f"largest free block {stats.get('largest_free_block_bytes', 0) / gib:.1f} GiB; {pool.describe()}")
    kv_dtype = cache_dtype(config.kv_cache_dtype, dtype)
    num_blocks = kv_cache_blocks(model.config, config.block_size, kv_dtype, config.kv_cache_memory_bytes,
                                 config.gpu_memory_utilization, reserve_bytes=reserve, tp=tp, kv_layers=kv_groups.slots,
                                 pool_fraction=pool.fraction)
    if jax.process_count() > 1:  # multi-host: every process allocates the same cache (process 0's size)
        import numpy as np
        from jax.experimental import multihost_utils

        num_blocks = int(multihost_utils.broadcast_one_to_all(np.int32(num_blocks)))
    shrink = config.kv_cache_memory_bytes is None and accelerator and jax.process_count() == 1
    scales, scales_line = None, None
    if config.kv_cache_dtype == "fp8" and ckpt_kv_scales is not None:  # vLLM: a checkpoint's scales win
        from jaxllm.runner import kv_calibration

        *scales, scales_line = kv_calibration.checkpoint_scales(
            ckpt_kv_scales, layout.kv_repeat if layout is not None else 1,
            layout.cache_scale_sharding() if layout is not None else None)
    elif config.kv_cache_dtype == "fp8" and not config.calculate_kv_scales:
        scales_line = "fp8 KV scales: fixed 1.0 (calculate_kv_scales=False)"  # the runner's cache starts so
    elif config.kv_cache_dtype == "fp8":  # fixed before any request: outputs never depend on which came first
        from jaxllm.runner import kv_calibration

        *scales, scales_line = kv_calibration.start_scales(
            model, tokenizer, config.block_size, max_model_len,
            *((layout.cache_scale_sharding(), layout.cache_sharding()) if layout is not None else ()))
    runner = allocate_runner(ModelRunner, model, num_blocks, runner_kw, shrink=shrink)
    num_blocks = runner.num_blocks
    # reload_weights() loads this checkpoint again, reload_weights(path) another (a level-2 wake-up reads neither)
    source = config.model or "smollm2-135m"
    runner.reload_weights = functools.partial(
        _reload_weights, load_format, dtype, config.seed, shardings, config.hf_overrides, layout, quantization_asked,
        model=source, built_from=source)
    if scales:
        kv_calibration.set_scales(runner, *scales)
    lora_load_fn = None
    if config.enable_lora:  # the PEFT loader (jaxllm/lora/peft.py) + the slot layout, both on the loader thread
        from jaxllm.lora.manager import default_load_fn

        lora_load_fn = default_load_fn(mc, config.max_lora_rank, prepare=runner.prepare_lora)
    engine = LLMEngine(config, runner, tokenizer, lora_load_fn=lora_load_fn, generation_defaults=gen)
    tokens = num_blocks * config.block_size
    quant = f", {model.quantization} weights" if model.quantization else ""
    _info(f"model {config.model or 'smollm2-135m'} ({mc.architecture}, {mc.num_params / 1e6:.0f}M params, "
          f"{jax.numpy.dtype(dtype).name}{quant}) loaded in {time.perf_counter() - t0:.1f}s")
    if layout is not None:
        _info(f"tensor parallel: tp={tp} over {[str(d) for d in mesh.devices.flat]}; kv heads "
              + (f"replicated x{layout.kv_repeat} ({mc.num_kv_heads} -> {model.config.num_kv_heads}, one per device)"
                 if layout.kv_repeat > 1 else f"sharded ({mc.num_kv_heads // tp} per device)")
              + f"; embed/lm_head {'vocab-parallel' if layout.shard_vocab else 'replicated'}")
    per_token = KVCache.bytes_per_block(kv_groups.slots, 1, model.config.num_kv_heads // tp,
                                        model.config.head_dim, kv_dtype)
    per_request = kv_groups.blocks_per_request(max_model_len, config.max_num_batched_tokens, config.block_size)
    _info(f"KV cache: {config.kv_cache_dtype} ({jax.numpy.dtype(kv_dtype).name}"
          f"{', per-layer per-kv-head scales' if config.kv_cache_dtype == 'fp8' else ''}), {per_token} bytes per "
          f"token{' per group' if kv_groups.hybrid else ''}{' per device' if tp > 1 else ''}; {num_blocks} blocks x "
          f"{config.block_size} tokens = {tokens} tokens; maximum concurrency at max_model_len={max_model_len}: "
          f"{num_blocks / per_request:.1f}x")
    if kv_groups.managed or model.kv_cache_groups(True).managed:  # a window somewhere, or the flag kept it off
        kind = ("hybrid" if kv_groups.hybrid else "sliding window, out-of-window blocks freed" if kv_groups.managed
                else "--disable-hybrid-kv-cache-manager")
        _info(f"KV cache groups ({kind}): {kv_groups.describe()}; a max_model_len request holds {per_request} blocks")
    if scales_line:
        _info(scales_line)
    if gen.describe():
        _info(gen.describe())
    if config.task == "embed":
        _info(f"task embed: pooling {config.pooling_type}, normalize={config.normalize}; "
              f"mixed buckets only (prefill), nothing sampled")
    if config.task == "classify":
        head = (f"; head from the LM-head rows of {list(mc.classifier_from_token)[:8]} ({mc.classifier_method})"
                if mc.classifier_from_token else "") + ("; score pairs as one text" if not mc.use_sep_token else "")
        _info(f"task classify: {mc.num_labels} labels {list(mc.labels)[:8]}, activation {mc.classify_activation} "
              f"(score: {mc.score_activation}){head}; last token; mixed buckets only (prefill), nothing sampled")
    _info(f"buckets: {runner.buckets.describe()}; async scheduling "
          f"{'on' if engine.async_scheduling else 'off'}")
    if warmup:
        secs = runner.warmup()
        _info(f"warm-up compiled {runner.compile_count} executables in {secs:.1f}s")
        engine.compiles_at_warmup = runner.compile_count  # jaxllm:xla_compiles_since_warmup counts from here
    # the one "engine start" figure (load + KV cache + warm-up) that the CLIs and the server print
    engine.startup_seconds = time.perf_counter() - t0
    _info(f"engine start {engine.startup_seconds:.1f}s")
    return engine
