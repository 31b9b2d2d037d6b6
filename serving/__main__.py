"""``python -m serving --model smollm2-135m --host 127.0.0.1 --port 50051 [engine flags]``.

Engine flags are ``jaxllm.generate``'s (``jaxllm/cli_args.py``); they fill
``jaxllm.config.EngineConfig`` and the engine is built by
``jaxllm.engine.factory.build_engine(config)`` on the engine thread (the port is open and health
says NOT_SERVING while the model loads and compiles).

Once bound, machine-readable lines go to stdout: ``serving: listening grpc=HOST:PORT``, with
``--http-port`` ``serving: listening http=HOST:PORT`` (the OpenAI API), and with
``--metrics-port`` ``serving: listening metrics=HOST:PORT``.
Logs (``--log-level``, default info) go to stderr.

Test hook (not for production): ``--model fake:<k=v,...>`` serves the deterministic fake engine
from ``tests/fakes/fake_engine.py`` (needs the repository root on ``sys.path``, i.e. run from
the checkout), e.g. ``--model fake:step_delay=0.02,max_num_seqs=4,fail_at_step=50``.

Exit codes: 0 after a SIGTERM/SIGINT drain (a second SIGINT aborts in-flight requests at once;
a repeated SIGTERM is ignored); 1 when the engine died (step raised), failed to start, or the
port could not be bound; 2 for bad flags (values, a model that does not resolve, TLS files).
Every start-up failure is one ``error: ...`` line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Any, Callable

from jaxllm.cli_args import (ArgumentParser, add_engine_args, add_log_level_arg, api_key_from_env,
                             configure_logging, engine_config_from_args, parse_lora_module)
from serving.config import ServerConfig
from serving.chat_args import add_chat_args, chat_fields_from_args
from serving.http_args import add_http_args, http_fields_from_args
from serving.tls import check_tls_files
from serving.vllm_flags import add_compat_args, check_compat

log = logging.getLogger("serving")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m serving", description="jaxllm gRPC server (jaxllm.v1.Generation)")
    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="the model to serve, as in vLLM's `vllm serve MODEL` (the same as --model; default: "
                        "--model's)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind")
    p.add_argument("--port", type=int, default=50051,
                   help="port to bind; 0 = any free port (the bound one is printed on stdout)")
    p.add_argument("--http-port", type=int, default=None,
                   help="also serve the OpenAI-compatible HTTP API on this port (default: off; "
                        "0 = any free port, printed on stdout)")
    p.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="model ids of the HTTP API, as vLLM's: a request's 'model' may be any of them, "
                        "/v1/models lists each, answers report the first (default: --model)")
    add_log_level_arg(p)
    p.add_argument("--log-config-file", default=None, metavar="JSON_FILE",
                   help="a logging.config.dictConfig JSON file applied after --log-level (vLLM's flag; its "
                        "VLLM_LOGGING_CONFIG_PATH format; default: none)")
    add_engine_args(p)
    p.add_argument("--lora-modules", type=parse_lora_module, nargs="+", action="extend", default=None,
                   metavar="NAME=PATH",
                   help="LoRA adapters served from the start, each a name and a PEFT directory; a request "
                        "picks one by name (gRPC lora_name, HTTP model); implies --enable-lora (default: none)")
    from jaxllm.parallel.cli import add_distributed_args  # argparse only: no jax

    add_distributed_args(p)
    s = p.add_argument_group("server")
    d = ServerConfig()
    s.add_argument("--max-queued-requests", type=int, default=d.max_queued_requests,
                   help="waiting requests before new ones get RESOURCE_EXHAUSTED")
    s.add_argument("--api-key", nargs="+", default=api_key_from_env(), metavar="KEY",
                   help="require 'authorization: Bearer <key>' with any of these keys on every RPC and HTTP "
                        "request but health, /load, /metrics and /version (several: key rotation, as vLLM; "
                        "default: $JAXLLM_API_KEY, else $VLLM_API_KEY, else none)")
    s.add_argument("--tls-cert", "--ssl-certfile",
                   help="PEM certificate chain, with --tls-key; gRPC and HTTP (default: plaintext)")
    s.add_argument("--tls-key", "--ssl-keyfile", help="PEM private key, with --tls-cert (default: plaintext)")
    s.add_argument("--tls-client-ca",
                   help="PEM CA certificates: require a client certificate signed by one of them "
                        "(mutual TLS, gRPC and HTTP; needs --tls-cert/--tls-key; default: none, no client "
                        "certificate asked for)")
    s.add_argument("--stream-timeout", type=float, default=d.stream_timeout,
                   help="abort a response stream whose client has read nothing for this many "
                        "seconds (frees its KV blocks; 0 = never)")
    s.add_argument("--shutdown-timeout", type=float, default=d.shutdown_timeout,
                   help="seconds in-flight requests may run after SIGTERM")
    s.add_argument("--watchdog-timeout", type=float, default=d.watchdog_timeout,
                   help="no engine heartbeat / probe progress for this many seconds -> NOT_SERVING")
    s.add_argument("--health-probe-interval", type=float, default=d.health_probe_interval,
                   help="seconds between synthetic 1-token requests")
    s.add_argument("--max-n", type=int, default=d.max_n, help="largest n a request may ask for")
    s.add_argument("--max-tokens-cap", type=int, default=None,
                   help="largest max_tokens a request may ask for (default: max_model_len)")
    s.add_argument("--max-logprobs", type=int, default=d.max_logprobs,
                   help="largest logprobs / prompt_logprobs a request may ask for")
    s.add_argument("--max-stop-strings", type=int, default=d.max_stop_strings,
                   help="most stop strings per request")
    s.add_argument("--max-message-bytes", type=int, default=d.max_message_bytes,
                   help="largest request message (gRPC) or body (HTTP, else 413) in bytes")
    s.add_argument("--max-request-id-len", type=int, default=d.max_request_id_len,
                   help="longest client request id (gRPC request_id, HTTP X-Request-Id / body request_id) "
                        "in characters")
    s.add_argument("--enable-request-id-headers", action="store_true",
                   help="every HTTP answer carries an X-Request-Id header: the client's, else the id the "
                        "server gave the request (vLLM's flag; default: off, only a client's X-Request-Id "
                        "comes back)")
    add_chat_args(p)
    add_http_args(p)
    m = p.add_argument_group("metrics")
    m.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics (jaxllm:*) on this port; 0 = any free port (the bound "
                        "one is printed on stdout) (default: off)")
    m.add_argument("--disable-log-stats", action="store_true",
                   help="no periodic stats line (throughput, queue, KV cache, prefix cache) on the log "
                        "(default: logged)")
    m.add_argument("--log-stats-interval", type=float, default=d.log_stats_interval,
                   help="seconds between stats lines")
    add_compat_args(p)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """build_parser's parse, with vLLM's positional model (`python -m serving MODEL`) as --model."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.model_tag is not None:
        given = [a for a in (sys.argv[1:] if argv is None else argv) if a == "--model" or a.startswith("--model=")]
        if given and args.model != args.model_tag:
            p.error(f"argument MODEL: {args.model_tag!r} is invalid with --model {args.model!r}: give the model once")
        args.model = args.model_tag
    return args


def _several(values: Any) -> tuple[str, ...]:
    """A flag vLLM lets repeat (``--api-key k1 k2``): unset (None), one value from the environment
    (a str), or the command line's list, as a tuple."""
    if values is None:
        return ()
    return (values,) if isinstance(values, str) else tuple(values)


def server_config(args: argparse.Namespace) -> ServerConfig:
    http, _ = http_fields_from_args(args)
    return ServerConfig(
        host=args.host, port=args.port, http_port=args.http_port,
        served_model_name=(_several(args.served_model_name) or (None,))[0],
        served_model_aliases=_several(args.served_model_name)[1:],
        api_key=tuple(k for k in _several(args.api_key) if k) or None, tls_cert=args.tls_cert, tls_key=args.tls_key,
        stream_timeout=args.stream_timeout, max_queued_requests=args.max_queued_requests,
        shutdown_timeout=args.shutdown_timeout, watchdog_timeout=args.watchdog_timeout,
        health_probe_interval=args.health_probe_interval, max_n=args.max_n,
        max_tokens_cap=args.max_tokens_cap, max_logprobs=args.max_logprobs,
        max_stop_strings=args.max_stop_strings, max_message_bytes=args.max_message_bytes,
        max_request_id_len=args.max_request_id_len, enable_request_id_headers=args.enable_request_id_headers,
        metrics_port=args.metrics_port, log_stats=not args.disable_log_stats,
        log_stats_interval=args.log_stats_interval,
        lora_modules=tuple(args.lora_modules or ()),
        **chat_fields_from_args(args), **http,
    ).validate()


def apply_log_config(path: str) -> None:
    """--log-config-file: ``logging.config.dictConfig`` of the JSON file; ValueError in one line."""
    import json
    import logging.config

    try:
        with open(path, encoding="utf-8") as f:
            logging.config.dictConfig(json.load(f))
    except (OSError, ValueError, TypeError, AttributeError, ImportError) as exc:
        raise ValueError(f"--log-config-file={path} is invalid: {type(exc).__name__}: {exc}") from None


_HTTP_ONLY = ("root_path", "allowed_origins", "allowed_methods", "allowed_headers", "allow_credentials",
              "fastapi_docs", "uvicorn_log_level", "h11_max_incomplete_event_size", "enable_prompt_tokens_details",
              "enable_force_include_usage", "return_tokens_as_token_ids", "enable_request_id_headers",
              "enable_tokenizer_info_endpoint", "enable_server_load_tracking")


def http_only_flags(cfg: ServerConfig) -> list[str]:
    """The flags set away from their defaults that only the HTTP door reads (as --flag-names)."""
    d = ServerConfig()
    flags = {"fastapi_docs": "--disable-fastapi-docs"}
    return [flags.get(f, "--" + f.replace("_", "-")) for f in _HTTP_ONLY if getattr(cfg, f) != getattr(d, f)]


def engine_factory(args: argparse.Namespace) -> Callable[[], Any]:
    model = args.model
    if model == "fake" or model.startswith("fake:"):
        def build_fake():
            from tests.fakes.fake_engine import build_fake_engine  # test hook
            return build_fake_engine(model.partition(":")[2])
        return build_fake

    from checkpoints.loader import check_overrides, resolve  # no jax: finds the files or names what is missing

    config = engine_config_from_args(args).validate()  # bad flags fail here, before the port opens
    check_overrides(*resolve(config.model, config.load_format), config.hf_overrides)
    from jaxllm.engine.factory import generation_defaults

    generation_defaults(config, flags=True)  # a bad value in the generation config too (its files only)

    def build_real():
        from jaxllm.engine.factory import build_engine
        from jaxllm.engine.gc_heap import freeze_startup_heap

        engine = build_engine(config)
        freeze_startup_heap()  # full collections then skip the start-up heap (gc_heap.py)
        return engine
    return build_real


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve(cfg: ServerConfig, factory: Callable[[], Any]) -> int:
    from serving.server import ServingServer

    server = ServingServer(cfg, engine_factory=factory)
    try:
        port = await server.start()
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    print(f"serving: listening grpc={_address(cfg.host, port)}", flush=True)
    if server.http_port is not None:
        print(f"serving: listening http={_address(cfg.host, server.http_port)}", flush=True)
    if server.metrics.port is not None:
        print(f"serving: listening metrics={_address(cfg.host, server.metrics.port)}", flush=True)
    loop = asyncio.get_running_loop()
    signals = {"n": 0}

    def on_signal(signum: int) -> None:
        signals["n"] += 1
        name = signal.Signals(signum).name
        if signals["n"] == 1:
            server._spawn(server.drain(f"{name} received"))
        elif signum == signal.SIGINT:  # Ctrl-C again: stop waiting for in-flight requests
            log.warning("serving: %s again: aborting in-flight requests now", name)
            server._spawn(server.stop(exit_code=0))
        else:  # repeated SIGTERM (wrappers such as `timeout` forward it twice): keep draining
            log.warning("serving: %s again: already draining", name)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    code = await server.wait()
    if server.start_error is not None:
        exc = server.start_error
        print(f"error: engine failed to start: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level)
    if args.log_level != "debug":  # gRPC C-core's own E-lines (e.g. a failed bind) repeat our error
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    try:
        if args.log_config_file:
            apply_log_config(args.log_config_file)
        ignored = check_compat(args) + http_fields_from_args(args)[1]  # a refused vLLM flag: ValueError
        cfg = server_config(args)
        if ignored:
            log.info("serving: vLLM flags ignored: %s", "; ".join(ignored))
        unused = http_only_flags(cfg) if cfg.http_port is None else []
        if unused:  # a vLLM launch line: its --port is the HTTP port, ours gRPC's
            log.warning("serving: %s set the OpenAI HTTP API, which is off: give --http-port (--port %d is gRPC's; "
                        "vLLM's --port is its HTTP port)", ", ".join(unused), cfg.port)
        check_tls_files(cfg)
        from jaxllm.parallel.cli import run_follower, start_distributed

        if not start_distributed(args):  # multi-host, processes > 0: no server, run process 0's steps
            run_follower(engine_config_from_args(args).validate())
            return 0
        factory = engine_factory(args)
    except ValueError as exc:  # CheckpointError is one
        print(f"error: {exc}", file=sys.stderr)
        return 2
    code = asyncio.run(serve(cfg, factory))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # a wedged engine thread (or native threads of the runtime) must not keep us alive
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
