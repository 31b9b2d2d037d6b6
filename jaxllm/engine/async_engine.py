"""AsyncEngine: drive an ``LLMEngine`` from asyncio on ONE background thread.

Contract
--------
* Every call into the engine (build, ``add_request``, ``abort_request``, ``step``,
  ``get_stats``) happens on the single engine thread, so the engine needs no locks. The
  asyncio side talks to it through a command queue (engine_commands.py) and gets results back
  through ``loop.call_soon_threadsafe`` (one callback per step, not per request).
* ``await add_request(...)`` returns a :class:`RequestStream` once the engine accepted the
  request, or raises the engine's ``ValueError`` (validation), :class:`DuplicateRequestError`
  or :class:`EngineDeadError`.
* A stream receives the engine's cumulative ``RequestOutput``s and buffers only the newest
  (a consumer that reads slowly sees fewer, larger steps; memory stays one output per stream). ``abort(request_id)`` is
  thread-safe, non-blocking and idempotent: the stream is dropped at once and the engine frees
  the request's KV blocks before its next step. Unknown / finished ids are a no-op.
* A request whose host-side processing raised is dropped by the engine
  (``engine.take_request_errors()``, read after each step): its stream fails with
  :class:`RequestFailedError` and the loop goes on.
* If ``step()`` (or the build) raises, the engine is *dead*: every live stream and pending add
  fails with :class:`EngineDeadError` carrying the cause, later adds fail at once, and
  ``on_death`` callbacks run on the event loop.
* Watchdog info: ``last_heartbeat`` is refreshed every loop iteration (after each step and at
  least every ``idle_tick`` seconds while idle); ``step_started_at`` is set while inside
  ``step()``. ``heartbeat_age()`` growing past a timeout means the loop is wedged.
  ``last_output_time`` is the last time any request received tokens (progress).
* Step gates (``add_request(..., step_gate=True)``, a beam search's driver): ``release_step(id)``
  is thread-safe and non-blocking like ``abort``; applied in order with the other commands. While
  every request left waits for a release (``engine.held_by_gates``) the loop sleeps on its command
  queue instead of stepping empty.

No jax here: this file only moves Python objects between threads.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, AsyncIterator, Callable

from jaxllm.engine.engine_commands import CommandQueue, answer_adds, set_exception, set_result
from jaxllm.engine.request_stream import (  # noqa: F401 - re-exported: the errors are this API's
    DuplicateRequestError, EngineDeadError, RequestAbortedError, RequestFailedError, RequestStream)
from jaxllm.engine.stats import EngineStats

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(
        self,
        engine: Any = None,
        *,
        engine_factory: Callable[[], Any] | None = None,
        warmup: Callable[[Any], None] | None = None,
        idle_tick: float = 0.05,
        name: str = "jaxllm-engine",
    ):
        if (engine is None) == (engine_factory is None):
            raise ValueError("pass exactly one of engine= or engine_factory=")
        self.engine = engine
        self._factory = engine_factory
        self._warmup = warmup
        self._idle_tick = idle_tick
        self._name = name
        self._cmds = CommandQueue()  # to the engine thread (engine_commands.py)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._streams: dict[str, RequestStream] = {}  # loop side
        self._pending_adds = 0  # loop side: adds submitted, not yet answered
        self._ready: asyncio.Future | None = None
        self._death_callbacks: list[Callable[[BaseException], None]] = []
        # watchdog / stats, written by the engine thread, read anywhere (atomic refs)
        now = time.monotonic()
        self.started_at = now
        self.last_heartbeat = now
        self.step_started_at: float | None = None
        self.last_output_time = now
        self.num_steps = 0
        self.stats: EngineStats = EngineStats()  # the engine's latest get_stats()
        self.dead: BaseException | None = None
        self.stopped = False

    # ----- lifecycle ----------------------------------------------------------------
    def start(self) -> asyncio.Future:
        """Start the engine thread; returns a future resolved once the engine is built+warm."""
        if self._thread is not None:
            raise RuntimeError("AsyncEngine already started")
        self._loop = asyncio.get_running_loop()
        self._ready = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        return self._ready

    @property
    def ready(self) -> bool:
        return self._ready is not None and self._ready.done() and not self._ready.exception()

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.dead is None

    def add_death_callback(self, cb: Callable[[BaseException], None]) -> None:
        self._death_callbacks.append(cb)

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop thread (does not abort requests: do that first if needed)."""
        self.stopped = True
        self._cmds.stop()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, timeout)

    # ----- requests (call on the event loop) -----------------------------------------
    @property
    def num_pending_adds(self) -> int:
        return self._pending_adds

    @property
    def num_active(self) -> int:
        return len(self._streams)

    def has_request(self, request_id: str) -> bool:
        return request_id in self._streams

    async def add_request(self, request_id: str, prompt: Any, params: Any,
                          lora_request: Any = None, priority: int = 0,
                          fork_of: str | None = None, step_gate: bool = False) -> RequestStream:
        if self.dead is not None:
            raise EngineDeadError(self.dead)
        if self.stopped:
            raise RuntimeError("engine loop is stopped")
        if request_id in self._streams:
            raise DuplicateRequestError(f"request_id={request_id!r} is invalid: already in flight")
        stream = RequestStream(request_id)
        self._streams[request_id] = stream
        fut = self._loop.create_future()
        self._pending_adds += 1
        try:
            kw = {k: v for k, v in (("lora_request", lora_request), ("fork_of", fork_of)) if v is not None}
            if step_gate:
                kw["step_gate"] = True
            if priority != 0:
                kw["priority"] = priority
            self._cmds.add(request_id, prompt, params, fut, kw)
            try:
                await asyncio.shield(fut)
            except asyncio.CancelledError:
                # caller went away while the add was queued: abort once it lands
                self.abort(request_id)
                raise
        except BaseException:
            if self._streams.get(request_id) is stream:
                del self._streams[request_id]
            raise
        finally:
            self._pending_adds -= 1
        return stream

    async def call(self, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn(engine)`` on the engine thread between steps (engine methods that are not
        requests: ``add_lora``, ``remove_lora``, ``list_loras``); its result, or its exception."""
        if self.dead is not None:
            raise EngineDeadError(self.dead)
        if self.stopped:
            raise RuntimeError("engine loop is stopped")
        fut = self._loop.create_future()
        self._cmds.call(fn, fut)
        return await fut

    def abort(self, request_id: str, error: BaseException | None = None) -> None:
        """Drop the stream now; the engine frees the request before its next step."""
        stream = self._streams.pop(request_id, None)
        if stream is not None and error is not None:
            stream._aborted = True
            stream._fail(error)
        self._cmds.abort(request_id)

    def abort_all(self, error: BaseException) -> list[str]:
        """Abort every live stream (health probes included) with ``error``; their ids."""
        ids = list(self._streams)
        for rid in ids:
            self.abort(rid, error)
        return ids

    def release_step(self, request_id: str) -> None:
        """Let the step-gated ``request_id`` compute its next token (LLMEngine.release_step), before
        the engine's next step; non-blocking, a no-op for an unknown / finished id."""
        self._cmds.release_step(request_id)

    async def generate(self, request_id: str, prompt: Any, params: Any,
                       lora_request: Any = None, priority: int = 0) -> AsyncIterator:
        """Convenience: yield each RequestOutput; abort the request if the consumer stops early."""
        stream = await self.add_request(request_id, prompt, params, lora_request, priority)
        finished = False
        try:
            async for out in stream:
                finished = bool(getattr(out, "finished", False))
                yield out
        finally:
            if not finished:
                self.abort(request_id)
            else:
                self._streams.pop(request_id, None)

    async def embed(self, request_id: str, prompt: Any, params: Any = None) -> Any:
        """One embedding request (an engine with task "embed"; ``params`` a PoolingParams or None):
        its ``EmbeddingRequestOutput``. Raises what ``add_request`` raises (ValueError for bad input);
        cancelled, it aborts the request."""
        async for out in self.generate(request_id, prompt, params):
            if getattr(out, "finished", False):
                return out
        raise RequestAbortedError(f"request_id={request_id!r} ended without an embedding")

    def release(self, request_id: str) -> None:
        """Forget a finished stream (no engine call)."""
        self._streams.pop(request_id, None)

    # ----- watchdog -------------------------------------------------------------------
    def heartbeat_age(self, now: float | None = None) -> float:
        return (now if now is not None else time.monotonic()) - self.last_heartbeat

    def health_info(self) -> dict:
        now = time.monotonic()
        return {
            "ready": self.ready,
            "alive": self.is_alive,
            "dead": repr(self.dead) if self.dead is not None else None,
            "heartbeat_age_s": round(self.heartbeat_age(now), 3),
            "in_step_s": round(now - self.step_started_at, 3) if self.step_started_at else None,
            "since_last_output_s": round(now - self.last_output_time, 3),
            "num_steps": self.num_steps,
            "num_active": self.num_active,
        }

    # ----- engine thread ---------------------------------------------------------------
    def _post(self, fn: Callable, *args) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # loop closed under us during shutdown
            pass

    def _run(self) -> None:
        try:
            if self.engine is None:
                self.engine = self._factory()
            if self._warmup is not None:
                self._warmup(self.engine)
            self._refresh_stats()
        except BaseException as exc:  # noqa: BLE001 - reported to the loop
            # the ready future carries it (the server prints it as one line); traceback at debug
            log.debug("engine build/warm-up failed", exc_info=True)
            self._die(exc)
            self._post(set_exception, self._ready, exc)
            return
        self.last_heartbeat = time.monotonic()
        self._post(set_result, self._ready, None)
        engine = self.engine
        take_errors = getattr(engine, "take_request_errors", None)
        try:
            while True:
                # held by step gates: nothing to run until a command (release, abort, add) comes
                busy = engine.has_unfinished_requests() and not getattr(engine, "held_by_gates", False)
                if not self._drain_commands(block=not busy):
                    self._cmds.fail_queued(RuntimeError("engine loop stopped"), self._post)
                    return
                self.last_heartbeat = time.monotonic()
                if engine.has_unfinished_requests():
                    self.step_started_at = time.monotonic()
                    outputs = engine.step()
                    self.step_started_at = None
                    self.num_steps += 1
                    now = time.monotonic()
                    self.last_heartbeat = now
                    if outputs:
                        self.last_output_time = now
                        self._post(self._dispatch, outputs)
                    errors = take_errors() if take_errors is not None else None
                    if errors:
                        self._post(self._fail_requests, errors)
                self._refresh_stats()
        except BaseException as exc:  # noqa: BLE001
            self.step_started_at = None
            log.exception("engine loop died")
            self._die(exc)
        finally:  # stopped or dead: the engine's worker threads go too (LoRA loader, grammar pool)
            close = getattr(engine, "close", None)  # test doubles may have none
            if close is not None:
                close()

    def _drain_commands(self, block: bool) -> bool:
        """Apply queued adds/aborts. Returns False when asked to stop."""
        if block:
            self._cmds.wait(self._idle_tick)
        keep_going, answers = self._cmds.apply(self.engine, self._post)
        if answers:
            # refresh stats first, so a caller that sees its add accepted also sees it queued
            self._refresh_stats()
            self._post(answer_adds, answers)
        return keep_going

    def _refresh_stats(self) -> None:
        try:
            self.stats = self.engine.get_stats()
        except Exception:  # stats are best effort
            log.debug("get_stats failed", exc_info=True)

    def _die(self, exc: BaseException) -> None:
        self.dead = exc
        self._cmds.fail_queued(EngineDeadError(exc), self._post)
        self._post(self._on_death, exc)

    # ----- loop side callbacks --------------------------------------------------------
    def _dispatch(self, outputs: list) -> None:
        streams = self._streams
        for out in outputs:
            stream = streams.get(out.request_id)
            if stream is None:
                continue  # aborted / unknown: drop
            stream._put(out)

    def _fail_requests(self, errors: dict) -> None:
        for rid, exc in errors.items():
            stream = self._streams.pop(rid, None)
            if stream is not None:
                stream._fail(RequestFailedError(exc))

    def _on_death(self, exc: BaseException) -> None:
        err = EngineDeadError(exc)
        for stream in list(self._streams.values()):
            stream._fail(err)
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(err)
        for cb in self._death_callbacks:
            try:
                cb(exc)
            except Exception:
                log.exception("death callback failed")
