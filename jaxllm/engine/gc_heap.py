"""Freeze the start-up heap out of Python's garbage collector once an engine is built.

An engine process holds ~190k long-lived objects after start-up (jax, the tokenizer, the model's
modules); every full (generation-2) collection walks all of them: 135-176 ms on this 2-core box,
about once per 130 decode steps at 256 sequences (`bench/host_overhead.py --num-seqs 256 --steps 400
--gc`), a stall of the whole step pipeline that lands in inter-token latency's tail. `gc.freeze()`
after a collection moves them to the permanent generation, and later full collections walk only
what the requests made (~5 ms). vLLM's servers do the same after start-up.

Long-lived entry points call it (the servers, `python -m jaxllm.generate`); the offline `LLM` does
not: a process that builds and drops engines would never collect a frozen engine's reference
cycles (and the device buffers they hold)."""
from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collect, then freeze what survives. Returns the number of objects now frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
