"""Sleep mode over HTTP (no jax): vLLM's ``POST /sleep?level=1``, ``POST /wake_up`` (optional
``?tags=weights&tags=kv_cache``) and ``GET /is_sleeping`` -> ``{"is_sleeping": bool}``.

vLLM mounts them only under ``VLLM_SERVER_DEV_MODE=1``; jaxllm answers them on a server started with
``--enable-sleep-mode`` and says 404 (naming the flag) otherwise. They sit behind ``--api-key`` like
``/reset_prefix_cache``. ``/sleep`` answers once the device memory is freed: every request in flight
(and the health monitor's probe) is aborted first (vLLM's mode "abort"; their callers get 503), and
until ``/wake_up`` has restored every tag, new generation, embedding and scoring requests get 503
naming the sleep; ``/health`` stays 200 (vLLM's: the engine is alive) with ``"sleeping": true``.
The engine work is jaxllm/engine/sleep_requests.py and jaxllm/runner/sleep.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import Request
from starlette.responses import JSONResponse, Response

from jaxllm.engine.async_engine import EngineDeadError, RequestAbortedError
from serving.frontdoor import Code, FrontDoor, FrontDoorError, dead_message, invalid

if TYPE_CHECKING:
    from serving.server import ServingServer


def sleep_enabled(door: FrontDoor) -> bool:
    cfg = getattr(door.async_engine.engine, "config", None)
    return bool(getattr(cfg, "enable_sleep_mode", False))


def is_sleeping(door: FrontDoor) -> bool:
    """Read from any thread: a frozenset the engine thread replaces whole."""
    fn = getattr(door.async_engine.engine, "is_sleeping", None)
    return bool(fn()) if fn is not None else False


async def _engine_call(door: FrontDoor, fn) -> Any:
    reason = door.refusal_reason()
    if reason is not None:
        raise FrontDoorError(Code.UNAVAILABLE, reason)
    try:
        return await door.async_engine.call(fn)
    except EngineDeadError as exc:
        raise FrontDoorError(Code.INTERNAL, dead_message(exc)) from None
    except ValueError as exc:
        raise invalid(str(exc)) from None


async def sleep(door: FrontDoor, level: int, mode: str = "abort") -> None:
    """Abort what runs (the door's requests and every other stream: health probes), then put the
    engine to sleep on its thread. A request admitted meanwhile is aborted by the engine itself; its
    stream is failed here once the sleep returns."""
    error = RequestAbortedError(f"request aborted: the server was put to sleep (POST /sleep?level={level})")
    if mode == "abort" and level in (1, 2):  # a bad level or mode: the engine's ValueError, nothing aborted
        door.abort_all(str(error))
        door.async_engine.abort_all(error)
    outs = await _engine_call(door, lambda engine: engine.sleep(level, mode))
    for out in outs or ():
        door.async_engine.abort(out.request_id, error)


async def wake_up(door: FrontDoor, tags: list[str] | None) -> None:
    await _engine_call(door, lambda engine: engine.wake_up(tags))


def add_sleep_routes(app, server: "ServingServer", door: FrontDoor) -> None:
    def enabled(request: Request) -> None:
        if not sleep_enabled(door):
            raise FrontDoorError(Code.NOT_FOUND, f"{request.method} {request.url.path}: no such endpoint: sleep "
                                                 f"mode is off (start the server with --enable-sleep-mode)")

    @app.post("/sleep")
    async def sleep_route(request: Request):
        """vLLM's: ``level`` 1 (weights to host RAM) or 2 (weights dropped; after wake-up they are zeros until a
        reload: POST /collective_rpc)."""
        enabled(request)
        text = request.query_params.get("level", "1")
        try:
            level = int(text)
        except ValueError:
            raise invalid(f"level={text!r} is invalid: must be 1 or 2", "level") from None
        await sleep(door, level, request.query_params.get("mode", "abort"))
        return Response(status_code=200)

    @app.post("/wake_up")
    async def wake_up_route(request: Request):
        enabled(request)
        await wake_up(door, request.query_params.getlist("tags") or None)
        return Response(status_code=200)

    @app.get("/is_sleeping")
    async def is_sleeping_route(request: Request):
        enabled(request)
        return JSONResponse({"is_sleeping": is_sleeping(door)})
