"""LoRAManager alone: host LRU with pins, registry conflicts, slot table, loads in flight (no
engine, no jax). ``acquire`` of an adapter not in the host cache starts its load on the loader
thread; ``settle`` waits for it and takes it, as the engine does before a step."""

from __future__ import annotations

import concurrent.futures

import pytest

from jaxllm.core.request import Request
from jaxllm.core.scheduler_output import ScheduledSeq, SchedulerOutput
from jaxllm.lora.manager import LoRAManager
from jaxllm.sampling_params import SamplingParams
from tests.lora.host_fakes import FakeLoader, lora


def make(max_loras=2, max_cpu_loras=3):
    loader, calls = FakeLoader(), []
    m = LoRAManager(max_loras, max_cpu_loras, loader, lambda slot, a: calls.append((slot, a.name)))
    return m, loader, calls


def settle(m):
    """Wait for every load in flight, then ``poll`` (what the engine does before each step)."""
    concurrent.futures.wait([job.future for job in m.loading.values()])
    return m.poll()


def step(ids):
    """A SchedulerOutput with one seq per entry of ``ids`` (an adapter id, or None = base)."""
    p = SamplingParams()
    reqs = [Request(f"r{i}", [5], p, seed=0, lora_request=None if a is None else lora(a))
            for i, a in enumerate(ids)]
    seqs = [ScheduledSeq(r.request_id, [5], 0, [0], True, 1, p, 0) for r in reqs]
    return SchedulerOutput(seqs=seqs, num_batched_tokens=len(seqs), requests=reqs)


def test_host_lru_and_pins():
    m, loader, _ = make(max_cpu_loras=3)
    assert m.add_lora(lora(1)) and m.add_lora(lora(2)) and m.add_lora(lora(3))
    assert m.list_loras() == {1, 2, 3} and loader.loads == {1: 1, 2: 1, 3: 1}
    m.acquire(lora(1))  # a hit: no load, pinned, most recent (LRU order now 2, 3, 1)
    assert loader.loads[1] == 1
    m.add_lora(lora(4))  # evicts the least recently used unpinned one: 2 (order 3, 1, 4)
    assert list(m._cache) == [3, 1, 4] and m.list_loras() == {1, 2, 3, 4}  # still registered
    assert not m.acquire(lora(2))  # reloaded (off-thread), evicting 3 (1 is pinned, 3 is older than 4)
    assert list(m._cache) == [3, 1, 4] and set(m.loading) == {2}  # nothing evicted before it is loaded
    assert settle(m) == [] and not m.loading
    assert loader.loads[2] == 2 and list(m._cache) == [1, 4, 2]
    assert m.acquire(lora(4))  # a hit: ready at once
    assert list(m._cache) == [1, 2, 4] and m.num_pinned() == 3  # acquire(4) made 4 the most recent
    m.acquire(lora(3))  # every entry pinned: 3 loads anyway, over max_cpu_loras while they run
    settle(m)
    assert list(m._cache) == [1, 2, 4, 3] and m.num_pinned() == 4 and loader.loads[3] == 2
    m.release(2)  # 2 unpinned: evicted at once, back to max_cpu_loras
    assert list(m._cache) == [1, 4, 3]


def test_all_pinned_loads_over_the_limit_then_shrinks():
    m, loader, _ = make(max_loras=1, max_cpu_loras=2)
    m.acquire(lora(1)), settle(m), m.acquire(lora(2)), settle(m)
    m.acquire(lora(3))  # a 3rd adapter in use: loaded, not refused
    settle(m)
    assert loader.loads[3] == 1 and list(m._cache) == [1, 2, 3] and m.num_pinned() == 3
    m.release(3)  # the only unpinned entry: evicted (LRU among unpinned), back to max_cpu_loras
    assert list(m._cache) == [1, 2]
    m.release(1)  # within the limit: kept for the next request
    assert list(m._cache) == [1, 2]
    m.acquire(lora(3))  # reloaded, evicting 1 (unpinned, least recent)
    settle(m)
    assert loader.loads[3] == 2 and list(m._cache) == [2, 3]


def test_load_error_is_one_line_and_registers_nothing():
    m, _, _ = make()
    with pytest.raises(ValueError) as ei:  # add_lora loads on the caller's thread and raises there
        m.add_lora(lora(1, "bad:/tmp/x"))
    assert m.list_loras() == set() and not m.loading
    assert not m.acquire(lora(1, "bad:/tmp/x"))  # a request's load fails later, through poll
    failed = settle(m)
    assert [(lid, str(exc)) for lid, exc in failed] == [(1, str(ei.value))]
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith("lora_request='adapter1' is invalid: adapter at bad:/tmp/x")
    assert "rank 99 > max_lora_rank=16" in msg
    m.release(1)  # the engine fails the request, which releases its pin
    assert m.list_loras() == set() and m.num_pinned() == 0 and not m._cache and not m.loading


def test_registry_conflicts_and_remove():
    m, _, _ = make()
    m.add_lora(lora(1))
    m.acquire(lora(5))  # loading: its id and name are taken already
    with pytest.raises(ValueError, match=r"^lora_int_id=5 is invalid: already registered as 'adapter5'"):
        m.acquire(lora(5, "/elsewhere"))
    from jaxllm.lora import LoRARequest
    with pytest.raises(ValueError, match=r"^lora_name='adapter5' is invalid: already registered with lora_int_id=5"):
        m.add_lora(LoRARequest("adapter5", 6, "/adapters/a5"))
    with pytest.raises(ValueError, match=r"^lora_int_id=1 is invalid: already registered as 'adapter1'"):
        m.add_lora(lora(1, "/elsewhere"))
    with pytest.raises(ValueError, match=r"^lora_name='adapter1' is invalid: already registered with lora_int_id=1"):
        m.add_lora(LoRARequest("adapter1", 7, "/adapters/a1"))
    m.acquire(lora(1))
    with pytest.raises(ValueError, match=r"^lora_int_id=1 is invalid to remove now: 1 unfinished"):
        m.remove_lora(1)
    m.release(1)
    assert m.remove_lora(1) and not m.remove_lora(1) and m.list_loras() == set()
    assert m.get("adapter1") is None


def test_slots_load_once_and_evict_the_least_recent_unused():
    m, _, calls = make(max_loras=2, max_cpu_loras=4)
    for i in (1, 2, 3):
        m.acquire(lora(i))
    settle(m)
    out = step([1, None, 2, 1])
    m.assign_slots(out, resident=set())
    assert [s.lora_slot for s in out.seqs] == [1, 0, 2, 1]
    assert calls == [(1, "adapter1"), (2, "adapter2")]
    out = step([2])
    m.assign_slots(out, resident={1, 2})
    assert [s.lora_slot for s in out.seqs] == [2] and len(calls) == 2  # resident: no reload
    # 3 needs a slot: 1 (not in the step, not resident) goes, although 2 is older in slot order
    out = step([3])
    m.assign_slots(out, resident={2})
    assert out.seqs[0].lora_slot == 1 and calls[-1] == (1, "adapter3")
    # both slots pinned by the step / running requests: a scheduler bug, loudly
    m.acquire(lora(4))
    settle(m)
    with pytest.raises(RuntimeError, match="no free LoRA slot"):
        m.assign_slots(step([4]), resident={2, 3})
