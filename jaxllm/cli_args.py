"""The flag vocabulary shared by `python -m jaxllm.generate`, `python -m serving` and
`python -m serving.client` (no jax: the server's host side and the client import this).

One name per thing, vLLM's where vLLM has one: the engine flags are `vllm serve`'s, the sampling
flags (jaxllm/sampling_args.py) are the `SamplingParams` field names with dashes. `--seed` is the
engine seed everywhere; a request's own seed is `--sampling-seed`. Every flag's help has a sentence
and its default (`HelpFormatter` appends `(default: X)` when the text does not say it) and lists
its choices.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from jaxllm.config import (_DTYPES, _LOAD_FORMATS, KV_CACHE_DTYPES, QUANTIZATIONS, SCHEDULING_POLICIES, TASKS,
                           EngineConfig)
from jaxllm.sampling_args import (  # noqa: F401 - re-exported: tests import the sampling flags from here
    add_sampling_args, sampling_fields_from_args, sampling_params_from_args)

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks; appends `(default: X)` to a value flag's help unless
    the text already names its default (flags whose default is None must say what unset means)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text.lower() or action.default in (None, argparse.SUPPRESS)
                or (action.nargs == 0 and action.default is False)):
            return text
        return text + " (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: `error: argument --port: invalid int value: 'x'` and exit 2
    (argparse prints the whole usage block first)."""

    def __init__(self, *args, **kw):
        kw.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kw)

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def add_hidden_alias(group, flag: str, dest: str, **kw) -> None:
    """An old spelling kept working but not shown in --help."""
    group.add_argument(flag, dest=dest, help=argparse.SUPPRESS, default=argparse.SUPPRESS, **kw)


# ----- engine ---------------------------------------------------------------------------------
def add_engine_args(ap: argparse.ArgumentParser) -> None:
    """The engine flags (`EngineConfig` fields), shared by jaxllm.generate, the server and the benches."""
    d = EngineConfig()
    g = ap.add_argument_group("engine")
    g.add_argument("--model", default="smollm2-135m",
                   help="model name (smollm2-135m), HF directory, .gguf file, Orbax directory, or a dummy "
                        "preset (dummy:tiny-llama, or any preset with --load-format dummy)")
    g.add_argument("--max-model-len", type=human_int, default=None,
                   help="longest prompt + output in tokens; vLLM's forms 32k (32000) and 32K (32768) too "
                        "(default: the model's context length)")
    g.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs,
                   help="sequences per engine step (also the largest decode bucket)")
    g.add_argument("--max-num-batched-tokens", type=human_int, default=d.max_num_batched_tokens,
                   help="token budget per step (4k, 8K as --max-model-len); longer prompts are prefilled in chunks")
    g.add_argument("--long-prefill-token-threshold", type=human_int, default=d.long_prefill_token_threshold,
                   help="most prompt tokens of one request prefilled per step, so a long prompt shares the steps "
                        "with others (vLLM's flag; 0 = no cap, what the token budget leaves)")
    g.add_argument("--block-size", type=int, default=d.block_size, help="tokens per KV cache block")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=d.enable_prefix_caching, help="share the KV blocks of identical prompt prefixes")
    g.add_argument("--enable-sleep-mode", action="store_true", default=False,
                   help="vLLM's sleep mode: LLM.sleep(level) / wake_up(tags) free the accelerator between uses "
                        "(the server: POST /sleep?level=1, POST /wake_up, GET /is_sleeping) (default: off)")
    g.add_argument("--disable-hybrid-kv-cache-manager", action="store_true",
                   default=d.disable_hybrid_kv_cache_manager,
                   help="one full-length KV cache for every layer of a model with sliding-window layers "
                        "(default: sliding-window layers keep only their window's blocks)")
    g.add_argument("--kv-cache-memory-bytes", type=human_int, default=None,
                   help="KV cache size in bytes, e.g. 4G (4 GiB) or 4g (4e9) (default: 1 GiB on CPU; on an accelerator "
                        "--gpu-memory-utilization of its memory minus weights and working memory)")
    g.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization,
                   help="fraction of accelerator memory jaxllm may use")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=d.tensor_parallel_size,
                   help="devices to shard the model over")
    g.add_argument("--enable-expert-parallel", action=argparse.BooleanOptionalAction,
                   default=d.enable_expert_parallel,
                   help="MoE models at --tensor-parallel-size > 1: whole experts on each device (the expert "
                        "axis sharded over the tp devices) instead of each expert's intermediate axis split; "
                        "num_experts must divide by tp; a no-op at tp=1 (default: off)")
    g.add_argument("--dtype", type=_dtype, default=d.dtype, choices=_DTYPES,
                   help="weights and activations; auto = bfloat16 on an accelerator, float32 on CPU; vLLM's "
                        "half and float are float16 and float32")
    g.add_argument("--quantization", "-q", default=None, choices=QUANTIZATIONS,
                   help="weight-only quantization of the per-layer projections at load (default: none, full "
                        "precision; per-output-channel "
                        "scales; embeddings, LM head and norms stay in --dtype); a Q8_0 GGUF stays int8 with "
                        "its block scales without it, an fp8 HF checkpoint (compressed-tensors, fp8, ModelOpt "
                        "FP8) stays fp8, an AWQ / GPTQ checkpoint (and a GGUF Q4_0/Q4_1, "
                        "JAXLLM_GGUF_Q4) stays 4-bit; 'int4' on other weights rounds them to int4 at load "
                        "(symmetric, groups of 128 along the input axis); "
                        "other GGUF types re-quantize from their dequantized values")
    g.add_argument("--kv-cache-dtype", default=d.kv_cache_dtype, choices=KV_CACHE_DTYPES,
                   help="KV cache element type: auto = the model dtype; fp8 = float8_e4m3fn with per-layer "
                        "per-kv-head scales (see --calculate-kv-scales; half a bf16 cache's bytes: twice "
                        "the blocks in the same memory)")
    g.add_argument("--calculate-kv-scales", action=argparse.BooleanOptionalAction, default=d.calculate_kv_scales,
                   help="fp8 KV cache: calibrate the scales once at start on a fixed prefill (the Zen of "
                        "Python; seeded ids without a tokenizer), the same whatever requests come first; "
                        "--no-calculate-kv-scales = every scale 1.0, vLLM's uncalibrated default (default: on); an fp8 "
                        "checkpoint's stored k_scale/v_scale are used instead of either")
    g.add_argument("--load-format", default=d.load_format, choices=_LOAD_FORMATS,
                   help="checkpoint format; auto decides from the path")
    g.add_argument("--tokenizer", default=None,
                   help="an HF tokenizer directory or a .gguf file whose vocabulary to use instead of the model's "
                        "(vLLM's flag; default: the checkpoint's)")
    g.add_argument("--seed", type=int, default=d.seed,
                   help="engine seed: requests without --sampling-seed draw their seed from it")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=d.async_scheduling,
                   help="dispatch step N+1 before reading step N's sampled tokens back, so host work "
                   "overlaps the device's (default: on with a GPU/TPU, off on CPU)")
    g.add_argument("--task", default=d.task, choices=TASKS,
                   help="generate text, embed prompts (pooled last_hidden_state) or classify them (a "
                        "*ForSequenceClassification checkpoint's score head on the last token); auto = classify "
                        "for such a checkpoint, embed for one without an LM head (architectures LlamaModel, "
                        "Qwen3Model, ...) or with a sentence-transformers modules.json + 1_Pooling/config.json, "
                        "else generate")
    g.add_argument("--pooling-type", default=None, choices=("LAST", "MEAN"),
                   help="embed task: the last token's hidden state or the mean over the prompt (default: "
                        "the checkpoint's 1_Pooling/config.json, else LAST)")
    g.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="embed task: L2-normalise the embeddings (default: on, unless the checkpoint's "
                        "sentence-transformers modules.json has no Normalize module)")
    g.add_argument("--speculative-config", default=None,
                   help='speculative decoding, a JSON object (vLLM\'s flag): {"method": "ngram", '
                        '"num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 1} '
                        "(prompt lookup drafts; runs steps synchronously; prompt_lookup_min/max default to 5 "
                        "as vLLM's, one given sets both; default: off)")
    g.add_argument("--scheduling-policy", default=d.scheduling_policy, choices=SCHEDULING_POLICIES,
                   help="fcfs = requests run in arrival order; priority = lower request priority first "
                        "(ties by arrival), and the lowest-priority running request is the one preempted "
                        "when the KV cache is full (vLLM's flag; requests set priority through "
                        "LLM.generate(priority=[...]), the HTTP field and the gRPC field)")
    g.add_argument("--hf-overrides", type=_hf_overrides, default=None, metavar="JSON",
                   help="a JSON object merged into an HF checkpoint's config.json before it is read (vLLM's "
                        "flag; top-level keys replace, *_config sub-configs merge), e.g. '{\"rms_norm_eps\": 1e-5}'; "
                        "a *ForCausalLM reranker loads as classify with '{\"architectures\": "
                        "[\"Qwen3ForSequenceClassification\"], \"classifier_from_token\": [\"no\", \"yes\"], "
                        "\"is_original_qwen3_reranker\": true}' (README, \"Classification and reranking\"); "
                        "HF safetensors checkpoints only (default: none)")
    g.add_argument("--generation-config", type=_generation_config, default=d.generation_config, metavar="auto|vllm|DIR",
                   help="where requests' default sampling parameters come from (vLLM's flag): auto = the HF "
                        "checkpoint's generation_config.json (repetition_penalty, temperature, top_k, top_p, min_p, "
                        "max_new_tokens; GGUF, Orbax and dummy weights have none), vllm = jaxllm's own defaults, or "
                        "a folder holding a generation_config.json; a request's own values win, and the file's "
                        "eos_token_id are stop tokens beside the tokenizer's (default: auto)")
    g.add_argument("--override-generation-config", type=_override_generation_config, default=None, metavar="JSON",
                   help="a JSON object laid over the generation config (vLLM's flag), e.g. '{\"temperature\": 0.5}'; "
                        "it may add keys; its max_new_tokens also caps every server request's max_tokens (default: none)")
    lo = ap.add_argument_group("LoRA adapters (vLLM's flags)")
    lo.add_argument("--enable-lora", action="store_true",
                    help="serve PEFT LoRA adapters beside the base model, mixed in one batch (default: off; "
                         "implied by --lora / --lora-modules)")
    lo.add_argument("--max-loras", type=int, default=d.max_loras,
                    help="device adapter slots: distinct adapters running at once")
    lo.add_argument("--max-lora-rank", type=int, default=d.max_lora_rank,
                    help="largest adapter rank; every adapter is padded to it")
    lo.add_argument("--max-cpu-loras", type=int, default=None,
                    help="adapters kept loaded on the host (LRU) beyond those unfinished requests use "
                         "(default: --max-loras)")


_UNITS = {"k": 10 ** 3, "m": 10 ** 6, "g": 10 ** 9, "t": 10 ** 12,
          "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def human_int(text: str) -> int:
    """An int, or vLLM's human-readable form: a number with a unit, k/m/g/t decimal (``25.6k`` =
    25600) and K/M/G/T binary (``1K`` = 1024, ``4G`` = 4 GiB); the result must be a whole number."""
    from decimal import Decimal, InvalidOperation

    t = text.strip()
    unit = _UNITS.get(t[-1:])
    number = t[:-1] if unit is not None else t
    try:
        value = Decimal(number) * (unit or 1) if number and (unit is not None or number.lstrip("-").isdigit()) \
            else None
    except InvalidOperation:
        value = None
    if value is None or not value.is_finite() or value != value.to_integral_value():
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: need an integer, optionally with a unit "
                                         f"(32k = 32000, 32K = 32768; k/m/g/t decimal, K/M/G/T binary)")
    return int(value)


def _dtype(text: str) -> str:
    """vLLM's dtype spellings: half = float16, float = float32 (argparse then checks the choices)."""
    return {"half": "float16", "float": "float32"}.get(text, text)


def parse_lora_module(text: str) -> tuple[str, str]:
    """``name=path`` (an adapter's public name and its PEFT directory) -> (name, path)."""
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: need name=path (a name and a PEFT adapter "
                                         f"directory)")
    return name.strip(), path.strip()


def engine_config_from_args(args) -> EngineConfig:
    return EngineConfig(model=args.model, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                        max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
                        long_prefill_token_threshold=getattr(args, "long_prefill_token_threshold", 0),
                        enable_prefix_caching=args.enable_prefix_caching,
                        disable_hybrid_kv_cache_manager=getattr(args, "disable_hybrid_kv_cache_manager", False),
                        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
                        gpu_memory_utilization=args.gpu_memory_utilization,
                        tensor_parallel_size=args.tensor_parallel_size,
                        enable_expert_parallel=getattr(args, "enable_expert_parallel", False), dtype=args.dtype,
                        quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
                        calculate_kv_scales=args.calculate_kv_scales,
                        load_format=args.load_format, tokenizer=getattr(args, "tokenizer", None), seed=args.seed,
                        async_scheduling=args.async_scheduling, task=args.task,
                        pooling_type=args.pooling_type, normalize=args.normalize,
                        speculative_config=getattr(args, "speculative_config", None),
                        scheduling_policy=getattr(args, "scheduling_policy", EngineConfig().scheduling_policy),
                        enable_lora=bool(getattr(args, "enable_lora", False) or getattr(args, "lora", None)
                                         or getattr(args, "lora_modules", None)),
                        max_loras=getattr(args, "max_loras", EngineConfig().max_loras),
                        max_lora_rank=getattr(args, "max_lora_rank", EngineConfig().max_lora_rank),
                        max_cpu_loras=getattr(args, "max_cpu_loras", None),
                        hf_overrides=getattr(args, "hf_overrides", None),
                        generation_config=getattr(args, "generation_config", EngineConfig().generation_config),
                        override_generation_config=getattr(args, "override_generation_config", None),
                        enable_sleep_mode=getattr(args, "enable_sleep_mode", False))


def _hf_overrides(text: str) -> dict:
    from jaxllm.hf_overrides import parse_hf_overrides

    try:
        return parse_hf_overrides(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _generation_config(text: str) -> str:
    from jaxllm.generation_config import FLAG, check_mode

    try:
        return check_mode(text, FLAG)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _override_generation_config(text: str) -> dict:
    from jaxllm.generation_config import OVERRIDE_FLAG, parse_override

    try:
        return parse_override(text, OVERRIDE_FLAG)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# ----- logging -----------------------------------------------------------------------------------
def add_log_level_arg(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--log-level", type=str.lower, default="info", choices=LOG_LEVELS,
                    help="level of the log lines on stderr; JAX's and gRPC's own INFO lines (backend "
                         "probing, compile cache) show only at debug")


def configure_logging(level: str) -> None:
    """Root handler at `level`; the `jaxllm` logger (start-up lines) at `level`; JAX, absl and gRPC
    at WARNING unless `level` is debug (their INFO lines, e.g. "Unable to initialize backend 'tpu'"
    and "Resetting cache at <empty>", are not news to a user)."""
    lvl = getattr(logging, level.upper())
    logging.basicConfig(level=lvl, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(lvl)
    logging.getLogger("jaxllm").setLevel(lvl)
    quiet = lvl if lvl <= logging.DEBUG else max(lvl, logging.WARNING)
    for name in ("jax", "absl", "grpc"):
        logging.getLogger(name).setLevel(quiet)


def api_key_from_env() -> str | None:
    """$JAXLLM_API_KEY, else vLLM's $VLLM_API_KEY (a --api-key on the command line wins over both)."""
    return os.environ.get("JAXLLM_API_KEY") or os.environ.get("VLLM_API_KEY") or None
