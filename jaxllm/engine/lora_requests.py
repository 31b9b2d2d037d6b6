"""LLMEngine's multi-LoRA side (mixin, no jax): the adapter manager, vLLM's
``add_lora`` / ``remove_lora`` / ``list_loras``, a request's adapter at ``add_request``, and each
step's device slots.

- ``enable_lora=False``: any ``lora_request`` is refused (one line naming enable_lora).
- ``add_request(..., lora_request=LoRARequest)``: checked and pinned before the request is admitted
  (``LoRAManager.acquire``; a conflicting id/name is a one-line ValueError there). An adapter not in
  the host cache is loaded on the loader thread (``jaxllm/lora/loader.py``), never on this one: the
  request waits in the scheduler meanwhile while every other request keeps stepping. Before each
  step the engine takes the finished loads (``_poll_lora_loads``); a failed load fails exactly the
  requests waiting for it (``take_request_errors``: the one-line ValueError naming the file and the
  field; they held no blocks and their pins are released). The request's ``extra_key`` is the
  adapter's ``lora_int_id``
  (``LoRAManager.cache_key``: with a removal count once the id was removed and reused): it is part
  of every block hash, so two adapters never share KV blocks and one adapter's requests do.
- every step: ``LoRAManager.assign_slots`` sets each seq's ``lora_slot`` and loads adapters into
  device slots (``runner.set_lora``) before the step is dispatched; the scheduler keeps the
  adapters of running requests within ``max_loras``.
- a request's pin is released when it finishes, is aborted (also while its adapter loads), or fails.
- ``add_lora(lora)`` loads on the caller's thread (vLLM's ``LLM.add_lora`` is synchronous too);
  ``load_lora_adapter(lora)`` (thread-safe) loads on the loader thread and returns a future whose
  adapter ``add_lora(lora, adapter)`` installs on the engine thread: the servers' LoadAdapter.
"""

from __future__ import annotations

from jaxllm.lora.manager import LoadFn, LoRAManager
from jaxllm.lora.request import LoRARequest


class LoRARequestsMixin:
    lora: LoRAManager | None

    def _init_lora(self, config, runner, lora_load_fn: LoadFn | None) -> None:
        self.lora = None
        self._lora_of: dict[str, int] = {}  # parent request id -> lora_int_id it pinned
        if not config.enable_lora:
            return
        if lora_load_fn is None:
            raise ValueError("enable_lora=True is invalid without an adapter loader: pass lora_load_fn "
                             "(build_engine passes jaxllm.lora.peft.load_adapter)")
        set_lora = getattr(runner, "set_lora", None)
        if set_lora is None:
            raise ValueError(f"enable_lora=True is invalid for this model runner "
                             f"({type(runner).__name__} has no set_lora)")
        self.lora = LoRAManager(config.max_loras, config.max_cpu_loras, lora_load_fn, set_lora)
        self.scheduler.loading_loras = self.lora.loading  # their requests wait, others run

    # ----- vLLM's LLMEngine methods ------------------------------------------------------------
    def add_lora(self, lora_request: LoRARequest, adapter=None) -> bool:
        """Register ``lora_request``'s adapter: ``adapter`` if given (from ``load_lora_adapter``),
        else loaded now on this thread. One-line ValueError for a bad adapter or a conflict."""
        return self._lora_manager("add_lora").add_lora(lora_request, adapter)

    def load_lora_adapter(self, lora_request: LoRARequest):
        """Thread-safe: read and check ``lora_request``'s files on the loader thread, registering
        nothing; a ``concurrent.futures.Future`` of the adapter (or of add_lora's one-line
        ValueError). Pass its result to ``add_lora(lora_request, adapter)`` on the engine thread."""
        return self._lora_manager("load_lora_adapter").loader.submit(lora_request)

    def remove_lora(self, lora_id: int) -> bool:
        return self._lora_manager("remove_lora").remove_lora(lora_id)

    def list_loras(self) -> set[int]:
        return set() if self.lora is None else self.lora.list_loras()

    def lora_requests(self) -> list[LoRARequest]:
        """The registered adapters (what the servers list), by id."""
        return [] if self.lora is None else self.lora.lora_requests()

    def _lora_manager(self, what: str) -> LoRAManager:
        if self.lora is None:
            raise ValueError(f"enable_lora=False is invalid for {what}: start the engine with enable_lora=True")
        return self.lora

    # ----- per request ---------------------------------------------------------------------------
    def _check_lora_request(self, lora_request, params) -> None:
        """Everything about ``lora_request`` that needs no load (called with the other checks)."""
        if lora_request is None:
            return
        if self.lora is None:
            raise ValueError(f"lora_request={getattr(lora_request, 'lora_name', lora_request)!r} is invalid: "
                             f"this engine runs without adapters (start it with enable_lora=True)")
        if not isinstance(lora_request, LoRARequest):
            raise ValueError(f"lora_request of type {type(lora_request).__name__} is invalid: "
                             f"must be a jaxllm.lora.LoRARequest or None")

    def _acquire_lora(self, request_id: str, lora_request: LoRARequest | None) -> None:
        """Pin the request's adapter, starting its load if needed: the last check of add_request
        (ValueError for a conflict, nothing changed); the pin is released by ``_release_lora`` when
        the request is gone."""
        if lora_request is None:
            return
        self.lora.acquire(lora_request)
        self._lora_of[request_id] = lora_request.lora_int_id

    def _release_lora(self, request_id: str) -> None:
        lid = self._lora_of.pop(request_id, None)
        if lid is not None:
            self.lora.release(lid)

    # ----- per step ------------------------------------------------------------------------------
    def _poll_lora_loads(self) -> None:
        """Take finished adapter loads (their requests may be scheduled now); fail the requests
        whose adapter failed to load (no output; the error in take_request_errors)."""
        if self.lora is None or not self.lora.loading:
            return
        for lid, exc in self.lora.poll():
            for rid in [r for r, i in self._lora_of.items() if i == lid]:
                parent = self._parents.get(rid)
                if parent is not None:  # waiting (an adapter that loads runs nobody): no blocks yet
                    self._fail_request(parent, exc)

    def _lora_loading(self) -> bool:
        """Some adapter is loading (an empty schedule is then normal: its requests wait for it)."""
        return self.lora is not None and bool(self.lora.loading)

    def _assign_lora_slots(self, out) -> None:
        if self.lora is not None:
            self.lora.assign_slots(out, self.scheduler.resident_loras())
