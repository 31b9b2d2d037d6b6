"""Engine configuration (host side, no jax). msgspec Structs, validated at the edge.

``EngineConfig`` is the flat user-facing config (the keyword arguments of ``LLM(...)`` and the
``jaxllm.generate`` CLI flags, named like vLLM's). ``cache_config()`` / ``scheduler_config()``
derive the narrow views the KV cache manager and the scheduler consume.

Defaults worth knowing:
- ``max_num_batched_tokens = 2048``: the token budget of one engine step (prefill chunks plus
  one token per decoding request). Larger favours prefill throughput, smaller bounds the
  latency a long prompt adds to everyone else's decode step (chunked prefill).
- ``max_model_len = None``: take the model's context length (the factory fills it in).
- ``kv_cache_memory_bytes = None``: on GPU size the cache from ``gpu_memory_utilization``;
  on CPU the runner picks a sensible default.
- ``async_scheduling = None`` (auto: on with an accelerator, off on CPU): True makes the engine
  dispatch step N+1 before it reads step N's sampled tokens back, so scheduling and output
  processing overlap the device (same outputs as False, which runs each step to completion first;
  a request that stops wastes at most one slot). On CPU the "device" is the same two cores as the
  host, and overlapping made steps 8-11% slower (bench/RESULTS.md, "Async scheduling").
"""

from __future__ import annotations

import msgspec

_DTYPES = ("auto", "float32", "bfloat16", "float16")
_LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy", "orbax")
TASKS = ("auto", "generate", "embed", "classify")
# prefill only, nothing sampled: the runner's embed step (classify: the classifier head on the last token)
POOLING_TASKS = ("embed", "classify")
# weight-only, jaxllm/models/quant.py; "int4": a 4-bit checkpoint's own weights (GGUF Q4_0/Q4_1, AWQ,
# GPTQ, which load 4-bit without the flag too), or any other weights rounded to int4 at load (groups of 128)
QUANTIZATIONS = ("int8", "fp8", "int4")
KV_CACHE_DTYPES = ("auto", "fp8")  # pallas_kernels: fp8 = float8_e4m3fn with scales
SCHEDULING_POLICIES = ("fcfs", "priority")  # vLLM's --scheduling-policy (jaxllm/core/scheduler.py)


class CacheConfig(msgspec.Struct, kw_only=True):
    block_size: int = 16
    enable_prefix_caching: bool = True
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.9

    def validate(self) -> "CacheConfig":
        _pos_int("block_size", self.block_size)
        _bool("enable_prefix_caching", self.enable_prefix_caching)
        if self.kv_cache_memory_bytes is not None:
            _pos_int("kv_cache_memory_bytes", self.kv_cache_memory_bytes)
        g = self.gpu_memory_utilization
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not (0 < g <= 1):
            raise ValueError(f"gpu_memory_utilization={g!r} is invalid: must be in (0, 1]")
        return self


class SchedulerConfig(msgspec.Struct, kw_only=True):
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    # Multi-LoRA: at most this many distinct adapters among running requests (None: no adapters)
    max_loras: int | None = None
    # "fcfs" (arrival order) | "priority" (lower Request.priority first, ties by arrival)
    policy: str = "fcfs"
    # vLLM's --long-prefill-token-threshold: a prefill chunk of one request takes at most this many
    # tokens per step (0 = no cap: what the token budget leaves), so one long prompt shares the steps
    long_prefill_token_threshold: int = 0

    def validate(self) -> "SchedulerConfig":
        _pos_int("max_num_seqs", self.max_num_seqs)
        _pos_int("max_num_batched_tokens", self.max_num_batched_tokens)
        _pos_int("max_model_len", self.max_model_len)
        _policy(self.policy)
        _threshold(self.long_prefill_token_threshold)
        if self.max_loras is not None:
            _pos_int("max_loras", self.max_loras)
        return self


class EngineConfig(msgspec.Struct, kw_only=True):
    model: str = ""
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    # vLLM's --long-prefill-token-threshold: most tokens of one request's prefill per step (0 = no cap)
    long_prefill_token_threshold: int = 0
    block_size: int = 16
    enable_prefix_caching: bool = True
    # vLLM's --disable-hybrid-kv-cache-manager: keep one full-length KV cache for every layer of a model with
    # sliding-window layers (default: KV cache groups, sliding ones holding only their window's blocks;
    # jaxllm/core/kv_cache_groups.py). Models whose layers attend alike have one group either way: with the
    # flag a full-attention one even when every layer slides (Mistral v0.1), the window then only masked.
    disable_hybrid_kv_cache_manager: bool = False
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    # MoE models with tensor_parallel_size > 1 (vLLM's --enable-expert-parallel): whole experts on each
    # device (the expert axis sharded over the tp devices) instead of every expert's F axis split;
    # attention, dense MLPs and the router stay as under TP. A no-op at tp=1; refused for a model
    # without experts or num_experts not divisible by tp (jaxllm/parallel/layout.py check_fits)
    enable_expert_parallel: bool = False
    dtype: str = "auto"
    # weight-only quantization of the per-layer projections at load: None | "int8" | "fp8" | "int4"
    # (jaxllm/models/quant.py; embeddings, LM head and norms stay in `dtype`; "int4": a 4-bit
    # checkpoint's own weights, or others rounded to int4 at load)
    quantization: str | None = None
    # KV cache element type: "auto" (the model dtype) | "fp8" (float8_e4m3fn with scales, read and
    # scaled inside the attention kernels; vLLM's --kv-cache-dtype)
    kv_cache_dtype: str = "auto"
    # fp8 KV cache scales (vLLM's name; our default differs): True = calibrated once at engine start
    # on a fixed prefill (jaxllm/runner/kv_calibration.py), False = every scale 1.0 (vLLM's default)
    calculate_kv_scales: bool = True
    # Multi-LoRA (jaxllm/lora, vLLM's names): adapters served beside the base model in one batch.
    # max_loras: device slots (distinct adapters per step); max_lora_rank: ranks padded to this;
    # max_cpu_loras: adapters kept loaded on the host (LRU; None = max_loras)
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    load_format: str = "auto"
    # vLLM's --tokenizer: an HF tokenizer directory (or a .gguf file's vocabulary) instead of the model's
    # own; None = the checkpoint's
    tokenizer: str | None = None
    seed: int = 0
    async_scheduling: bool | None = None
    # "generate" | "embed" | "classify" | "auto" (classify for a *ForSequenceClassification checkpoint,
    # embed for one without an LM head or with a sentence-transformers pooling config, else generate);
    # the factory resolves it
    task: str = "auto"
    # embed task defaults (vLLM's PoolerConfig): None = the checkpoint's sentence-transformers
    # config (1_Pooling/config.json, a Normalize module in modules.json), else LAST and True
    pooling_type: str | None = None
    normalize: bool | None = None
    # Matryoshka embeddings (vLLM's, from the HF config): may a request ask for fewer `dimensions`,
    # and which (None: any from 1 to hidden_size). None = the checkpoint's `is_matryoshka` /
    # `matryoshka_dimensions` (config.json, else config_sentence_transformers.json), else not
    is_matryoshka: bool | None = None
    matryoshka_dimensions: list[int] | None = None
    # speculative decoding (vLLM's --speculative-config): None, or a dict / JSON string such as
    # {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 1}
    # (jaxllm/spec_config.py). Speculation runs the engine synchronously (async_scheduling off).
    speculative_config: dict | str | None = None
    # vLLM's --scheduling-policy: "fcfs" (arrival order; a request's priority must be 0) or "priority"
    # (lower add_request(priority=...) first, ties by arrival; the lowest-priority running request is
    # the one preempted when KV blocks run out)
    scheduling_policy: str = "fcfs"
    # vLLM's --hf-overrides: a dict (or JSON text of an object) merged into an HF checkpoint's config.json
    # before it is read (jaxllm/hf_overrides.py); refused for GGUF, Orbax and dummy weights
    hf_overrides: dict | None = None
    # vLLM's --generation-config: where requests' default sampling parameters (and extra eos ids) come
    # from: "auto" = the HF checkpoint's generation_config.json, "vllm" = jaxllm's own defaults, or a
    # folder holding a generation_config.json (jaxllm/generation_config.py)
    generation_config: str = "auto"
    # vLLM's --override-generation-config: a dict (or JSON text of an object) laid over that file,
    # e.g. {"temperature": 0.5}; it may add keys (max_new_tokens here also caps server requests)
    override_generation_config: dict | None = None
    # vLLM's --enable-sleep-mode: LLM.sleep(level) / wake_up(tags) / is_sleeping() and the server's
    # /sleep, /wake_up, /is_sleeping (jaxllm/engine/sleep_requests.py, jaxllm/runner/sleep.py)
    enable_sleep_mode: bool = False

    def validate(self) -> "EngineConfig":
        if not isinstance(self.model, str):
            raise ValueError(f"model={self.model!r} is invalid: must be a string (name or path)")
        _threshold(self.long_prefill_token_threshold)
        if self.tokenizer is not None:
            import os

            t = self.tokenizer
            files = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
            if not isinstance(t, str) or not ((t.endswith(".gguf") and os.path.isfile(t)) or (
                    os.path.isdir(t) and any(os.path.isfile(os.path.join(t, f)) for f in files))):
                raise ValueError(f"tokenizer={t!r} is invalid: need an HF tokenizer directory (tokenizer.json / "
                                 f"tokenizer_config.json) or a .gguf file")
        if self.max_model_len is not None:
            _pos_int("max_model_len", self.max_model_len)
        _pos_int("tensor_parallel_size", self.tensor_parallel_size)
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is invalid: must be one of {list(_DTYPES)}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization={self.quantization!r} is invalid: must be one of "
                             f"{list(QUANTIZATIONS)} or None")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype={self.kv_cache_dtype!r} is invalid: must be one of {list(KV_CACHE_DTYPES)}")
        _bool("calculate_kv_scales", self.calculate_kv_scales)
        _bool("enable_expert_parallel", self.enable_expert_parallel)
        _bool("disable_hybrid_kv_cache_manager", self.disable_hybrid_kv_cache_manager)
        _bool("enable_lora", self.enable_lora)
        _bool("enable_sleep_mode", self.enable_sleep_mode)
        _pos_int("max_loras", self.max_loras)
        _pos_int("max_lora_rank", self.max_lora_rank)
        if self.max_cpu_loras is not None:
            _pos_int("max_cpu_loras", self.max_cpu_loras)
            if self.max_cpu_loras < self.max_loras:
                raise ValueError(f"max_cpu_loras={self.max_cpu_loras} is invalid: must be >= max_loras={self.max_loras}")
        if self.load_format not in _LOAD_FORMATS:
            raise ValueError(
                f"load_format={self.load_format!r} is invalid: must be one of {list(_LOAD_FORMATS)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r} is invalid: must be an integer")
        if self.async_scheduling is not None:
            _bool("async_scheduling", self.async_scheduling)
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r} is invalid: must be one of {list(TASKS)}")
        if self.pooling_type is not None and self.pooling_type not in ("LAST", "MEAN"):
            raise ValueError(f"pooling_type={self.pooling_type!r} is invalid: must be one of ['LAST', 'MEAN']")
        if self.normalize is not None:
            _bool("normalize", self.normalize)
        if self.is_matryoshka is not None:
            _bool("is_matryoshka", self.is_matryoshka)
        dims = self.matryoshka_dimensions
        if dims is not None and (not isinstance(dims, (list, tuple)) or not dims or any(
                isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims)):
            raise ValueError(f"matryoshka_dimensions={dims!r} is invalid: must be a non-empty list of "
                             "integers >= 1, or None")
        _policy(self.scheduling_policy)
        from jaxllm.hf_overrides import parse_hf_overrides

        self.hf_overrides = parse_hf_overrides(self.hf_overrides, "hf_overrides")
        from jaxllm import generation_config as gencfg

        gencfg.check_mode(self.generation_config)
        self.override_generation_config = gencfg.parse_override(self.override_generation_config)
        self.speculative()
        self.cache_config().validate()
        SchedulerConfig(max_num_seqs=self.max_num_seqs,
                        max_num_batched_tokens=self.max_num_batched_tokens).validate()
        return self

    def speculative(self):
        """The parsed speculative_config (jaxllm.spec_config.SpeculativeConfig) or None."""
        from jaxllm.spec_config import parse_speculative_config

        return parse_speculative_config(self.speculative_config)

    def cache_config(self) -> CacheConfig:
        return CacheConfig(block_size=self.block_size,
                           enable_prefix_caching=self.enable_prefix_caching,
                           kv_cache_memory_bytes=self.kv_cache_memory_bytes,
                           gpu_memory_utilization=self.gpu_memory_utilization)

    def scheduler_config(self) -> SchedulerConfig:
        if self.max_model_len is None:
            raise ValueError("max_model_len=None is invalid here: resolve it from the model "
                             "config before building the scheduler")
        return SchedulerConfig(max_num_seqs=self.max_num_seqs,
                               max_num_batched_tokens=self.max_num_batched_tokens,
                               max_model_len=self.max_model_len,
                               max_loras=self.max_loras if self.enable_lora else None,
                               policy=self.scheduling_policy,
                               long_prefill_token_threshold=self.long_prefill_token_threshold).validate()


def _threshold(v) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"long_prefill_token_threshold={v!r} is invalid: must be an integer >= 0 (0 = no cap)")


def _pos_int(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name}={v!r} is invalid: must be an integer >= 1")


def _policy(v) -> None:
    if v not in SCHEDULING_POLICIES:
        raise ValueError(f"scheduling_policy={v!r} is invalid: must be one of {list(SCHEDULING_POLICIES)}")


def _bool(name: str, v) -> None:
    if not isinstance(v, bool):
        raise ValueError(f"{name}={v!r} is invalid: must be a bool")
