"""The command channel from the asyncio side to ``AsyncEngine``'s engine thread.

The event loop queues commands (add, abort, release_step, call, stop) and wakes the thread; the
engine thread applies them to the engine between steps, in order, and answers the futures through
a ``post(fn, *args)`` that runs ``fn`` on the event loop (``loop.call_soon_threadsafe``): the engine
thread never touches a future itself, it posts ``set_result`` / ``set_exception`` (no-ops on a
future already done, e.g. a cancelled caller's). No jax here.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any, Callable

_STOP = object()

Post = Callable[..., None]  # post(fn, *args): fn(*args) on the event loop


class CommandQueue:
    """Thread-safe: any thread may queue; one engine thread waits, applies and fails them."""

    def __init__(self) -> None:
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()

    def _put(self, cmd: tuple) -> None:
        self._cmds.put(cmd)
        self._wake.set()

    # ----- any thread ---------------------------------------------------------------
    def add(self, request_id: str, prompt: Any, params: Any, fut: asyncio.Future, kw: dict) -> None:
        """``engine.add_request(request_id, prompt, params, **kw)``; ``fut`` answered with None or its error."""
        self._put(("add", request_id, prompt, params, fut, kw))

    def call(self, fn: Callable[[Any], Any], fut: asyncio.Future) -> None:
        """``fn(engine)``; ``fut`` answered with its result or its exception."""
        self._put(("call", fn, fut))

    def abort(self, request_id: str) -> None:
        self._put(("abort", request_id))

    def release_step(self, request_id: str) -> None:
        self._put(("release_step", request_id))

    def stop(self) -> None:
        """The engine thread stops at this command (commands after it stay queued)."""
        self._put((_STOP,))

    # ----- the engine thread --------------------------------------------------------
    def wait(self, timeout: float) -> None:
        """Sleep until a command is queued, at most ``timeout`` seconds."""
        self._wake.wait(timeout)

    def apply(self, engine: Any, post: Post) -> tuple[bool, list[tuple[asyncio.Future, BaseException | None]]]:
        """Apply the queued commands to ``engine`` in order. Returns (False when asked to stop, the
        answered adds as (future, None or the engine's error)); a call's answer is posted at once."""
        self._wake.clear()
        answers: list[tuple[asyncio.Future, BaseException | None]] = []
        keep_going = True
        while True:
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                break
            kind = cmd[0]
            if kind is _STOP:
                keep_going = False
                break
            if kind == "call":
                _, fn, fut = cmd
                try:
                    res = fn(engine)
                except Exception as exc:  # noqa: BLE001 - the caller's error
                    post(set_exception, fut, exc)
                else:
                    post(set_result, fut, res)
            elif kind == "add":
                _, rid, prompt, params, fut, kw = cmd
                try:  # keywords only when set: engines without adapters / priorities / forks need not take them
                    engine.add_request(rid, prompt, params, **kw)
                except Exception as exc:  # validation errors go back to the caller
                    answers.append((fut, exc))
                else:
                    answers.append((fut, None))
            elif kind == "abort":
                engine.abort_request(cmd[1])
            elif kind == "release_step":
                release = getattr(engine, "release_step", None)  # test doubles may have none
                if release is not None:
                    release(cmd[1])
        return keep_going, answers

    def fail_queued(self, err: BaseException, post: Post) -> None:
        """Answer adds and calls still queued with ``err`` (the loop will not run them)."""
        while True:
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                break
            if cmd[0] == "add":
                post(set_exception, cmd[4], err)  # ("add", rid, prompt, params, fut, kw)
            elif cmd[0] == "call":
                post(set_exception, cmd[2], err)


# ----- loop side: completing futures ---------------------------------------------------------
def answer_adds(answers) -> None:
    for fut, exc in answers:
        if exc is None:
            set_result(fut, None)
        else:
            set_exception(fut, exc)


def set_result(fut: asyncio.Future, value) -> None:
    if not fut.done():
        fut.set_result(value)


def set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
