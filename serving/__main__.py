"""``python -m serving --model smollm2-135m --host 127.0.0.1 --port 50051 [engine flags]``.

Engine flags carry the names of ``jaxllm.generate``'s; they fill ``jaxllm.config.EngineConfig``
and the engine is built by ``jaxllm.engine.factory.build_engine(config)`` on the engine thread
(the port is open and health says NOT_SERVING while the model loads and compiles).

Test hook (not for production): ``--model fake:<k=v,...>`` serves the deterministic fake engine
from ``tests/fakes/fake_engine.py`` (needs the repository root on ``sys.path``, i.e. run from
the checkout), e.g. ``--model fake:step_delay=0.02,max_num_seqs=4,fail_at_step=50``.

Exit codes: 0 after a SIGTERM/SIGINT drain (a second SIGINT aborts in-flight requests at once;
a repeated SIGTERM is ignored); 1 when the engine died (step raised) or failed to
start; 2 for bad flags.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Any, Callable

from serving.config import ServerConfig

log = logging.getLogger("serving")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serving",
                                description="jaxllm gRPC server (jaxllm.v1.Generation)")
    p.add_argument("--model", required=True, help="model name or path (e.g. smollm2-135m)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=50051, help="0 = any free port (printed at start)")
    e = p.add_argument_group("engine (same names as jaxllm.generate)")
    e.add_argument("--max-model-len", type=int)
    e.add_argument("--max-num-seqs", type=int)
    e.add_argument("--max-num-batched-tokens", type=int)
    e.add_argument("--block-size", type=int)
    e.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None)
    e.add_argument("--kv-cache-memory-bytes", type=int)
    e.add_argument("--gpu-memory-utilization", type=float)
    e.add_argument("--tensor-parallel-size", type=int)
    e.add_argument("--dtype")
    e.add_argument("--load-format")
    e.add_argument("--seed", type=int)
    e.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None)
    from jaxllm.parallel.cli import add_distributed_args  # argparse only: no jax

    add_distributed_args(p)
    s = p.add_argument_group("server")
    d = ServerConfig()
    s.add_argument("--max-queued-requests", type=int, default=d.max_queued_requests,
                   help="waiting requests before new ones get RESOURCE_EXHAUSTED")
    s.add_argument("--api-key", default=os.environ.get("JAXLLM_API_KEY"),
                   help="require 'authorization: Bearer <key>' (default: $JAXLLM_API_KEY)")
    s.add_argument("--tls-cert", help="PEM certificate chain (with --tls-key)")
    s.add_argument("--tls-key", help="PEM private key (with --tls-cert)")
    s.add_argument("--shutdown-timeout", type=float, default=d.shutdown_timeout,
                   help="seconds in-flight requests may run after SIGTERM")
    s.add_argument("--watchdog-timeout", type=float, default=d.watchdog_timeout,
                   help="no engine heartbeat / probe progress this long -> NOT_SERVING")
    s.add_argument("--health-probe-interval", type=float, default=d.health_probe_interval,
                   help="seconds between synthetic 1-token requests")
    s.add_argument("--max-n", type=int, default=d.max_n)
    s.add_argument("--max-tokens-cap", type=int, default=None, help="default: max_model_len")
    s.add_argument("--max-logprobs", type=int, default=d.max_logprobs)
    s.add_argument("--max-stop-strings", type=int, default=d.max_stop_strings)
    s.add_argument("--max-message-bytes", type=int, default=d.max_message_bytes)
    s.add_argument("--log-level", default="INFO")
    return p


_ENGINE_FLAGS = ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size",
                 "enable_prefix_caching", "kv_cache_memory_bytes", "gpu_memory_utilization",
                 "tensor_parallel_size", "dtype", "load_format", "seed", "async_scheduling")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw = {"model": args.model}
    kw.update({k: getattr(args, k) for k in _ENGINE_FLAGS if getattr(args, k) is not None})
    return kw


def server_config(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        host=args.host, port=args.port, api_key=args.api_key or None, tls_cert=args.tls_cert,
        tls_key=args.tls_key, max_queued_requests=args.max_queued_requests,
        shutdown_timeout=args.shutdown_timeout, watchdog_timeout=args.watchdog_timeout,
        health_probe_interval=args.health_probe_interval, max_n=args.max_n,
        max_tokens_cap=args.max_tokens_cap, max_logprobs=args.max_logprobs,
        max_stop_strings=args.max_stop_strings, max_message_bytes=args.max_message_bytes,
    ).validate()


def engine_factory(kw: dict[str, Any]) -> Callable[[], Any]:
    model = kw["model"]
    if model == "fake" or model.startswith("fake:"):
        def build_fake():
            from tests.fakes.fake_engine import build_fake_engine  # test hook
            return build_fake_engine(model.partition(":")[2])
        return build_fake

    from jaxllm.config import EngineConfig
    config = EngineConfig(**kw).validate()  # bad flags fail here, before the port opens

    def build_real():
        from jaxllm.engine.factory import build_engine
        return build_engine(config)
    return build_real


async def serve(cfg: ServerConfig, factory: Callable[[], Any]) -> int:
    from serving.server import ServingServer

    server = ServingServer(cfg, engine_factory=factory)
    port = await server.start()
    print(f"serving: listening on {cfg.host}:{port}", file=sys.stderr, flush=True)
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
    return await server.wait()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = server_config(args)
        from jaxllm.parallel.cli import run_follower, start_distributed

        if not start_distributed(args):  # multi-host, processes > 0: no server, run process 0's steps
            from jaxllm.config import EngineConfig

            run_follower(EngineConfig(**engine_kwargs(args)).validate())
            return 0
        factory = engine_factory(engine_kwargs(args))
    except ValueError as exc:
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
