"""AdapterLoader: reads PEFT adapters off the engine thread (host only, no jax).

A LoRA adapter's files are read, validated and turned into host arrays by ``load_fn``
(``jaxllm.lora.peft.load_adapter``: hundreds of ms to seconds for a big adapter). Run on the engine
thread that would stall every other request's steps for the load, so the engine hands loads to this
loader's thread(s) and keeps stepping; the engine thread later takes the finished adapter
(``LoRAManager.poll``) and only writes the device slot (``set_lora``) when a request runs with it.

- ``submit(lora) -> Future``: the load on a worker thread (thread-safe: touches nothing but
  ``load_fn``; the servers call it from their event loop too). The future's exception is already
  the one-line ``LoRALoadError`` (a ValueError) the engine reports (``load_error``).
- ``load(lora)``: the same on the caller's thread (``LLM.add_lora``, ``--lora-modules`` at start).

One worker by default: loads are file reads and numpy copies, a second one mostly competes for the
same disk and GIL; ``workers`` is there for a host that serves many cold adapters. The workers run
at a lower CPU priority (``nice``, Linux: per thread) so that on a host whose cores also run the
model (the CPU backend) a load takes the cores the step leaves idle instead of stretching the step.
The workers are daemon threads (``jaxllm/daemon_pool.py``: a load in flight never holds up
interpreter exit) and ``close`` (``LLMEngine.close``, when the servers stop the engine loop)
cancels queued loads without waiting.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import Any

from jaxllm.daemon_pool import DaemonPool

LoadFn = Callable[[Any], Any]  # LoRARequest -> a LoRAAdapter (``.name``, ``.rank``, ``.nbytes``)


NICE = 10  # added to a loader thread's niceness (0..19; the engine thread keeps its own)


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


class LoRALoadError(ValueError):
    """A bad adapter, found by its load: the caller's input error (``LLM.generate`` raises it as
    is, the servers answer INVALID_ARGUMENT), even when the load ran after the request was admitted."""


def load_error(lora, exc: BaseException) -> LoRALoadError:
    """The one-line error of a failed load (naming the request's adapter, its path, and the
    loader's first line: the file and the field or tensor)."""
    return LoRALoadError(f"lora_request={lora.lora_name!r} is invalid: adapter at {lora.lora_path} "
                      f"failed to load: {_one_line(exc)}")


class AdapterLoader:
    def __init__(self, load_fn: LoadFn, workers: int = 1) -> None:
        self.load_fn = load_fn
        self.pool = DaemonPool(workers, "jaxllm-lora-load", nice=NICE)  # validates ``workers``
        self.workers = workers

    def load(self, lora) -> Any:
        """``load_fn(lora)`` here and now; a failure is the one-line ValueError."""
        try:
            return self.load_fn(lora)
        except Exception as exc:  # noqa: BLE001 - the request's error, on one line
            raise load_error(lora, exc) from exc

    def submit(self, lora) -> concurrent.futures.Future:
        """``load(lora)`` on a worker thread (thread-safe; the first submit starts the worker(s))."""
        return self.pool.submit(self.load, lora)

    def close(self) -> None:
        """Stop the worker(s) without waiting: queued loads are cancelled, a load in flight finishes
        on its daemon thread and its result is dropped. A later ``submit`` starts new workers."""
        self.pool.close()
