"""engine/gc_heap.py: the start-up heap leaves the collector's full collections, what comes later is
still collected, and the long-lived entry points freeze once their engine is built. The freezing
runs in a child process (this test process builds and drops many engines)."""
from __future__ import annotations

import subprocess
import sys

CHILD = r"""
import gc
from jaxllm.engine.gc_heap import freeze_startup_heap

class Node:
    pass

def cycle():
    a, b = Node(), Node()
    a.other, b.other = b, a
    return a

startup = [cycle() for _ in range(50_000)]  # long-lived start-up objects, in reference cycles
garbage = cycle(); del garbage               # a cycle nobody holds: collected by the freeze's collection
frozen = freeze_startup_heap()
tracked = {id(o) for o in gc.get_objects()}
later = cycle(); probe = id(later); del later  # request-time garbage after the freeze
found = gc.collect()
print(frozen >= 100_000, id(startup[0]) not in tracked, gc.get_freeze_count() == frozen, found >= 2,
      all(id(o) != probe for o in gc.get_objects()))
"""


def test_freeze_moves_the_startup_heap_out_and_later_cycles_are_still_collected():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True"] * 5, out.stdout


def test_the_server_freezes_after_building_its_engine(monkeypatch):
    import serving.__main__ as entry
    from jaxllm.engine import factory, gc_heap

    order = []
    monkeypatch.setattr(factory, "build_engine", lambda config: order.append("build") or "engine")
    monkeypatch.setattr(gc_heap, "freeze_startup_heap", lambda: order.append("freeze") or 0)
    args = entry.parse_args(["--model", "smollm2-135m"])
    assert entry.engine_factory(args)() == "engine"
    assert order == ["build", "freeze"]
