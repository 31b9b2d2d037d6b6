"""Server settings (no jax). One msgspec Struct filled by the CLI or by tests."""

from __future__ import annotations

import msgspec

from jaxllm.metrics.loggers import validate_interval

GENERATION_SERVICE = "jaxllm.v1.Generation"
UVICORN_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


class ServerConfig(msgspec.Struct, kw_only=True):
    host: str = "127.0.0.1"
    port: int = 50051  # 0 = pick a free port (``ServingServer.port`` tells which)
    http_port: int | None = None  # OpenAI-compatible HTTP API; None = off, 0 = any free port
    served_model_name: str | None = None  # the HTTP API's model id (default: the --model value)
    # vLLM's further --served-model-name names: a request may name any of them (/v1/models lists each);
    # answers report served_model_name, the first
    served_model_aliases: tuple[str, ...] = ()
    api_key: str | tuple[str, ...] | None = None  # one key or several (any is accepted; serving/api_keys.py)
    tls_cert: str | None = None  # PEM paths; both or neither
    tls_key: str | None = None
    tls_client_ca: str | None = None  # PEM CA bundle: require client certificates (mutual TLS)
    # admission and caps
    max_queued_requests: int = 256  # waiting (not yet scheduled) requests before RESOURCE_EXHAUSTED
    max_n: int = 16
    max_tokens_cap: int | None = None  # None = max_model_len
    max_logprobs: int = 20
    max_stop_strings: int = 16
    max_message_bytes: int = 4 * 1024 * 1024
    max_request_id_len: int = 256
    # vLLM's --enable-request-id-headers: every HTTP answer carries X-Request-Id, the server's id when
    # the client sent none (serving/request_ids.py); off: only a client's X-Request-Id comes back
    enable_request_id_headers: bool = False
    # vLLM's endpoints behind a flag (serving/openai_server_info.py): GET /tokenizer_info; /load's
    # count of generation/pooling requests in flight (without the flag /load answers 0)
    enable_tokenizer_info_endpoint: bool = False
    enable_server_load_tracking: bool = False
    # chat (OpenAI HTTP API): --chat-template's text (None = the model's), request templates, tool calling
    chat_template: str | None = None
    trust_request_chat_template: bool = False  # let a request's chat_template replace the template
    enable_auto_tool_choice: bool = False  # tool_choice "auto" (needs tool_call_parser)
    tool_call_parser: str | None = None  # serving/tool_parsers name for "auto" (hermes, ...)
    reasoning_parser: str | None = None  # serving/reasoning_parsers name (deepseek_r1, qwen3); None = off
    # answers (vLLM's flags; serving/chat_args.py)
    exclude_tools_when_tool_choice_none: bool = False  # tool_choice "none": tools left out of the template
    response_role: str = "assistant"  # the chat answer's role when add_generation_prompt (else the last message's)
    default_chat_template_kwargs: dict | None = None  # chat template variables under each request's own
    return_tokens_as_token_ids: bool = False  # the request field's default (logprob tokens as "token_id:N")
    enable_prompt_tokens_details: bool = False  # usage.prompt_tokens_details.cached_tokens (prefix-cache hits)
    enable_force_include_usage: bool = False  # a stream's usage chunk even without stream_options.include_usage
    enable_log_requests: bool = False  # one INFO line per admitted request (prompt clipped to max_log_len)
    max_log_len: int | None = None  # prompt characters / token ids in that line; None = all
    # the HTTP door (vLLM's flags; serving/http_args.py)
    root_path: str = ""  # FastAPI root_path: the path prefix of a path-routing proxy in front
    allowed_origins: tuple[str, ...] = ("*",)  # CORS (Starlette's CORSMiddleware), vLLM's defaults
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False
    fastapi_docs: bool = True  # /docs, /redoc, /openapi.json (--disable-fastapi-docs turns them off)
    uvicorn_log_level: str | None = None  # None = the --log-level
    h11_max_incomplete_event_size: int | None = None  # uvicorn's limit on a header block; None = uvicorn's
    # LoRA adapters served from the start (``--lora-modules name=path ...``; needs enable_lora)
    lora_modules: tuple[tuple[str, str], ...] = ()
    # metrics
    metrics_port: int | None = None  # Prometheus text on this port (0 = any free port); None = off
    log_stats: bool = True  # the periodic stats line on the log (``--disable-log-stats`` turns it off)
    log_stats_interval: float = 10.0  # seconds between stats lines
    # lifecycle
    shutdown_timeout: float = 30.0  # SIGTERM: how long in-flight requests may run on
    stream_timeout: float = 30.0  # a stream whose client reads nothing this long is aborted (0 = never)
    watchdog_timeout: float = 30.0  # no loop heartbeat (or failed probe, no progress) this long -> NOT_SERVING
    health_probe_interval: float = 10.0  # seconds between synthetic 1-token requests
    engine_death_grace: float = 1.0  # after the engine dies: keep answering (INTERNAL/NOT_SERVING) this long, then exit 1

    def model_names(self, model: str) -> tuple[str, ...]:
        """Every name a request may give the served model (``model``: the --model value, the name
        when --served-model-name is unset); the first is the one answers report."""
        return (self.served_model_name or model, *self.served_model_aliases)

    def validate(self) -> "ServerConfig":
        for name in ("max_queued_requests", "max_n", "max_logprobs", "max_stop_strings",
                     "max_message_bytes", "max_request_id_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name in (
                    "max_logprobs", "max_stop_strings") else 1):
                raise ValueError(f"{name}={v!r} is invalid: must be a positive integer")
        if self.max_tokens_cap is not None and self.max_tokens_cap < 1:
            raise ValueError(f"max_tokens_cap={self.max_tokens_cap!r} is invalid: must be >= 1")
        for name in ("shutdown_timeout", "watchdog_timeout", "health_probe_interval",
                     "engine_death_grace"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v < 0 or (v == 0 and name != "engine_death_grace"
                                                             and name != "shutdown_timeout"):
                raise ValueError(f"{name}={v!r} is invalid: must be > 0")
        v = self.stream_timeout
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
            raise ValueError(f"stream_timeout={v!r} is invalid: must be >= 0 (0 = never)")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert/tls_key are invalid: give both or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError(f"tls_client_ca={self.tls_client_ca!r} is invalid without tls_cert/"
                             f"tls_key: mutual TLS needs the server's own certificate")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port={self.port} is invalid: must be in [0, 65535]")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ValueError(f"metrics_port={self.metrics_port} is invalid: must be in [0, 65535]")
        validate_interval(self.log_stats_interval)
        served = [n for n in (self.served_model_name, *self.served_model_aliases) if n is not None]
        if self.served_model_aliases and self.served_model_name is None:
            raise ValueError(f"served_model_aliases={list(self.served_model_aliases)} is invalid without "
                             "served_model_name: the first --served-model-name is the one answers report")
        if any(not isinstance(n, str) or not n for n in served) or len(set(served)) != len(served):
            raise ValueError(f"served_model_name={served} is invalid: names must be non-empty and distinct")
        from serving.api_keys import key_ring  # no jax

        key_ring(self.api_key)  # "api_key #2 of 3 is invalid: ..." (never the key itself); empty keys dropped
        names = [m[0] for m in self.lora_modules]
        for name, path in self.lora_modules:
            if not name or not path:
                raise ValueError(f"lora_modules entry {name}={path} is invalid: need name=path, both non-empty")
        if len(set(names)) != len(names):
            raise ValueError(f"lora_modules={names} is invalid: adapter names must be unique")
        clash = sorted(set(names) & set(served))
        if clash:
            raise ValueError(f"lora_modules name {clash[0]!r} is invalid: it is a --served-model-name")
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            raise ValueError("enable_auto_tool_choice=True is invalid without tool_call_parser: name the "
                             "parser that reads the model's tool calls (--tool-call-parser)")
        if self.tool_call_parser:
            from serving.openai_tools import check_parser_name  # no jax

            check_parser_name(self.tool_call_parser)
        if self.reasoning_parser is not None:
            from serving.reasoning_parsers import get_parser  # no jax

            get_parser(self.reasoning_parser)  # "reasoning_parser='x' is invalid: must be one of ..."
        if self.max_log_len is not None and (isinstance(self.max_log_len, bool) or self.max_log_len < 0):
            raise ValueError(f"max_log_len={self.max_log_len!r} is invalid: must be >= 0 (unset = no limit)")
        if not self.response_role:
            raise ValueError("response_role='' is invalid: must be a role name such as 'assistant'")
        if self.root_path and (not self.root_path.startswith("/") or self.root_path.endswith("/")):
            raise ValueError(f"root_path={self.root_path!r} is invalid: must start with '/' and not end with "
                             f"one (e.g. '/api')")
        if self.uvicorn_log_level is not None and self.uvicorn_log_level not in UVICORN_LOG_LEVELS:
            raise ValueError(f"uvicorn_log_level={self.uvicorn_log_level!r} is invalid: must be one of "
                             f"{', '.join(UVICORN_LOG_LEVELS)}")
        if self.http_port is not None and not 0 <= self.http_port < 65536:
            raise ValueError(f"http_port={self.http_port} is invalid: must be in [0, 65535]")
        return self
