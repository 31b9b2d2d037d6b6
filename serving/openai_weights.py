"""Weight reloads over HTTP (no jax): vLLM's dev route ``POST /collective_rpc`` with
``{"method": "reload_weights", "kwargs": {"weights_path": "<checkpoint dir>"}}`` (what NeMo-RL and
similar trainers send after writing a checkpoint), answered ``{"results": [null]}`` once the engine
runs the new weights.

vLLM mounts its dev routes only under ``VLLM_SERVER_DEV_MODE=1``; jaxllm answers this one, as its sleep
routes (serving/openai_sleep.py), on a server started with ``--enable-sleep-mode`` and says 404
(naming the flag) otherwise. It sits behind ``--api-key``. Only ``reload_weights`` travels over HTTP:
vLLM passes args and kwargs as JSON strings, so tensors cannot (``load_weights`` and a
``weights_iterator`` are refused naming the field); ``weights_path`` absent reloads the checkpoint the
server was built from. The engine applies the update between steps on an idle engine
(jaxllm/engine/weight_requests.py): requests in flight are waited for (up to ``timeout`` seconds,
default 60; 503 naming them after that) and new ones queue meanwhile. Errors: 400 naming the field
(``method``, ``args``, ``kwargs.weights_path`` for a missing or mismatched checkpoint), 503 while the
weights sleep; the engine keeps serving the old weights after any refusal.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING

from fastapi import Request
from starlette.responses import JSONResponse

from jaxllm.engine.async_engine import EngineDeadError
from jaxllm.engine.sleep_requests import EngineSleepingError
from jaxllm.engine.weight_requests import EngineBusyError
from serving.frontdoor import Code, FrontDoor, FrontDoorError, dead_message, invalid
from serving.openai_sleep import sleep_enabled

if TYPE_CHECKING:
    from serving.server import ServingServer

DEFAULT_TIMEOUT = 60.0
_RETRY = 0.02  # seconds between tries while requests are unfinished


def _reload_args(body) -> tuple[str | None, float]:
    """(weights_path, timeout) of a /collective_rpc body; FrontDoorError naming the field."""
    if not isinstance(body, dict):
        raise invalid("body is invalid: must be a JSON object {\"method\": ..., \"kwargs\": {...}}", "body")
    method = body.get("method")
    if method is None:
        raise invalid("method: missing (this server runs method 'reload_weights')", "method")
    if method != "reload_weights":
        why = (" (tensors cannot travel as JSON strings: write a checkpoint and send reload_weights with "
               "kwargs.weights_path)" if method == "load_weights" else "")
        raise invalid(f"method={method!r} is invalid: over HTTP only 'reload_weights' is supported{why}", "method")
    args, kwargs = body.get("args") or [], body.get("kwargs") or {}
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise invalid("args / kwargs are invalid: must be a JSON list and object", "args" if not isinstance(
            args, list) else "kwargs")
    if args:
        raise invalid(f"args={args!r} is invalid: pass kwargs.weights_path instead", "args")
    bad = [k for k in kwargs if k != "weights_path"]
    if bad:
        raise invalid(f"kwargs.{bad[0]} is invalid: reload_weights over HTTP takes kwargs.weights_path only",
                      f"kwargs.{bad[0]}")
    path = kwargs.get("weights_path")
    if path is not None and not isinstance(path, str):
        raise invalid(f"kwargs.weights_path={path!r} is invalid: must be a checkpoint directory path",
                      "kwargs.weights_path")
    timeout = body.get("timeout")
    if timeout is None:
        timeout = DEFAULT_TIMEOUT
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise invalid(f"timeout={timeout!r} is invalid: must be a positive number of seconds", "timeout")
    return path, float(timeout)


async def reload_weights(door: FrontDoor, path: str | None, timeout: float) -> None:
    """Run the engine's reload between steps once it is idle (retried while requests finish)."""
    deadline = time.monotonic() + timeout
    while True:
        reason = door.refusal_reason()
        if reason is not None:
            raise FrontDoorError(Code.UNAVAILABLE, reason)
        try:
            await door.async_engine.call(lambda engine: engine.reload_weights(path))
            return
        except EngineBusyError as exc:
            if time.monotonic() >= deadline:
                raise FrontDoorError(Code.UNAVAILABLE, f"{exc} (waited timeout={timeout:g}s)") from None
        except EngineSleepingError as exc:
            raise FrontDoorError(Code.UNAVAILABLE, str(exc)) from None
        except EngineDeadError as exc:
            raise FrontDoorError(Code.INTERNAL, dead_message(exc)) from None
        except ValueError as exc:  # a missing or mismatched checkpoint (CheckpointError is one)
            raise invalid(str(exc), "kwargs.weights_path") from None
        await asyncio.sleep(_RETRY)


def add_weight_routes(app, server: "ServingServer", door: FrontDoor) -> None:
    @app.post("/collective_rpc")
    async def collective_rpc_route(request: Request):
        """vLLM's dev route, for ``reload_weights`` only (module docstring)."""
        if not sleep_enabled(door):
            raise FrontDoorError(Code.NOT_FOUND, f"{request.method} {request.url.path}: no such endpoint: weight "
                                                 f"reloads are off (start the server with --enable-sleep-mode)")
        try:
            body = json.loads(await request.body() or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise invalid(f"body is invalid: not JSON ({exc})", "body") from None
        path, timeout = _reload_args(body)
        await reload_weights(door, path, timeout)
        return JSONResponse({"results": [None]})
