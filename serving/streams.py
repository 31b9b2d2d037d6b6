"""Response streams and slow or stuck readers (no jax).

Per-stream buffering is bounded in two places:

* the engine side: ``RequestStream`` keeps only the newest output (outputs are cumulative), so a
  stream whose handler is blocked on a write holds one ``RequestOutput``, not one per step;
* the transport: a handler's ``yield`` blocks once the client's HTTP/2 flow-control window is
  full (64 KiB initially; the client's BDP probing may grow it to a few MiB), so gRPC buffers at
  most one window per stream.

``WriteTimeout`` ends a stream whose client has not taken a message for ``--stream-timeout``
seconds: it aborts the request in the engine at once (its KV blocks are freed before the next
step), queues DEADLINE_EXCEEDED behind the data already sent (a client that resumes reading gets
what was sent, then that status) and cancels the handler. grpc-python's asyncio server has no way
to reset one stream, so the transport keeps that one window until the client reads, cancels,
disconnects or its own deadline passes. The engine loop and the other streams never wait on a
reader: outputs reach a stream through the event loop, which never blocks on a write.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

import grpc

log = logging.getLogger(__name__)

_pending_aborts: set[asyncio.Task] = set()  # status sends waiting behind unread data


class WriteTimeout:
    """Arm around each ``yield`` of a streaming handler: ``writing()`` before, ``written()``
    after. If a write stays pending ``timeout`` seconds (the client stopped reading), call
    ``on_expire`` (abort the request), send DEADLINE_EXCEEDED and cancel the handler task.
    ``timeout`` <= 0 or None disables it."""

    def __init__(self, context, timeout: float | None, on_expire: Callable[[], None],
                 what: str = "stream"):
        self._context = context
        self._timeout = timeout if timeout and timeout > 0 else None
        self._on_expire = on_expire
        self._what = what
        self._task = asyncio.current_task()
        self._timer: asyncio.TimerHandle | None = None
        self.expired = False

    def writing(self) -> None:
        if self._timeout is not None and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._timeout, self._expire)

    def written(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    close = written

    def _expire(self) -> None:
        self._timer = None
        self.expired = True
        msg = (f"{self._what} aborted: the client did not read for --stream-timeout="
               f"{self._timeout:g}s")
        log.warning("serving: %s", msg)
        try:
            self._on_expire()
        except Exception:  # noqa: BLE001 - cleanup is best effort; the cancel below still runs
            log.exception("stream timeout cleanup failed")
        task = asyncio.get_running_loop().create_task(self._send_status(msg))
        _pending_aborts.add(task)
        task.add_done_callback(_pending_aborts.discard)
        if self._task is not None:
            self._task.cancel()

    async def _send_status(self, msg: str) -> None:
        try:
            await self._context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, msg)
        except BaseException:  # noqa: BLE001 - AbortError when sent; batch errors once the client left
            pass
