"""ServingServer: grpc.aio server + AsyncEngine + health + reflection + auth + drain (no jax).

In-process use (tests)::

    server = ServingServer(ServerConfig(port=0), engine=my_engine)      # or engine_factory=...
    port = await server.start()          # listening at once; NOT_SERVING until warm + probed
    await server.wait_serving()          # optional
    ...
    await server.drain()                 # graceful: what SIGTERM does
    code = await server.wait()           # 0 after a drain, 1 after the engine died

Lifecycle: ``start`` binds and serves health right away (NOT_SERVING), starts the engine thread
(build + warm-up happen there) and the health monitor. Engine death: in-flight requests end with
INTERNAL, health turns NOT_SERVING, and after ``engine_death_grace`` seconds the server stops
with exit code 1. ``drain``: NOT_SERVING, new requests UNAVAILABLE, in-flight ones run up to
``shutdown_timeout``, the rest are aborted with UNAVAILABLE, then the server stops (exit code 0).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jaxllm.engine.async_engine import AsyncEngine

from serving.api_keys import key_ring
from serving.auth import ApiKeyInterceptor
from serving.config import GENERATION_SERVICE, ServerConfig
from serving.frontdoor import FrontDoor
from serving.health import HealthMonitor
from serving.metrics import ServingMetrics
from serving.proto.jaxllm.v1 import generation_pb2 as pb
from serving.proto.jaxllm.v1 import generation_pb2_grpc as pb_grpc
from serving.servicer import GenerationServicer
from serving.tls import server_credentials

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["Generation"].full_name,
    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
    reflection.SERVICE_NAME,
)


class ServingServer:
    def __init__(self, config: ServerConfig, *, engine: Any = None,
                 engine_factory: Callable[[], Any] | None = None,
                 warmup: Callable[[Any], None] | None = None,
                 idle_tick: float = 0.05):
        self.config = config.validate()
        self.metrics = ServingMetrics(self.config)  # loggers attach once the engine is warm

        def warm(eng: Any) -> None:  # on the engine thread
            if warmup is not None:
                warmup(eng)
            if self.config.lora_modules:  # a bad adapter fails the start (start_error)
                from serving.frontdoor import config_get

                names = self.config.model_names(str(config_get(eng, "model") or ""))
                self.door.adapters.register_modules(eng, self.config.lora_modules, names)
            self.metrics.attach(eng)
        self.async_engine = AsyncEngine(engine, engine_factory=engine_factory, warmup=warm,
                                        idle_tick=idle_tick)
        self.port: int | None = None
        self.http = None  # serving.openai_api.HttpServer when config.http_port is set
        self.http_port: int | None = None
        self.start_error: BaseException | None = None  # what the engine build / warm-up raised
        self.exit_code: int | None = None
        self.door = FrontDoor(self.config, self.async_engine)  # admission, registry, drain
        self._grpc: grpc.aio.Server | None = None
        self.health_servicer = health.aio.HealthServicer()
        self.servicer = GenerationServicer(self)
        self.monitor = HealthMonitor(config, self.health_servicer, lambda: self.async_engine,
                                     lambda: self.draining, self._probe_token_ids)
        self._done = asyncio.Event()
        self._stopping = False
        self._shutdown_hooks: list[Callable[[], Any]] = []  # other doors (HTTP): awaited at stop
        self._background: set[asyncio.Task] = set()

    # ----- start ----------------------------------------------------------------------
    async def start(self) -> int:
        cfg = self.config
        keys = key_ring(cfg.api_key)
        interceptors = [ApiKeyInterceptor(keys)] if keys is not None else []
        options = [
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", max(cfg.max_message_bytes, 64 * 1024 * 1024)),
            ("grpc.so_reuseport", 0),
        ]
        server = grpc.aio.server(interceptors=interceptors, options=options)
        pb_grpc.add_GenerationServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health_servicer, server)
        reflection.enable_server_reflection(SERVICE_NAMES, server)
        await self.health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health_servicer.set(GENERATION_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"[{cfg.host}]:{cfg.port}" if ":" in cfg.host else f"{cfg.host}:{cfg.port}"
        try:
            creds = server_credentials(cfg)
            if creds is not None:
                self.port = server.add_secure_port(address, creds)
            else:
                self.port = server.add_insecure_port(address)
        except RuntimeError:  # grpc: "Failed to bind to address ..."
            self.port = 0
        if not self.port:
            raise OSError(f"--host {cfg.host} --port {cfg.port}: cannot listen on {address}: "
                          f"{_bind_problem(cfg.host, cfg.port, bool(cfg.tls_cert))}")
        self.metrics.start()  # OSError naming --metrics-port when it cannot bind
        await server.start()
        self._grpc = server
        if cfg.http_port is not None:  # the OpenAI-compatible door, same loop, same front door
            from serving.openai_api import HttpServer

            self.http = HttpServer(self, cfg.host, cfg.http_port)
            try:
                self.http_port = await self.http.start()
            except OSError:
                await server.stop(None)
                raise
        log.debug("serving: listening on %s (%s)", address.replace(f":{cfg.port}", f":{self.port}"),
                  ("mutual TLS" if cfg.tls_client_ca else "TLS") if cfg.tls_cert else "plaintext")
        self.async_engine.add_death_callback(self._on_engine_death)
        ready = self.async_engine.start()
        ready.add_done_callback(self._on_ready)
        self.monitor.start()
        return self.port

    def _on_ready(self, fut: asyncio.Future) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is None:
            log.info("serving: engine ready")  # its start-up time: build_engine's "engine start" line
            defaults = getattr(self.async_engine.engine, "generation_defaults", None)
            if defaults is not None and defaults.sampling:  # vLLM's line (its OpenAIServingChat logs it)
                log.info("Using default chat sampling params from model: %s", defaults.sampling)
        else:  # the cause is in start_error; `python -m serving` prints it as its one error line
            log.debug("serving: engine failed to start: %r", exc)

    def _probe_token_ids(self) -> list[int]:
        tok = getattr(self.async_engine.engine, "tokenizer", None)
        try:
            ids = list(tok.encode("Hello"))[:4]
            if ids:
                return [int(t) for t in ids]
        except Exception:  # noqa: BLE001
            pass
        return [0]

    async def wait_serving(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.monitor.status != health_pb2.HealthCheckResponse.SERVING:
            if time.monotonic() > deadline:
                raise TimeoutError(f"not SERVING after {timeout}s: {self.monitor.reason}")
            await asyncio.sleep(0.02)

    # ----- admission (the front door's) ------------------------------------------------
    @property
    def draining(self) -> bool:
        return self.door.draining

    def refusal_reason(self) -> str | None:
        return self.door.refusal_reason()

    def add_shutdown_hook(self, hook: Callable[[], Any]) -> None:
        """``await hook()`` when the server stops, before the engine does (e.g. the HTTP door)."""
        self._shutdown_hooks.append(hook)

    # ----- engine death -------------------------------------------------------------------
    def _on_engine_death(self, exc: BaseException) -> None:
        if not self.async_engine.ready:  # build or warm-up raised: a start-up failure
            self.start_error = getattr(exc, "cause", None) or exc
            log.debug("serving: engine failed to start (%s: %s)", type(exc).__name__, exc)
        else:
            log.error("serving: engine loop died (%s: %s); exiting with code 1 in %.1fs",
                      type(exc).__name__, exc, self.config.engine_death_grace)
        self._spawn(self._die_later())

    async def _die_later(self) -> None:
        await self.monitor.update()
        await asyncio.sleep(self.config.engine_death_grace)
        await self._terminate(exit_code=1)

    # ----- drain / stop ---------------------------------------------------------------------
    async def drain(self, reason: str = "shutdown requested") -> None:
        if self.draining or self._stopping:
            return
        self.door.draining = True
        timeout = self.config.shutdown_timeout
        log.warning("serving: draining (%s): %d requests in flight, up to %.1fs",
                    reason, len(self.door.active), timeout)
        await self.monitor.update()
        await self.door.drain(timeout)
        if self.exit_code is None:
            await self._terminate(exit_code=0)

    async def _terminate(self, exit_code: int) -> None:
        if self._stopping:
            return
        self._stopping = True
        self.door.stopping = True
        self.exit_code = exit_code
        await self.monitor.update()
        for hook in self._shutdown_hooks:
            try:
                await hook()
            except Exception:  # noqa: BLE001 - one door failing to close must not block the rest
                log.exception("serving: shutdown hook failed")
        await self.monitor.stop()
        await self.health_servicer.enter_graceful_shutdown()
        if self._grpc is not None:
            await self._grpc.stop(grace=1.0)
        await self.async_engine.stop(timeout=2.0)
        self.metrics.stop()
        (log.debug if self.start_error is not None else log.info)("serving: stopped (exit code %d)", exit_code)
        self._done.set()

    async def stop(self, exit_code: int = 0) -> None:
        """Immediate stop (no drain)."""
        self.door.abort_all("server stopped")
        await self._terminate(exit_code)

    async def wait(self) -> int:
        await self._done.wait()
        return self.exit_code if self.exit_code is not None else 0

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _bind_problem(host: str, port: int, tls: bool) -> str:
    """Why gRPC could not bind (it only says 'Failed to bind'): try the same bind ourselves."""
    import socket

    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as sock:
            sock.bind(sockaddr)
    except OSError as e:
        return e.strerror or str(e)
    return "gRPC refused the TLS credentials (--tls-cert/--tls-key)" if tls else "gRPC could not bind it"
