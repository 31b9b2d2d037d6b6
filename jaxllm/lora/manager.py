"""LoRAManager: the host side of multi-LoRA (no jax).

Four tables, one owner (the engine thread; only the loader's worker runs elsewhere):

- **registry** ``{lora_int_id: LoRARequest}``: the adapters the engine knows (``add_lora`` /
  ``remove_lora`` / ``list_loras``, vLLM's ``LLMEngine`` methods; a request's own LoRARequest
  registers it too, once its load succeeds). An id names one adapter for good: the same id with
  another name or path, or the same name under another id (loading or registered), is refused.
- **host cache**: loaded adapters, least recently used evicted first once more than
  ``max_cpu_loras`` are loaded. An adapter is *pinned* while an unfinished request uses it
  (``acquire`` at add_request, ``release`` when the request finishes, aborts or fails) and is never
  evicted then, so a scheduled request never waits on a load: when every entry is pinned a new
  adapter still loads (the cache holds more than ``max_cpu_loras`` until pins drop; vLLM queues such
  requests too) and waits for a device slot in the scheduler.
- **loads in flight** ``loading {lora_int_id: _Load}``: ``acquire`` of an adapter that is not in
  the host cache starts its load on the loader thread (``AdapterLoader.submit``: the files are read
  and validated off the engine thread) and returns at once; the scheduler leaves the requests of a
  loading adapter waiting (``Scheduler.loading_loras`` is this dict) while everything else runs.
  ``poll()``, on the engine thread before each schedule, moves finished loads into the host cache
  and the registry, and returns the failed ones for the engine to fail their requests.
- **slot table** ``device slot (1..max_loras) -> lora_int_id``: ``assign_slots(out, resident)``
  gives every scheduled seq its ``lora_slot`` (0 = the base model) and, for an adapter not in a
  slot yet, calls ``set_lora(slot, adapter)`` (the runner writes the device slot in place) before
  the step is dispatched. It takes a free slot, else evicts the least recently used slot whose
  adapter is neither in this step nor ``resident`` (the adapters of running requests). The
  scheduler admits at most ``max_loras`` distinct adapters among running requests, so a slot
  is always found; a RuntimeError otherwise (a scheduler bug, not user input).

Errors from ``load_fn`` (a bad adapter: ValueError naming the file and tensor, by contract) become
one-line ValueErrors (``loader.load_error``): raised by ``add_lora``, returned by ``poll`` for a
request's load. A failed load registers nothing; the tables are unchanged after any refusal.
Removing an adapter whose load is in flight (no request waits for it any more) drops the load: its
result is never used.
"""

from __future__ import annotations

import concurrent.futures
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jaxllm.lora.loader import AdapterLoader, LoadFn, load_error
from jaxllm.lora.request import LoRARequest

SetLoraFn = Callable[[int, Any], None]  # (slot 1..max_loras, adapter | None)


@dataclass(frozen=True)
class _Load:
    """A load in flight: the request's adapter and the loader's future (a LoRAAdapter, or the
    one-line ValueError)."""
    lora: LoRARequest
    future: concurrent.futures.Future


class LoRAManager:
    def __init__(self, max_loras: int, max_cpu_loras: int | None, load_fn: LoadFn,
                 set_lora: SetLoraFn, loader_workers: int = 1) -> None:
        if max_cpu_loras is None:
            max_cpu_loras = max_loras
        if max_cpu_loras < max_loras:
            raise ValueError(f"max_cpu_loras={max_cpu_loras} is invalid: must be >= max_loras={max_loras}")
        self.max_loras = max_loras
        self.max_cpu_loras = max_cpu_loras
        self.loader = AdapterLoader(load_fn, loader_workers)
        self.loading: dict[int, _Load] = {}  # lora_int_id -> its load in flight (the engine thread's)
        self._set_lora = set_lora
        self._registry: dict[int, LoRARequest] = {}
        self._by_name: dict[str, int] = {}
        self._cache: OrderedDict[int, Any] = OrderedDict()  # id -> adapter, least recent first
        self._pins: Counter[int] = Counter()  # id -> unfinished requests using it
        self._slots: list[int | None] = [None] * max_loras  # slot s at index s - 1
        self._slot_by_id: dict[int, int] = {}  # lora_int_id -> slot (the inverse of _slots)
        self._slot_used: list[int] = [0] * max_loras  # step counter when each slot was last used
        self._step = 0
        self._removed: dict[int, int] = {}  # lora_int_id -> times removed (prefix-cache namespace)
        self.num_loads = 0  # adapters put into the host cache (host cache misses)
        self.num_slot_loads = 0  # set_lora calls with an adapter

    # ----- registry (vLLM's add_lora / remove_lora / list_loras) -------------------------------
    def add_lora(self, lora: LoRARequest, adapter: Any = None) -> bool:
        """Register ``lora`` and put it into the host cache (LRU): ``adapter`` when given (loaded off
        the engine thread by ``loader.submit``: the servers' LoadAdapter), else loaded here on the
        caller's thread (a load in flight for it is waited for). True on success; ValueError (one
        line) for a conflicting id/name or a bad adapter. Requests waiting for its load may run
        from the next schedule."""
        self._check(lora)
        lid = lora.lora_int_id
        if lid in self._cache:
            self._cache.move_to_end(lid)
            self._register(lora)
            return True
        if adapter is None:
            job = self.loading.get(lid)
            # a failed load in flight raises here and stays in ``loading``: poll() fails its requests
            adapter = job.future.result() if job is not None else self.loader.load(lora)
        self.loading.pop(lid, None)
        self._install(lora, adapter)
        return True

    def remove_lora(self, lora_int_id: int) -> bool:
        """Forget an adapter (registry, host cache, device slot, a load in flight). False if the id
        is unknown; ValueError while unfinished requests use it (or wait for its load)."""
        job = self.loading.get(lora_int_id)
        if lora_int_id not in self._registry and job is None:
            return False
        if self._pins[lora_int_id]:
            name = (self._registry.get(lora_int_id) or job.lora).lora_name
            raise ValueError(f"lora_int_id={lora_int_id} is invalid to remove now: {self._pins[lora_int_id]} "
                             f"unfinished request(s) use adapter {name!r}")
        self._removed[lora_int_id] = self._removed.get(lora_int_id, 0) + 1
        if job is not None:  # its requests are gone (aborted): the load's result is never used
            del self.loading[lora_int_id]
            job.future.cancel()
        lora = self._registry.pop(lora_int_id, None)
        if lora is not None:
            self._by_name.pop(lora.lora_name, None)
        self._cache.pop(lora_int_id, None)
        self._pins.pop(lora_int_id, None)
        slot = self._slot_by_id.pop(lora_int_id, None)
        if slot is not None:
            self._slots[slot - 1] = None  # the device slot is simply reused later (nothing reads it)
        return True

    def list_loras(self) -> set[int]:
        return set(self._registry)

    def lora_requests(self) -> list[LoRARequest]:
        """The registered adapters, by id."""
        return [self._registry[i] for i in sorted(self._registry)]

    def get(self, name: str) -> LoRARequest | None:
        i = self._by_name.get(name)
        return None if i is None else self._registry[i]

    def cache_key(self, lora_int_id: int):
        """The adapter's prefix-cache namespace (``Request.extra_key``): its ``lora_int_id``, or, once
        that id was removed and registered again (maybe another adapter under the same id),
        ``(lora_int_id, times removed)``, so KV cached under the old registration is never hit."""
        gen = self._removed.get(lora_int_id, 0)
        return lora_int_id if gen == 0 else (lora_int_id, gen)

    # ----- per request ---------------------------------------------------------------------------
    def acquire(self, lora: LoRARequest) -> bool:
        """A new request uses ``lora``: pin it; if it is neither in the host cache nor loading, start
        its load on the loader thread. True when the adapter is ready, False while it loads (the
        request waits in the scheduler; ``poll`` reports the outcome). ValueError (nothing changed)
        only for a conflicting id or name; a bad adapter fails the request later, through ``poll``."""
        self._check(lora)
        lid = lora.lora_int_id
        ready = lid in self._cache
        if ready:
            self._cache.move_to_end(lid)
            self._register(lora)
        elif lid not in self.loading:
            self.loading[lid] = _Load(lora, self.loader.submit(lora))
        self._pins[lid] += 1
        return ready

    def release(self, lora_int_id: int) -> None:
        """A request that acquired ``lora_int_id`` is gone (finished, aborted or failed)."""
        if self._pins[lora_int_id] <= 1:
            self._pins.pop(lora_int_id, None)
            self._shrink()
        else:
            self._pins[lora_int_id] -= 1

    def num_pinned(self) -> int:
        return len(self._pins)

    # ----- loads in flight (engine thread) ----------------------------------------------------------
    def poll(self) -> list[tuple[int, ValueError]]:
        """Take the loads that finished: a loaded adapter enters the host cache and the registry (its
        requests may be scheduled now); a failed one registers nothing and is returned as
        ``(lora_int_id, one-line ValueError)`` for the engine to fail the requests pinned to it."""
        failed = []
        for lid, job in list(self.loading.items()):
            if not job.future.done():
                continue
            del self.loading[lid]
            try:
                adapter = job.future.result()
            except Exception as exc:  # noqa: BLE001 - the loader's one-line ValueError
                failed.append((lid, exc if isinstance(exc, ValueError) else load_error(job.lora, exc)))
                continue
            self._install(job.lora, adapter)
        return failed

    def wait(self, timeout: float) -> None:
        """Block until a load in flight finishes, at most ``timeout`` seconds (the engine, when
        nothing else can be scheduled)."""
        futures = [job.future for job in self.loading.values()]
        if futures:
            concurrent.futures.wait(futures, timeout, return_when=concurrent.futures.FIRST_COMPLETED)

    def close(self) -> None:
        """Stop the loader thread without waiting (queued loads cancelled; LLMEngine.close)."""
        self.loader.close()

    # ----- per step ------------------------------------------------------------------------------
    def slot_of(self, lora_int_id: int) -> int | None:
        return self._slot_by_id.get(lora_int_id)

    def assign_slots(self, out, resident: set[int]) -> None:
        """Set ``lora_slot`` on each seq of SchedulerOutput ``out`` (its ``requests`` carry
        ``lora_request``), loading adapters into device slots first where needed."""
        self._step += 1
        step_ids = {r.lora_request.lora_int_id for r in out.requests if r.lora_request is not None}
        keep = step_ids | resident
        for seq, req in zip(out.seqs, out.requests):
            lora = req.lora_request
            if lora is None:
                seq.lora_slot = 0
                continue
            slot = self.slot_of(lora.lora_int_id)
            if slot is None:
                slot = self._free_slot(keep)
                adapter = self._cache.get(lora.lora_int_id)
                assert adapter is not None, f"adapter {lora.lora_int_id} scheduled but not loaded (not pinned?)"
                self._set_lora(slot, adapter)
                self.num_slot_loads += 1
                old = self._slots[slot - 1]
                if old is not None:
                    del self._slot_by_id[old]
                self._slots[slot - 1] = lora.lora_int_id
                self._slot_by_id[lora.lora_int_id] = slot
            self._slot_used[slot - 1] = self._step
            seq.lora_slot = slot

    def _free_slot(self, keep: set[int]) -> int:
        free = [i for i, sid in enumerate(self._slots) if sid is None]
        if not free:
            free = sorted((i for i, sid in enumerate(self._slots) if sid not in keep),
                          key=lambda i: self._slot_used[i])
        if not free:
            raise RuntimeError(f"no free LoRA slot: max_loras={self.max_loras} slots all hold adapters "
                               f"of running requests {sorted(keep)} (the scheduler admitted too many)")
        return free[0] + 1

    # ----- internals -------------------------------------------------------------------------------
    def _check(self, lora: LoRARequest) -> None:
        if not isinstance(lora, LoRARequest):
            raise ValueError(f"lora_request of type {type(lora).__name__} is invalid: must be a LoRARequest")
        job = self.loading.get(lora.lora_int_id)
        known = self._registry.get(lora.lora_int_id) or (job.lora if job is not None else None)
        if known is not None and known != lora:
            raise ValueError(f"lora_int_id={lora.lora_int_id} is invalid: already registered as "
                             f"{known.lora_name!r} ({known.lora_path}), not {lora.lora_name!r} ({lora.lora_path})")
        other = self._by_name.get(lora.lora_name)
        if other is None:
            other = next((i for i, j in self.loading.items() if j.lora.lora_name == lora.lora_name), None)
        if other is not None and other != lora.lora_int_id:
            raise ValueError(f"lora_name={lora.lora_name!r} is invalid: already registered with "
                             f"lora_int_id={other}, not {lora.lora_int_id}")

    def _register(self, lora: LoRARequest) -> None:
        self._registry[lora.lora_int_id] = lora
        self._by_name[lora.lora_name] = lora.lora_int_id

    def _install(self, lora: LoRARequest, adapter: Any) -> None:
        lid = lora.lora_int_id
        self.num_loads += 1
        self._cache[lid] = adapter
        self._cache.move_to_end(lid)
        self._register(lora)
        self._shrink(keep=lid)

    def _shrink(self, keep: int | None = None) -> None:
        """Evict least recently used unpinned adapters (never ``keep``) down to ``max_cpu_loras``;
        a device slot's copy stays valid until the slot is reused."""
        while len(self._cache) > self.max_cpu_loras:
            victim = next((i for i in self._cache if not self._pins[i] and i != keep), None)
            if victim is None:
                return  # every other entry is in use by unfinished requests
            del self._cache[victim]


def default_load_fn(model_config, max_lora_rank: int, prepare=None) -> LoadFn:
    """The real loader: ``jaxllm.lora.peft.load_adapter`` (imported here, not in the first load: an
    import on the loader thread would hold the GIL against the engine's first steps), then
    ``prepare`` (the runner's ``prepare_lora``: checked and cast, at the adapter's own rank) when
    given. Runs on the loader thread: the engine thread is left the device write (``set_lora``:
    sent at the adapter's rank bucket, padded to ``max_lora_rank`` on the device)."""
    from jaxllm.lora.peft import load_adapter

    def load(lora: LoRARequest):
        adapter = load_adapter(lora.lora_path, model_config, max_lora_rank, name=lora.lora_name)
        return adapter if prepare is None else prepare(adapter)

    return load
