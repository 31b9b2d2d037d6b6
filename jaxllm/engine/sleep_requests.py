"""LLMEngine's sleep mode (mixin, no jax): vLLM's ``sleep(level)`` / ``wake_up(tags)`` /
``is_sleeping()`` for RLHF loops that hand the accelerator to a trainer between rollouts.

Semantics (vLLM's, jaxllm's choices where vLLM leaves room):

* needs ``enable_sleep_mode=True`` (vLLM's flag; ValueError otherwise, before anything changes);
* ``sleep(level=1, mode="abort")``: every unfinished request is aborted first (vLLM's default pause
  mode "abort": finish_reason "abort", their KV blocks freed; the outputs are returned), the step in
  flight is read back, the prefix cache is reset (the blocks it names are about to be discarded),
  then the runner frees the device memory: level 1 keeps the weights in host RAM, level 2 drops them;
  waking them after level 2 maps the memory back (zeros, as vLLM's contents are undefined) without
  reading any checkpoint, and the weights stay *discarded* until a full ``load_weights`` or a
  ``reload_weights`` writes them (vLLM would generate garbage meanwhile; jaxllm refuses requests with
  :class:`WeightsDiscardedError`). vLLM's other pause modes ("wait", "keep") are refused by name;
  sleeping while asleep is a no-op (vLLM's);
* while any tag sleeps, ``add_request`` raises :class:`EngineSleepingError` (a RuntimeError; the
  servers answer 503 / UNAVAILABLE) and the engine has nothing to step;
* ``wake_up(tags=None)``: "weights" and/or "kv_cache" (None: both) come back; waking a tag that is
  awake is a no-op. ``is_sleeping()`` is True until every tag is awake (vLLM's).
"""

from __future__ import annotations

from jaxllm.outputs import RequestOutput

SLEEP_TAGS = ("weights", "kv_cache")
SLEEP_MODES = ("abort",)


class EngineSleepingError(RuntimeError):
    """A request reached an engine that is asleep (``sleep()`` until ``wake_up()``)."""


class WeightsDiscardedError(EngineSleepingError):
    """A request reached an engine whose weights a level-2 sleep discarded and nothing loaded since."""


class SleepMixin:
    def _init_sleep(self) -> None:
        self._sleeping: frozenset[str] = frozenset()  # tags whose device memory is freed
        self._sleep_level = 0

    def is_sleeping(self) -> bool:
        return bool(self._sleeping)

    @property
    def sleeping_tags(self) -> frozenset[str]:
        return self._sleeping

    @property
    def weights_discarded(self) -> bool:
        """Whether the weights are discarded (a level-2 sleep's wake-up, no full load since)."""
        return bool(getattr(self.runner, "weights_discarded", False))

    def _check_awake(self, what: str = "request") -> None:
        if self._sleeping:
            raise EngineSleepingError(
                f"{what} refused: the engine is sleeping (sleep(level={self._sleep_level}); asleep: "
                f"{sorted(self._sleeping)}); call wake_up() (HTTP: POST /wake_up) first")
        if self.weights_discarded:
            raise WeightsDiscardedError(
                f"{what} refused: the weights were discarded by sleep(level=2): load them with "
                f"load_weights(...) (every tensor) or reload_weights(path) (HTTP: POST /collective_rpc "
                f"with method reload_weights)")

    def sleep(self, level: int = 1, mode: str = "abort") -> list[RequestOutput]:
        """Abort every unfinished request, reset the prefix cache and free the device memory (level 1:
        weights to host RAM, KV cache discarded; level 2: both discarded). Returns the aborted
        requests' final outputs. See the module docstring."""
        if not getattr(self.config, "enable_sleep_mode", False):
            raise ValueError("sleep() needs enable_sleep_mode=True (vLLM's flag; the server's --enable-sleep-mode)")
        if isinstance(level, bool) or level not in (1, 2):
            raise ValueError(f"level={level!r} is invalid: must be 1 (weights offloaded to host RAM, KV cache "
                             f"discarded) or 2 (weights and KV cache discarded)")
        if mode not in SLEEP_MODES:
            raise ValueError(f"mode={mode!r} is invalid: must be one of {list(SLEEP_MODES)} (vLLM's 'wait' and "
                             f"'keep' are not supported: the KV cache of running requests is discarded)")
        if not hasattr(self.runner, "sleep"):
            raise ValueError(f"sleep() is not supported by this model runner ({type(self.runner).__name__})")
        if self._sleeping:
            return []
        outs = self.abort_request(list(self._parents) + list(self._embeds))
        self._release_if_idle()  # reads a step still in flight back and drops it
        if self._in_flight is not None or self.has_unfinished_requests():
            raise RuntimeError("sleep(): requests are still running after aborting them all (a bug)")
        if not self.kv.reset_prefix_cache():
            raise RuntimeError(f"sleep(): the prefix cache could not be reset ({self.kv.num_free_blocks} of "
                               f"{self.kv.num_blocks} blocks free)")
        self.runner.sleep(level)
        self._sleeping = frozenset(SLEEP_TAGS)
        self._sleep_level = level
        return outs

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Bring back the device memory of ``tags`` ("weights", "kv_cache"; None: both), with the
        shardings the compiled steps expect (nothing compiles after a wake-up)."""
        if tags is not None:
            if isinstance(tags, str) or not all(isinstance(t, str) for t in tags):
                raise ValueError(f"tags={tags!r} is invalid: must be a list of tags from {list(SLEEP_TAGS)} or None")
            bad = [t for t in tags if t not in SLEEP_TAGS]
            if bad:
                raise ValueError(f"tags={list(tags)!r} is invalid: unknown tag {bad[0]!r}; tags are {list(SLEEP_TAGS)}")
        want = frozenset(SLEEP_TAGS if tags is None else tags) & self._sleeping
        if not want:
            return
        self.runner.wake_up(sorted(want))
        self._sleeping = self._sleeping - want
        if not self._sleeping:
            self._sleep_level = 0
