"""DaemonPool: host work off the engine thread that never holds up interpreter exit (no jax).

A ``concurrent.futures.ThreadPoolExecutor``'s workers are joined at interpreter exit, so one job
that never ends (a stuck adapter read, a pathological grammar compile) keeps a finished process
alive. This pool's workers are daemon threads instead, started on the first ``submit`` (an engine
that never loads an adapter or compiles a grammar has no thread), and ``close`` cancels queued jobs
and returns at once: a job in flight finishes on its daemon thread and nobody waits for it.

Users: the LoRA adapter loader (``jaxllm/lora/loader.py``, at a lower CPU priority) and the
structured-outputs grammar compiler (``jaxllm/engine/grammar.py``). ``LLMEngine.close`` closes both;
AsyncEngine's loop calls it when it stops.
"""

from __future__ import annotations

import concurrent.futures
import os
import queue
import threading
from collections.abc import Callable
from typing import Any


def lower_priority(nice: int) -> None:
    """Add ``nice`` to the calling thread's niceness (Linux: per thread), so it yields the CPU to
    the engine thread; a no-op where that is not supported or allowed."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except (AttributeError, OSError):  # not Linux, or not allowed: the jobs still run off-thread
        pass


class DaemonPool:
    def __init__(self, workers: int, name: str, nice: int = 0) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers={workers!r} is invalid: must be an integer >= 1")
        self.workers = workers
        self.name = name  # thread names: f"{name}_{i}"
        self.nice = nice  # added to each worker's niceness (0 = the caller's priority)
        self._queue: queue.SimpleQueue | None = None  # (future, fn, args) jobs; None = a worker's stop
        self._lock = threading.Lock()

    @property
    def started(self) -> bool:
        """Workers are running (a job was submitted since the pool was made or last closed)."""
        return self._queue is not None

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        """``fn(*args)`` on a worker thread (thread-safe); its future carries the result or exception."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            start = self._queue is None
            if start:
                self._queue = queue.SimpleQueue()
            self._queue.put((fut, fn, args))  # before the workers start: the first takes it at once
            for i in range(self.workers if start else 0):
                threading.Thread(target=self._work, args=(self._queue,), name=f"{self.name}_{i}",
                                 daemon=True).start()
        return fut

    def _work(self, jobs: queue.SimpleQueue) -> None:
        """A worker: stops at its None (each closed queue gets one None per worker)."""
        if self.nice:
            lower_priority(self.nice)
        while (job := jobs.get()) is not None:
            fut, fn, args = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - the future carries it
                fut.set_exception(exc)

    def close(self) -> None:
        """Stop the workers without waiting: queued jobs are cancelled, a job in flight finishes on
        its daemon thread (its future still gets the result). A later ``submit`` starts new workers."""
        with self._lock:
            jobs, self._queue = self._queue, None
        if jobs is None:
            return
        while True:
            try:
                job = jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job[0].cancel()
        for _ in range(self.workers):
            jobs.put(None)
