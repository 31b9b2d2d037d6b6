"""The OpenAI-compatible HTTP door: FastAPI app + uvicorn on the server's asyncio loop (no jax).

Endpoints: ``GET /v1/models`` (the model, then its LoRA adapters with ``parent`` = the model,
as vLLM), ``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter`` (vLLM's, plain-text
"Success: ..." answers), ``POST /v1/completions``, ``POST /v1/chat/completions`` (both
also as server-sent events ending ``data: [DONE]``), ``GET /health``, ``POST /tokenize``,
``POST /detokenize``, ``POST /v1/responses`` (OpenAI's Responses API over the chat path,
``serving/openai_responses.py``), ``POST /v1/embeddings`` (``serving/openai_embed.py``; a server started
with ``--task embed``), vLLM's ``POST /score`` = ``/v1/score`` and ``POST /rerank`` = ``/v1/rerank`` =
``/v2/rerank`` (``serving/openai_score.py``: cosine of embeddings, ``--task embed``; or a cross-encoder's
pair scores, ``--task classify``), vLLM's ``POST /classify`` = ``/v1/classify`` (``serving/openai_classify.py``;
``--task classify``) and ``GET /metrics`` (Prometheus text of the server's registry, like
``--metrics-port``; no API key, as /health), ``GET|POST /ping`` (= /health), ``GET /version``
(both without a key), ``POST /reset_prefix_cache`` (vLLM's: the prefix cache forgets the
blocks no request holds), vLLM's ``GET /load`` (no key), with ``--enable-tokenizer-info-endpoint``
``GET /tokenizer_info`` (``serving/openai_server_info.py``) and, with ``--enable-sleep-mode``, ``POST /sleep``,
``POST /wake_up``, ``GET /is_sleeping`` (``serving/openai_sleep.py``) and ``POST /collective_rpc`` for
``reload_weights`` (``serving/openai_weights.py``). Admission, caps, queue limit, drain and the in-flight registry are the
front door's, shared with gRPC; this module only maps HTTP <-> front door.

Status codes (body: OpenAI's ``{"error": {"message", "type", "param", "code"}}``):
400 bad JSON, wrong type, unknown field, out-of-range value, prompt too long, a server cap;
401 missing/wrong ``Authorization: Bearer`` key, any of --api-key's (every path but /health, /ping, /metrics, /load,
/version); 404 unknown model or
path (paths are exact: "/v1/models/" is a 404, not a redirect); 405 wrong method; 413 body
larger than --max-message-bytes; 429 waiting requests >= --max-queued-requests; 503 starting,
draining, engine wedged; 500 the engine died mid-request.
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from jaxllm.engine.async_engine import EngineDeadError
from serving.api_keys import key_ring
from serving.frontdoor import Code, FrontDoorError, ModelInfo, dead_message, invalid
from serving.openai_errors import error_body, error_response, validation_message
from serving.openai_classify import add_classify_routes
from serving.openai_embed import EmbeddingRequest, create_embeddings
from serving.openai_score import add_score_routes
from serving.openai_sleep import add_sleep_routes, is_sleeping
from serving.openai_weights import add_weight_routes
from serving.openai_server_info import ServerLoad, add_info_routes
from serving.openai_tokenize import add_tokenize_routes
from serving.openai_generate import chat_job, completion_job, respond
from serving.openai_models import add_model_routes
from serving.openai_protocol import ChatCompletionRequest, CompletionRequest
from serving.openai_responses import create_response
from serving.openai_responses_protocol import ResponsesRequest
from serving.request_ids import HEADER, RequestIdSlot, client_request_id, fresh_request_id

if TYPE_CHECKING:
    from serving.server import ServingServer

log = logging.getLogger(__name__)

# paths served without the API key: health and its SageMaker alias, metrics, the load count and the
# version (vLLM's public endpoints, less its docs pages, which stay behind the key here)
OPEN_PATHS = ("/health", "/ping", "/metrics", "/load", "/version")


def jaxllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("jaxllm")
    except PackageNotFoundError:  # a checkout on PYTHONPATH, not installed
        return "unknown"


class _Guard:
    """ASGI middleware in front of every route: the API key (not on OPEN_PATHS) and the body size
    limit (the whole body is read here, so an oversized or chunked one is refused with 413
    before any handler parses it)."""

    def __init__(self, app, api_key: str | tuple[str, ...] | None, max_body: int, request_id_headers: bool = False,
                 root_path: str = ""):
        self.app = app
        self.root_path = root_path  # --root-path: a path under it is the path without it (FastAPI's rule)
        self.request_id_headers = request_id_headers  # --enable-request-id-headers
        self.keys = key_ring(api_key)  # any of --api-key's keys lets a request in; None: no auth
        self.max_body = max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or ())
        echoed = headers.get(b"x-request-id")
        # the client's id comes back on every answer, errors included; with --enable-request-id-headers
        # every answer has one (the handler may name it: the body's request_id; RequestIdSlot)
        slot = RequestIdSlot(echoed.decode("latin-1") if echoed is not None
                             else fresh_request_id() if self.request_id_headers else None)
        if slot.value is not None:
            scope = {**scope, RequestIdSlot.SCOPE_KEY: slot}
            send = _with_request_id(send, slot)
        if self.keys is not None and route_path(scope.get("path", ""), self.root_path) not in OPEN_PATHS:
            got = headers.get(b"authorization", b"")
            if not self.keys.accepts(got):
                msg = ("missing API key: send the header 'Authorization: Bearer <api key>'" if not got
                       else "invalid API key")
                return await error_response(401, msg, code="invalid_api_key")(scope, receive, send)
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            return await self._too_large(int(declared), scope, receive, send)
        body = b""
        more = True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > self.max_body:
                return await self._too_large(len(body), scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: http.disconnect, for streaming responses

        await self.app(scope, replay, send)

    async def _too_large(self, size: int, scope, receive, send):
        return await error_response(413, f"request body of {size} bytes is too large: the limit is "
                                 f"--max-message-bytes={self.max_body}", code="request_too_large")(
            scope, receive, send)


def route_path(path: str, root_path: str) -> str:
    """``path`` as the routes see it: without the ``--root-path`` prefix when it starts with it."""
    if root_path and (path == root_path or path.startswith(root_path + "/")):
        return path[len(root_path):] or "/"
    return path


def _with_request_id(send, slot: RequestIdSlot):
    """``send`` with ``X-Request-Id: <slot's value when the response starts>`` added (errors too)."""

    async def sending(message):
        if message["type"] == "http.response.start":
            message = dict(message, headers=[*message.get("headers", ()),
                                             (b"x-request-id", slot.value.encode("latin-1"))])
        await send(message)

    return sending


def build_app(server: "ServingServer") -> Any:
    door = server.door
    cfg = server.config
    docs = cfg.fastapi_docs  # vLLM's default: served; --disable-fastapi-docs
    app = FastAPI(title="jaxllm", version=jaxllm_version(),
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
                  openapi_url="/openapi.json" if docs else None,
                  redirect_slashes=False)  # "/v1/completions/" is a 404, not an undocumented 307
    # --root-path as vLLM sets it (the app's, not uvicorn's): paths are served with and without the prefix
    app.root_path = cfg.root_path

    @app.exception_handler(FrontDoorError)
    async def _front_door_error(request: Request, exc: FrontDoorError):
        status, body = error_body(exc)
        return JSONResponse(body, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _bad_body(request: Request, exc: RequestValidationError):
        msg, param = validation_message(exc)
        return error_response(400, msg, param, code="invalid_argument")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 400 and exc.__cause__ is not None:  # FastAPI's "error parsing the body"
            cause = exc.__cause__
            why = "it is not UTF-8 text" if isinstance(cause, UnicodeDecodeError) else f"{type(cause).__name__}"
            return error_response(400, f"request body is not valid JSON: {why}", code="invalid_argument")
        msg = (f"{request.method} {request.url.path}: no such endpoint" if exc.status_code == 404
               else f"{request.method} {request.url.path}: {exc.detail}")
        return error_response(exc.status_code, msg)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # a bug, not the client's fault
        log.exception("http: %s %s failed", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", code="internal")

    def model_of(name: str | None, adapters: bool = True) -> ModelInfo:
        """The served model, or one of its LoRA adapters (``info.lora``) when ``name`` is an
        adapter's (vLLM's rule: an adapter is chosen by ``model``); else 404."""
        info = door.model()
        names = cfg.model_names(info.name)  # vLLM's: a request may give any; answers report the first
        served = info.name = names[0]
        if name is not None and name not in names:
            lora = door.adapters.by_name.get(name)
            if lora is None:
                more = "".join(f", {a!r}" for a in (*names[1:], *sorted(door.adapters.by_name)))
                raise FrontDoorError(Code.NOT_FOUND, f"model={name!r} does not exist: this server serves "
                                                     f"{served!r}{more} (GET /v1/models)", "model")
            if not adapters:
                raise invalid(f"model={name!r} is invalid here: it is a LoRA adapter, and adapters serve "
                              f"generation only (use {served!r})", "model")
            info.name, info.lora = name, lora
        return info

    @app.get("/health")
    async def health():
        from serving.health import SERVING

        if server.monitor.status == SERVING:  # asleep: still 200, as vLLM's (the engine is alive)
            return JSONResponse({"status": "SERVING", **({"sleeping": True} if is_sleeping(door) else {})})
        return JSONResponse({"status": "NOT_SERVING", "reason": server.monitor.reason}, status_code=503)

    # SageMaker-style health: the same answer as /health, GET or POST (vLLM's /ping)
    app.add_api_route("/ping", health, methods=["GET", "POST"], include_in_schema=False)  # /health's alias

    @app.get("/version")
    async def version():
        return {"version": jaxllm_version()}

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache():
        """vLLM's dev endpoint: the prefix cache forgets the blocks no request holds (requests in
        flight keep theirs); answers how many blocks it dropped."""
        reason = door.refusal_reason()
        if reason is not None:
            raise FrontDoorError(Code.UNAVAILABLE, reason)
        try:
            dropped = await server.async_engine.call(lambda engine: engine.evict_free_cached())
        except EngineDeadError as exc:
            raise FrontDoorError(Code.INTERNAL, dead_message(exc)) from None
        return {"num_blocks_dropped": int(dropped)}

    def generating(info: ModelInfo, path: str) -> ModelInfo:
        """An embedding server refuses generation by the field the client chose it with (the
        mirror of /v1/embeddings on a generating server), not by the engine's ``task``."""
        task = getattr(info.engine, "task", "generate")
        if task != "generate":
            raise invalid(f"model={info.name!r} is invalid for {path}: this server's task is {task!r} "
                          "(start it with --task generate)", "model")
        return info

    def client_id(request: Request, body: Any) -> str | None:
        """The id naming the answer: the client's (X-Request-Id, then the body's request_id; a bad one
        is a 400), else under --enable-request-id-headers the one the X-Request-Id header will carry,
        else None (a fresh uuid)."""
        header = request.headers.get(HEADER)
        try:
            rid = client_request_id(header, body.request_id, cfg.max_request_id_len)
        except ValueError as exc:
            raise invalid(str(exc), HEADER if header is not None else "request_id") from None
        slot = RequestIdSlot.of(request.scope)
        if slot is None:
            return rid
        if rid is not None:
            slot.value = rid  # the body's request_id (a header is there already)
        return slot.value

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        rid = client_id(request, body)
        info = generating(model_of(body.model), "/v1/completions")
        return await respond(door, completion_job(door, info, body, rid), request.receive)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        rid = client_id(request, body)
        info = generating(model_of(body.model), "/v1/chat/completions")
        return await respond(door, chat_job(door, info, body, rid), request.receive)

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, request: Request):
        rid = client_id(request, body)
        info = generating(model_of(body.model), "/v1/responses")
        return await create_response(door, info, body, request.receive, rid)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request):
        rid = client_id(request, body)
        return await create_embeddings(door, model_of(body.model, adapters=False), body, rid)

    add_model_routes(app, server, door, model_of)  # /v1/models, /v1/(un)load_lora_adapter
    add_tokenize_routes(app, cfg, model_of)  # /tokenize, /detokenize
    add_score_routes(app, door, model_of, client_id)
    add_classify_routes(app, door, model_of, client_id)
    add_sleep_routes(app, server, door)  # --enable-sleep-mode: /sleep, /wake_up, /is_sleeping
    add_weight_routes(app, server, door)  # --enable-sleep-mode: /collective_rpc (reload_weights)

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        from starlette.responses import Response

        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # GET /load (and its in-flight count, inside the key check), GET /tokenizer_info
    load = ServerLoad(app, cfg.enable_server_load_tracking, lambda path: route_path(path, cfg.root_path))
    add_info_routes(app, server, load)
    guarded = _Guard(load, cfg.api_key, cfg.max_message_bytes, cfg.enable_request_id_headers, cfg.root_path)
    from starlette.middleware.cors import CORSMiddleware

    # outermost, as vLLM's: a browser's preflight is answered before the key check, and refusals
    # (401, 413) carry the CORS headers so the page can read them
    return CORSMiddleware(guarded, allow_origins=list(cfg.allowed_origins), allow_methods=list(cfg.allowed_methods),
                          allow_headers=list(cfg.allowed_headers), allow_credentials=cfg.allow_credentials)


class HttpServer:
    """uvicorn serving ``build_app(server)`` on the running loop, beside gRPC.

    Not ``uvicorn.Server.serve()``: that installs its own SIGTERM/SIGINT handlers, and the
    process's signals belong to ``python -m serving`` (drain). We bind the socket ourselves (a
    bind error is an OSError naming host and port, not uvicorn's sys.exit) and run its startup,
    tick loop and shutdown."""

    def __init__(self, server: "ServingServer", host: str, port: int):
        self.server = server
        self.host = host
        self.port = port
        self._uv = None
        self._task = None
        self._sock: socket.socket | None = None

    async def start(self) -> int:
        import asyncio

        import uvicorn

        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise OSError(f"--host {self.host} --http-port {self.port}: cannot listen: "
                          f"{exc.strerror or exc}") from None
        sock.listen(2048)
        sock.setblocking(False)
        self._sock = sock
        cfg = self.server.config
        extra: dict = {}
        if cfg.tls_cert:
            extra.update(ssl_certfile=cfg.tls_cert, ssl_keyfile=cfg.tls_key)
            if cfg.tls_client_ca:  # mutual TLS on this door too, as on gRPC
                import ssl

                extra.update(ssl_ca_certs=cfg.tls_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
        if cfg.h11_max_incomplete_event_size is not None:
            extra["h11_max_incomplete_event_size"] = cfg.h11_max_incomplete_event_size
        config = uvicorn.Config(build_app(self.server), lifespan="off", access_log=False,
                                log_level=cfg.uvicorn_log_level or logging.getLogger("serving").getEffectiveLevel(),
                                timeout_graceful_shutdown=2, timeout_keep_alive=5, **extra)
        config.load()
        uv = uvicorn.Server(config)
        uv.lifespan = config.lifespan_class(config)
        await uv.startup(sockets=[sock])
        self._uv = uv
        self._task = asyncio.get_running_loop().create_task(uv.main_loop())
        self.port = sock.getsockname()[1]
        self.server.add_shutdown_hook(self.stop)
        return self.port

    async def stop(self) -> None:
        uv, self._uv = self._uv, None
        if uv is None:
            return
        uv.should_exit = True
        if self._task is not None:
            await self._task
        await uv.shutdown(sockets=[self._sock] if self._sock else None)

