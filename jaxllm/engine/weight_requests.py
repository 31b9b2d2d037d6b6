"""LLMEngine's weight updates (mixin, no jax): the other half of an RLHF loop's sleep mode. After a
training step the trainer pushes the new weights into the running engine (vLLM's
``llm.collective_rpc("reload_weights")`` / the worker model's ``load_weights(iterable of (name,
tensor))``) instead of building a new one.

* ``load_weights(weights)``: (HF tensor name, array) pairs, a full or partial set; the runner writes
  them into its device arrays with the same shardings (jaxllm/runner/weight_update.py);
* ``reload_weights(path=None)``: a checkpoint directory loaded whole (default: the one the engine was
  built from);
* ``collective_rpc(method, args, kwargs)``: vLLM's generic door, mapped onto those two; other methods
  are refused by name (there are no worker processes to run arbitrary methods on).

The engine must be idle (no unfinished request; a step in flight is read back first): jaxllm does
not mix two weight versions in one request, and the prefix cache is reset after every update (its
blocks hold KV computed with the old weights; vLLM resets it on reload too). RLHF loops pause or
abort before pushing (vLLM's ``/pause`` or ``sleep()``); a request arriving during the update waits
(the engine thread runs it between steps). While asleep, the weights tag must be awake: vLLM's
sequence ``sleep(2)`` → ``wake_up(["weights"])`` → ``load_weights`` → ``wake_up(["kv_cache"])`` works,
and loads once: the level-2 wake-up reads no checkpoint (the weights are zeros, *discarded*), so the
``load_weights`` after it must be full (a partial one is refused naming the missing tensors) or a
``reload_weights``; either clears the mark and requests run again.
"""

from __future__ import annotations

from jaxllm.engine.sleep_requests import EngineSleepingError

RPC_METHODS = ("reload_weights", "load_weights")


class EngineBusyError(RuntimeError):
    """A weight update reached an engine with unfinished requests (the HTTP door retries until idle)."""


class WeightUpdateMixin:
    def _ready_for_weights(self, what: str) -> None:
        if not hasattr(self.runner, "load_weights"):
            raise ValueError(f"{what} is not supported by this model runner ({type(self.runner).__name__})")
        if "weights" in self.sleeping_tags:
            raise EngineSleepingError(f"{what} refused: the weights are asleep (sleep(level={self._sleep_level})); "
                                      f"call wake_up(tags=['weights']) first (vLLM's RLHF order)")
        self._release_if_idle()  # a step still in flight is read back
        running = len(self._parents) + len(self._embeds)
        if running or self._in_flight is not None:
            raise EngineBusyError(f"{what} refused: {running} request(s) unfinished; the weights change only on an "
                               f"idle engine (abort them, let them finish, or sleep() first)")

    def _after_weights(self) -> None:
        if not self.kv.reset_prefix_cache():  # its blocks hold KV of the old weights
            raise RuntimeError(f"the prefix cache could not be reset after a weight update ({self.kv.num_free_blocks} "
                               f"of {self.kv.num_blocks} blocks free)")

    def load_weights(self, weights) -> int:
        """Write (HF name, tensor) pairs into the model; returns the number of tensors applied. A
        refused tensor (unknown name, wrong shape or dtype, quantized target) raises ValueError naming
        it, and nothing changes."""
        self._ready_for_weights("load_weights")
        n = self.runner.load_weights(weights)
        self._after_weights()
        return n

    def reload_weights(self, path: str | None = None) -> None:
        """Load the checkpoint at ``path`` (None: the one the engine was built from) into the model."""
        if path is not None and not isinstance(path, str):
            raise ValueError(f"weights_path={path!r} is invalid: must be a checkpoint directory path (a string)")
        self._ready_for_weights("reload_weights")
        self.runner.reload_weights_from(path)
        self._after_weights()

    def collective_rpc(self, method, args=(), kwargs=None) -> list:
        """vLLM's ``collective_rpc`` for the weight methods: ``reload_weights`` (kwargs ``weights_path``,
        or ``weights_iterator`` of (name, tensor) pairs) and ``load_weights`` (``weights``). One result
        per worker, as vLLM's: here one worker, so a one-element list."""
        if not isinstance(method, str):
            raise ValueError(f"method={method!r} is invalid: must be one of {list(RPC_METHODS)} (jaxllm runs no "
                             f"worker processes to send a callable to)")
        if method not in RPC_METHODS:
            raise ValueError(f"method={method!r} is invalid: collective_rpc supports {list(RPC_METHODS)}")
        kwargs = dict(kwargs or {})
        args = tuple(args or ())
        names = ("weights_iterator", "weights_path") if method == "reload_weights" else ("weights",)
        if len(args) > len(names):
            raise ValueError(f"args={list(args)!r} is invalid: {method} takes at most {len(names)} ({', '.join(names)})")
        for name, value in zip(names, args):
            if name in kwargs:
                raise ValueError(f"kwargs.{name}: given twice (in args too)")
            kwargs[name] = value
        bad = [k for k in kwargs if k not in names]
        if bad:
            raise ValueError(f"kwargs.{bad[0]}: unknown to {method} (it takes {', '.join(names)})")
        if method == "load_weights":
            if "weights" not in kwargs:
                raise ValueError("kwargs.weights: missing (load_weights needs (name, tensor) pairs)")
            return [self.load_weights(kwargs["weights"])]
        if kwargs.get("weights_iterator") is not None:
            if kwargs.get("weights_path") is not None:
                raise ValueError("kwargs.weights_path: give weights_iterator or weights_path, not both")
            self.load_weights(kwargs["weights_iterator"])
        else:
            self.reload_weights(kwargs.get("weights_path"))
        return [None]
