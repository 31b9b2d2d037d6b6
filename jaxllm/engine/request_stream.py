"""What an ``AsyncEngine`` hands the asyncio side: one ``RequestStream`` per request (the newest
cumulative output buffered, thread-unsafe: touched only on the event loop) and the errors a stream
or an add can raise. No jax, no threads here.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any, AsyncIterator


class EngineDeadError(RuntimeError):
    """The engine loop died; ``__cause__``/``cause`` is what killed it."""

    def __init__(self, cause: BaseException | None, message: str | None = None):
        self.cause = cause
        super().__init__(message or f"engine loop died: {type(cause).__name__}: {cause}")


class DuplicateRequestError(ValueError):
    pass


class RequestAbortedError(RuntimeError):
    """Raised by a stream aborted from the server side (e.g. drain timeout)."""


class RequestFailedError(RuntimeError):
    """This request's host-side processing raised (the engine keeps serving the others);
    ``cause`` is the exception."""

    def __init__(self, cause: BaseException):
        self.cause = cause
        super().__init__(f"request failed: {type(cause).__name__}: {cause}")


class RequestStream:
    """Asyncio-side sink for one request's outputs. Not thread-safe: touched only on the loop."""

    __slots__ = ("request_id", "_pending", "_event", "finished", "_error", "_aborted")

    def __init__(self, request_id: str):
        self.request_id = request_id
        self._pending: collections.deque = collections.deque()
        self._event = asyncio.Event()
        self.finished = False
        self._error: BaseException | None = None
        self._aborted = False

    def _put(self, out: Any) -> None:
        # outputs are cumulative: the newest one holds everything the older ones did, so a slow
        # consumer costs one buffered output, not one per engine step
        self._pending.clear()
        self._pending.append(out)
        if getattr(out, "finished", False):
            self.finished = True
        self._event.set()

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._event.set()

    async def get_batch(self) -> list:
        """Wait for, then return, the outputs received since the last call (the newest only: they
        are cumulative).

        Raises the stream's error (engine death, server-side abort) once pending outputs are
        drained. Returns [] only after the final output was already returned.
        """
        while not self._pending:
            if self.finished:
                return []
            if self._error is not None:
                raise self._error
            self._event.clear()
            await self._event.wait()
        if (self._error is not None and not self.finished
                and not isinstance(self._error, RequestAbortedError)):
            # engine died mid-request: report the cause rather than a partial result
            raise self._error
        batch = list(self._pending)
        self._pending.clear()
        return batch

    async def __aiter__(self) -> AsyncIterator:
        while True:
            batch = await self.get_batch()
            if not batch:
                return
            for out in batch:
                yield out
                if getattr(out, "finished", False):
                    return
