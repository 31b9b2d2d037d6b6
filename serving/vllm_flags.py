"""vLLM's ``vllm serve`` flags that ``python -m serving`` has no flag of its own for (no jax).

A vLLM user's first act is to paste their launch command. Every flag of vLLM's ``vllm serve``
(``vllm/engine/arg_utils.py`` ``EngineArgs.add_cli_args``, ``vllm/entrypoints/openai/cli_args.py``
``FrontendArgs`` / ``make_arg_parser``) is one of three things here:

* **honoured**: our own flag of the same name (``jaxllm/cli_args.py``, ``serving/__main__.py``,
  ``serving/http_args.py``), or a value in this table that is what jaxllm does anyway
  (``--pipeline-parallel-size 1``, ``--enable-chunked-prefill``): accepted silently;
* **ignored**: accepted, changes nothing that matters on a JAX engine (CUDA graph sizes,
  ``--enforce-eager``, ``--swap-space``): named, with why, in one INFO line at start-up;
* **refused**: a capability jaxllm lacks where ignoring would mislead (``--pipeline-parallel-size 2``,
  ``--cpu-offload-gb 4``, ``--kv-transfer-config``): one ``error: ...`` line naming flag, value and
  why, exit 2, before the port opens.

The table is the whole story: serving/README.md "vLLM's serve flags: where we stand" lists it.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable, NamedTuple

OK, IGNORED, REFUSED = "honoured", "ignored", "refused"
_DEST = "vllm_compat__"  # namespace prefix: never collides with our own flags' dests


class CompatFlag(NamedTuple):
    flags: tuple[str, ...]  # option strings, the long one first
    verdict: Callable[[Any], str]  # the given value -> OK / IGNORED / REFUSED
    why: str  # what jaxllm does instead
    kind: str = "value"  # "bool" (--x / --no-x), "value" (one value), "list" (one or more values)
    type: Callable[[str], Any] = str
    default: str = "none"  # vLLM's default, shown in --help

    @property
    def name(self) -> str:
        return self.flags[0]

    @property
    def dest(self) -> str:
        return _DEST + self.name.lstrip("-").replace("-", "_")


# ----- verdict builders ------------------------------------------------------------------------
def ignored(_value: Any) -> str:
    return IGNORED


def refused(value: Any) -> str:
    return OK if value is False else REFUSED  # --no-x (off) is what we do


def refused_when_on(value: Any) -> str:
    return REFUSED if value else OK


def ignored_when_on(value: Any) -> str:
    return IGNORED if value else OK


def ok_when_on(value: Any) -> str:
    return OK if value else IGNORED


def only(*ok_values: Any, otherwise: str = REFUSED) -> Callable[[Any], str]:
    """The values jaxllm does anyway are honoured; any other is ``otherwise``."""
    return lambda value: OK if value in ok_values else otherwise


_IGN_MM = "text-only models: no multimodal inputs to configure"
_IGN_CUDA = "no CUDA graphs: XLA compiles every (tokens, sequences) bucket at start (printed then)"
_IGN_DIST = "one process drives every device (jax); there are no workers, NCCL or Ray to tune"
_IGN_EPLB = "no expert load balancing: experts stay where --enable-expert-parallel places them"
_IGN_DL = "nothing is downloaded: --model is a local path or a packaged name"
_NO_PLUGIN = "no plugins: jaxllm runs only its own code (use the built-in choices)"
_IGN_SO = "one structured-output backend (llguidance)"

# (flags, verdict, why, kind, type, vLLM's default)
TABLE: tuple[CompatFlag, ...] = (
    # ----- server (FrontendArgs, make_arg_parser) -------------------------------------------------
    CompatFlag(("--headless",), refused_when_on, "no multi-node data-parallel mode: one server process", "bool",
               default="off"),
    CompatFlag(("--api-server-count", "-asc"), only(1), "one API server process serves HTTP and gRPC", type=int,
               default="1"),
    CompatFlag(("--config",), refused, "no YAML config file: pass the flags on the command line"),
    CompatFlag(("--grpc",), ignored_when_on, "gRPC is always served (on --port); the OpenAI HTTP API on --http-port",
               "bool", default="off"),
    CompatFlag(("--uds",), refused, "no Unix-socket listener: the HTTP API listens on --host/--http-port"),
    CompatFlag(("--data-parallel-supervisor-port",), ignored, "no data-parallel multi-port mode", type=int,
               default="9256"),
    CompatFlag(("--dp-supervisor-probe-interval-s",), ignored, "no data-parallel multi-port mode", type=float,
               default="5.0"),
    CompatFlag(("--dp-supervisor-probe-timeout-s",), ignored, "no data-parallel multi-port mode", type=float,
               default="5.0"),
    CompatFlag(("--dp-supervisor-probe-failure-threshold",), ignored, "no data-parallel multi-port mode", type=int,
               default="3"),
    CompatFlag(("--disable-uvicorn-access-log",), ok_when_on, "the uvicorn access log is always off here", "bool",
               default="off"),
    CompatFlag(("--disable-access-log-for-endpoints",), ignored, "the uvicorn access log is always off here"),
    CompatFlag(("--enable-ssl-refresh",), refused_when_on, "certificates are read once at start", "bool",
               default="off"),
    CompatFlag(("--ssl-ciphers",), refused, "TLS cipher suites are the ssl module's and gRPC's defaults"),
    CompatFlag(("--middleware",), refused, "no custom ASGI middleware: " + _NO_PLUGIN),
    CompatFlag(("--h11-max-header-count",), ignored, "uvicorn has no header-count limit; bodies are capped by "
               "--max-message-bytes", type=int, default="256"),
    CompatFlag(("--enable-offline-docs",), ignored_when_on, "the /docs page loads FastAPI's own assets", "bool",
               default="off"),
    CompatFlag(("--enable-flash-late-interaction",), ignored_when_on, "no late-interaction (ColBERT) scoring",
               "bool", default="on"),
    CompatFlag(("--chat-template-content-format",), only("auto", "string"),
               "message content reaches the template as a string (text parts joined); 'openai' part lists are "
               "not passed through", default="auto"),
    CompatFlag(("--tool-parser-plugin",), refused, _NO_PLUGIN),
    CompatFlag(("--tool-server",), refused, "no built-in tool servers (browser, code interpreter)"),
    CompatFlag(("--enable-per-request-metrics",), refused_when_on, "answers carry no per-request timing metrics "
               "(they are on /metrics)", "bool", default="off"),
    CompatFlag(("--enable-log-outputs",), refused_when_on, "outputs are not logged (--enable-log-requests logs "
               "each request as it is admitted)", "bool", default="off"),
    CompatFlag(("--enable-log-deltas",), ignored, "outputs are not logged", "bool", default="on"),
    CompatFlag(("--cohere-is-reasoning-model",), ignored, "no Cohere endpoints", "bool", default="on"),
    CompatFlag(("--cohere-format",), ignored, "no Cohere endpoints", default="cmd4"),
    CompatFlag(("--log-error-stack",), ignored_when_on, "a 500 is logged with its traceback always", "bool",
               default="off"),
    CompatFlag(("--tokens-only",), refused_when_on, "no tokens-in/tokens-out-only mode", "bool", default="off"),
    CompatFlag(("--fingerprint-mode",), ignored, "answers carry no system_fingerprint", default="full"),
    CompatFlag(("--fingerprint-value",), ignored, "answers carry no system_fingerprint"),
    CompatFlag(("--disable-frontend-multiprocessing",), ignored_when_on, "the HTTP door runs in the server's "
               "own process (one asyncio loop)", "bool", default="off"),
    # ----- model (ModelConfig) --------------------------------------------------------------------
    CompatFlag(("--runner",), only("auto", "generate"), "the runner follows --task (generate, embed, classify)",
               default="auto"),
    CompatFlag(("--convert",), only("auto", "none"), "no model conversion: pick --task embed or --task classify",
               default="auto"),
    CompatFlag(("--tokenizer-mode",), only("auto", "hf", otherwise=REFUSED),
               "the HF fast tokenizer of the checkpoint (or the GGUF's own vocabulary)", default="auto"),
    CompatFlag(("--trust-remote-code",), ignored_when_on, "no remote code is run: architectures are built in",
               "bool", default="off"),
    CompatFlag(("--hf-config-path",), refused, "config.json is read from the --model directory (edit it with "
               "--hf-overrides)"),
    CompatFlag(("--allowed-local-media-path",), ignored, _IGN_MM),
    CompatFlag(("--allowed-media-domains",), ignored, _IGN_MM, "list"),
    CompatFlag(("--revision",), ignored, _IGN_DL),
    CompatFlag(("--code-revision",), ignored, _IGN_DL),
    CompatFlag(("--tokenizer-revision",), ignored, _IGN_DL),
    CompatFlag(("--hf-token",), ignored, _IGN_DL),
    CompatFlag(("--rope-scaling",), refused, "use --hf-overrides '{\"rope_scaling\": {...}}'"),
    CompatFlag(("--rope-theta",), refused, "use --hf-overrides '{\"rope_theta\": ...}'"),
    CompatFlag(("--enforce-eager",), ignored_when_on, "no eager mode: XLA compiles every bucket at start "
               "(a compile after warm-up is a bug)", "bool", default="off"),
    CompatFlag(("--logprobs-mode",), only("raw_logprobs"),
               "logprobs are the log-softmax of the model's raw logits (before temperature, penalties, top-k/p)",
               default="raw_logprobs"),
    CompatFlag(("--disable-sliding-window",), refused_when_on, "sliding-window layers always use their window "
               "(--disable-hybrid-kv-cache-manager only changes the cache layout)", "bool", default="off"),
    CompatFlag(("--disable-cascade-attn",), ignored_when_on, "no cascade attention", "bool", default="off"),
    CompatFlag(("--skip-tokenizer-init",), refused_when_on, "the tokenizer is always loaded (if the checkpoint has "
               "one)", "bool", default="off"),
    CompatFlag(("--enable-prompt-embeds",), refused_when_on, "prompts are text or token ids", "bool", default="off"),
    CompatFlag(("--config-format",), only("auto", "hf"), "config.json (HF format) only", default="auto"),
    CompatFlag(("--pooler-config", "--override-pooler-config"), refused, "use --pooling-type and --normalize"),
    CompatFlag(("--logits-processor-pattern",), refused, _NO_PLUGIN),
    CompatFlag(("--logits-processors",), refused, _NO_PLUGIN, "list"),
    CompatFlag(("--model-impl",), only("auto", "vllm"), "jaxllm's own model code (Flax NNX) only", default="auto"),
    CompatFlag(("--override-attention-dtype",), refused, "attention runs in --dtype (the KV cache in "
               "--kv-cache-dtype)"),
    CompatFlag(("--io-processor-plugin",), refused, _NO_PLUGIN),
    # ----- loading (LoadConfig) ------------------------------------------------------------------
    CompatFlag(("--download-dir",), ignored, _IGN_DL),
    CompatFlag(("--safetensors-load-strategy",), ignored, "safetensors files are memory-mapped", default="lazy"),
    CompatFlag(("--model-loader-extra-config",), refused, "no loader options"),
    CompatFlag(("--ignore-patterns",), ignored, "only the weight files the model needs are read", "list"),
    CompatFlag(("--use-tqdm-on-load",), ignored, "no progress bar", "bool", default="on"),
    CompatFlag(("--pt-load-map-location",), ignored, "no PyTorch .bin/.pt weights", default="cpu"),
    # ----- structured outputs ----------------------------------------------------------------------
    CompatFlag(("--structured-outputs-config",), ignored, _IGN_SO),
    CompatFlag(("--guided-decoding-backend",), ignored, _IGN_SO),
    CompatFlag(("--guided-decoding-disable-fallback",), ignored, _IGN_SO, "bool", default="off"),
    CompatFlag(("--guided-decoding-disable-any-whitespace",), ignored, "JSON is generated without free whitespace",
               "bool", default="off"),
    CompatFlag(("--guided-decoding-disable-additional-properties",), refused_when_on,
               "put additionalProperties: false in the schema", "bool", default="off"),
    # ----- parallelism (ParallelConfig) ---------------------------------------------------------------
    CompatFlag(("--distributed-executor-backend",), ignored, _IGN_DIST),
    CompatFlag(("--pipeline-parallel-size", "-pp"), only(1), "no pipeline parallelism: shard over devices with "
               "--tensor-parallel-size", type=int, default="1"),
    CompatFlag(("--decode-context-parallel-size", "-dcp"), only(1), "no context parallelism", type=int,
               default="1"),
    CompatFlag(("--data-parallel-size", "-dp"), only(1), "no data parallelism: run one server per replica behind "
               "a load balancer", type=int, default="1"),
    CompatFlag(("--data-parallel-size-local", "-dpl"), only(1), "no data parallelism", type=int),
    CompatFlag(("--data-parallel-rank", "-dpn"), refused, "no data parallelism", type=int),
    CompatFlag(("--data-parallel-start-rank", "-dpr"), refused, "no data parallelism", type=int),
    CompatFlag(("--data-parallel-address", "-dpa"), refused, "no data parallelism (multi-host: "
               "--coordinator-address)"),
    CompatFlag(("--data-parallel-rpc-port", "-dpp"), refused, "no data parallelism", type=int),
    CompatFlag(("--data-parallel-backend", "-dpb"), ignored, "no data parallelism", default="mp"),
    CompatFlag(("--data-parallel-hybrid-lb",), refused_when_on, "no data parallelism", "bool", default="off"),
    CompatFlag(("--data-parallel-external-lb",), refused_when_on, "no data parallelism", "bool", default="off"),
    CompatFlag(("--all2all-backend",), ignored, _IGN_DIST),
    CompatFlag(("--enable-dbo",), ignored_when_on, "no dual-batch overlap", "bool", default="off"),
    CompatFlag(("--dbo-decode-token-threshold",), ignored, "no dual-batch overlap", type=int, default="32"),
    CompatFlag(("--dbo-prefill-token-threshold",), ignored, "no dual-batch overlap", type=int, default="512"),
    CompatFlag(("--disable-nccl-for-dp-synchronization",), ignored, _IGN_DIST, "bool", default="off"),
    CompatFlag(("--enable-eplb",), ignored_when_on, _IGN_EPLB, "bool", default="off"),
    CompatFlag(("--eplb-config",), ignored, _IGN_EPLB),
    CompatFlag(("--expert-placement-strategy",), ignored, _IGN_EPLB, default="linear"),
    CompatFlag(("--num-redundant-experts",), ignored, _IGN_EPLB, type=int),
    CompatFlag(("--eplb-window-size",), ignored, _IGN_EPLB, type=int),
    CompatFlag(("--eplb-step-interval",), ignored, _IGN_EPLB, type=int),
    CompatFlag(("--eplb-log-balancedness",), ignored, _IGN_EPLB, "bool", default="off"),
    CompatFlag(("--max-parallel-loading-workers",), ignored, "weights load in one process", type=int),
    CompatFlag(("--ray-workers-use-nsight",), ignored, _IGN_DIST, "bool", default="off"),
    CompatFlag(("--disable-custom-all-reduce",), ignored_when_on, "collectives are XLA's", "bool", default="off"),
    CompatFlag(("--worker-cls",), refused, _NO_PLUGIN, default="auto"),
    CompatFlag(("--worker-extension-cls",), refused, _NO_PLUGIN),
    CompatFlag(("--enable-multimodal-encoder-data-parallel",), ignored, _IGN_MM, "bool", default="off"),
    # ----- KV cache (CacheConfig) ------------------------------------------------------------------------
    CompatFlag(("--swap-space",), ignored, "a preempted request is recomputed, never swapped to host memory",
               type=float, default="4"),
    CompatFlag(("--cpu-offload-gb",), only(0.0), "weights stay on the device: no CPU offload", type=float,
               default="0"),
    CompatFlag(("--num-gpu-blocks-override",), refused, "size the KV cache with --kv-cache-memory-bytes",
               type=int),
    CompatFlag(("--prefix-caching-hash-algo",), ignored, "one block hash (jaxllm/core/block_pool.py)",
               default="sha256"),
    CompatFlag(("--kv-sharing-fast-prefill",), ignored_when_on, "no cross-layer KV sharing", "bool", default="off"),
    CompatFlag(("--mamba-cache-dtype",), ignored, "no Mamba models", default="auto"),
    CompatFlag(("--mamba-ssm-cache-dtype",), ignored, "no Mamba models", default="auto"),
    CompatFlag(("--mamba-block-size",), ignored, "no Mamba models", type=int),
    # ----- multimodal (MultiModalConfig) -----------------------------------------------------------------
    *(CompatFlag((f,), ignored, _IGN_MM, kind) for f, kind in (
        ("--limit-mm-per-prompt", "value"), ("--enable-mm-embeds", "bool"), ("--media-io-kwargs", "value"),
        ("--mm-processor-kwargs", "value"), ("--mm-processor-cache-gb", "value"),
        ("--disable-mm-preprocessor-cache", "bool"), ("--mm-processor-cache-type", "value"),
        ("--mm-shm-cache-max-object-size-mb", "value"), ("--mm-encoder-tp-mode", "value"),
        ("--mm-encoder-attn-backend", "value"), ("--interleave-mm-strings", "bool"),
        ("--skip-mm-profiling", "bool"), ("--video-pruning-rate", "value"))),
    # ----- LoRA (LoRAConfig) -----------------------------------------------------------------------------
    CompatFlag(("--lora-extra-vocab-size",), ignored, "adapters do not extend the vocabulary", type=int,
               default="256"),
    CompatFlag(("--lora-dtype",), ignored, "adapters run in the model's --dtype", default="auto"),
    CompatFlag(("--fully-sharded-loras",), ignored_when_on, "adapters are replicated on every device", "bool",
               default="off"),
    CompatFlag(("--default-mm-loras",), ignored, _IGN_MM),
    # ----- observability -----------------------------------------------------------------------------------
    CompatFlag(("--show-hidden-metrics-for-version",), ignored, "no hidden (deprecated) metrics: /metrics has "
               "jaxllm's series"),
    CompatFlag(("--otlp-traces-endpoint",), refused, "no OpenTelemetry tracing"),
    CompatFlag(("--collect-detailed-traces",), refused, "no OpenTelemetry tracing", "list"),
    CompatFlag(("--aggregate-engine-logging",), ignored, "one engine", "bool", default="off"),
    # ----- scheduler (SchedulerConfig) --------------------------------------------------------------------
    # vLLM V1 refuses any value but 1 ("Concurrent Partial Prefill is not supported"; EngineArgs.
    # _check_feature_supported) and later releases dropped both flags: refused here too
    CompatFlag(("--max-num-partial-prefills",), only(1), "no concurrent partial prefill (vLLM V1 refuses it "
               "too): prompts are prefilled in arrival order within the token budget, each chunk capped by "
               "--long-prefill-token-threshold", type=int, default="1"),
    CompatFlag(("--max-long-partial-prefills",), only(1), "no concurrent partial prefill (vLLM V1 refuses it "
               "too); cap long prompts' chunks with --long-prefill-token-threshold", type=int, default="1"),
    CompatFlag(("--num-lookahead-slots",), ignored, "speculative decoding sizes its own slots "
               "(--speculative-config)", type=int, default="0"),
    CompatFlag(("--enable-chunked-prefill",), ok_when_on, "chunked prefill is always on (a prompt longer "
               "than --max-num-batched-tokens is prefilled in chunks)", "bool", default="on"),
    CompatFlag(("--disable-chunked-mm-input",), ignored, _IGN_MM, "bool", default="off"),
    CompatFlag(("--scheduler-cls",), refused, _NO_PLUGIN),
    # older vLLM (V0) scheduler / runner flags still in many launch scripts
    CompatFlag(("--num-scheduler-steps",), ignored, "one scheduling step per engine step (async scheduling "
               "overlaps host and device)", type=int, default="1"),
    CompatFlag(("--use-v2-block-manager",), ignored, "one KV cache manager", "bool", default="on"),
    CompatFlag(("--disable-async-output-proc",), ignored, "see --async-scheduling", "bool", default="off"),
    CompatFlag(("--max-seq-len-to-capture",), ignored, _IGN_CUDA, type=int, default="8192"),
    CompatFlag(("--preemption-mode",), only("recompute"), "preempted requests are recomputed, never swapped",
               default="recompute"),
    CompatFlag(("--device",), only("auto", otherwise=IGNORED), "JAX picks the backend (JAX_PLATFORMS)",
               default="auto"),
    # ----- compilation ----------------------------------------------------------------------------------
    CompatFlag(("--cudagraph-capture-sizes", "--cuda-graph-sizes"), ignored, _IGN_CUDA, "list"),
    CompatFlag(("--max-cudagraph-capture-size",), ignored, _IGN_CUDA, type=int),
    CompatFlag(("--compilation-config", "-O"), ignored, "XLA compiles the model; no torch.compile levels"),
    # ----- vLLM config ------------------------------------------------------------------------------------
    CompatFlag(("--kv-transfer-config",), refused, "no KV connectors (disaggregated prefill/decode)"),
    CompatFlag(("--kv-events-config",), refused, "no KV cache event publishing"),
    CompatFlag(("--additional-config",), ignored, "no platform-specific options"),
)


class _HelpVllmFlags(argparse.Action):
    """``--help-vllm-flags``: the TABLE flags' help (hidden from ``--help``, which stays jaxllm's own
    flags: the table is ~150 flags), then exit 0."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        p = argparse.ArgumentParser(prog=parser.prog, add_help=False, usage=argparse.SUPPRESS)
        _add_table(p, shown=True)
        p.print_help()
        parser.exit()


def add_compat_args(p: argparse.ArgumentParser) -> None:
    """Every TABLE flag, hidden from --help (``--help-vllm-flags`` lists them); an absent flag leaves
    no attribute (SUPPRESS)."""
    p.add_argument("--help-vllm-flags", action=_HelpVllmFlags,
                   help=f"list vLLM's serve flags accepted without a jaxllm flag of their own ({len(TABLE)}: "
                        "honoured, ignored with an INFO line, or refused by name) and exit (default: off)")
    _add_table(p, shown=False)


def _add_table(p: argparse.ArgumentParser, shown: bool) -> None:
    g = p.add_argument_group(
        "vLLM's serve flags without a jaxllm counterpart (serving/README.md, \"vLLM's serve flags: where we stand\")",
        "accepted for vLLM launch commands: a value jaxllm does anyway is silent, a meaningless one is named "
        "in one INFO line at start, one that needs a capability jaxllm lacks stops the start (exit 2)")
    for f in TABLE:
        kw: dict[str, Any] = dict(dest=f.dest, default=argparse.SUPPRESS)
        if f.kind == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = f.type
            kw["metavar"] = "VALUE"
            if f.kind == "list":
                kw["nargs"] = "+"
        what = {OK: "honoured", IGNORED: "ignored", REFUSED: "refused"}
        verdicts = sorted({f.verdict(v) for v in _probe_values(f)}, key=list(what).index)
        kw["help"] = (f"vLLM's flag; {' / '.join(verdicts)} here: {f.why} (vLLM's default: {f.default})"
                      if shown else argparse.SUPPRESS)
        g.add_argument(*f.flags, **kw)


def _probe_values(f: CompatFlag) -> list[Any]:
    """A few values to tell the help which verdicts a flag can get (bools: on and off)."""
    if f.kind == "bool":
        return [True, False]
    return [object(), *(v for v in (0, 1, 0.0, "auto", "hf", "vllm", "none", "generate", "string",
                                    "raw_logprobs", "recompute") if f.verdict(v) == OK)]


def compat_verdicts(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(ignored, refused): one ``--flag=value (why)`` / ``--flag=value is not supported: why`` entry
    per TABLE flag given on the command line; honoured values appear in neither."""
    ignored_, refused_ = [], []
    for f in TABLE:
        if not hasattr(args, f.dest):
            continue
        value = getattr(args, f.dest)
        verdict = f.verdict(value)
        shown = _shown(f, value)
        if verdict == IGNORED:
            ignored_.append(f"{shown} ({f.why})")
        elif verdict == REFUSED:
            refused_.append(f"{shown} is not supported by jaxllm: {f.why}")
    return ignored_, refused_


def _shown(f: CompatFlag, value: Any) -> str:
    if f.kind == "bool":
        return f.name if value else "--no-" + f.name[2:]
    if isinstance(value, list):
        value = " ".join(map(str, value))
    return f"{f.name}={value}"


def check_compat(args: argparse.Namespace) -> list[str]:
    """The ignored entries (for the start-up INFO line); ValueError (one line) on the first refused one."""
    ignored_, refused_ = compat_verdicts(args)
    if refused_:
        raise ValueError(refused_[0])
    return ignored_
