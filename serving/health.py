"""Health that never lies: a monitor task deciding SERVING / NOT_SERVING (no jax).

SERVING iff all of:
  1. the engine is built and warm (the AsyncEngine's ready future resolved) and the first
     synthetic request succeeded;
  2. the server is not draining;
  3. the engine loop is alive (step never raised, thread running);
  4. the loop heartbeat is younger than ``watchdog_timeout`` (the thread refreshes it after
     every step, and every ``idle_tick`` while idle; a step that hangs stops it);
  5. (not while the engine sleeps, LLMEngine.sleep, or its weights wait for a load after a level-2
     sleep: no probe runs, and SERVING as vLLM's /health)
     the latest synthetic request (``max_tokens=1`` every ``health_probe_interval`` s) succeeded
     and none is pending for longer than ``watchdog_timeout`` -- unless other requests received
     tokens within the last ``watchdog_timeout`` (a busy engine queues the probe; it is not wedged).

The status is re-evaluated every ``tick`` seconds (<= watchdog_timeout / 4) and at once on
engine death and on drain, so NOT_SERVING is reported at most ``watchdog_timeout + tick`` after
a hang starts, and within ``tick`` of a raise.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any, Callable

from grpc_health.v1 import health_pb2

from jaxllm.pooling_params import PoolingParams
from jaxllm.sampling_params import SamplingParams

from serving.config import GENERATION_SERVICE, ServerConfig

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
from serving.frontdoor import PROBE_PREFIX  # noqa: E402,F401  (re-exported)


def _sleeping(ae: Any) -> bool:
    """Whether the engine sleeps (LLMEngine.is_sleeping; a frozenset read, safe from the loop) or its
    weights wait for a load after a level-2 sleep (requests refused: no probe either)."""
    engine = getattr(ae, "engine", None)
    fn = getattr(engine, "is_sleeping", None)
    return (bool(fn()) if callable(fn) else False) or getattr(engine, "weights_discarded", False) is True


class HealthMonitor:
    def __init__(self, cfg: ServerConfig, health_servicer: Any, get_engine: Callable[[], Any],
                 is_draining: Callable[[], bool], probe_token_ids: Callable[[], list[int]]):
        self.cfg = cfg
        self.health = health_servicer
        self._get_engine = get_engine
        self._is_draining = is_draining
        self._probe_token_ids = probe_token_ids
        self.tick = min(0.25, cfg.watchdog_timeout / 4, cfg.health_probe_interval / 2)
        self.status = NOT_SERVING
        self.reason = "starting: loading the model"
        self.probe_ok: bool | None = None  # None = no probe finished yet
        self.probe_error: str | None = None
        self.last_probe_start = 0.0
        self.probe_successes = 0
        self.probe_failures = 0
        self._probe_task: asyncio.Task | None = None
        self._probe_started: float | None = None
        self._ids = itertools.count()
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()

    # ----- evaluation ---------------------------------------------------------------
    def evaluate(self, now: float | None = None) -> tuple[bool, str]:
        now = time.monotonic() if now is None else now
        wd = self.cfg.watchdog_timeout
        if self._is_draining():
            return False, "draining: shutting down"
        ae = self._get_engine()
        if ae is None or not ae.ready:
            if ae is not None and ae.dead is not None:
                return False, f"engine failed to start: {ae.dead!r}"
            return False, "starting: loading the model and compiling"
        if ae.dead is not None:
            return False, f"engine loop died: {ae.dead!r}"
        if not ae.is_alive:
            return False, "engine loop is not running"
        age = ae.heartbeat_age(now)
        if age > wd:
            return False, (f"engine loop wedged: no heartbeat for {age:.1f}s "
                           f"(watchdog {wd:g}s)")
        if _sleeping(ae):  # LLMEngine.sleep(): alive, refusing requests until wake_up (vLLM's /health: 200)
            return True, "sleeping"
        if self.probe_ok is None:
            return False, "starting: waiting for the first synthetic request"
        progressing = now - ae.last_output_time <= wd
        if not self.probe_ok and not progressing:
            return False, f"synthetic request failed: {self.probe_error}"
        if (self._probe_started is not None and now - self._probe_started > wd
                and not progressing):
            return False, (f"synthetic request pending for {now - self._probe_started:.1f}s "
                           f"(watchdog {wd:g}s)")
        return True, "ok"

    async def update(self) -> None:
        async with self._lock:
            ok, reason = self.evaluate()
            status = SERVING if ok else NOT_SERVING
            if status != self.status or reason != self.reason and not ok:
                if status != self.status:
                    log.log(logging.INFO if ok else logging.WARNING, "health: %s (%s)",
                            "SERVING" if ok else "NOT_SERVING", reason)
                self.status, self.reason = status, reason
                await self.health.set("", status)
                await self.health.set(GENERATION_SERVICE, status)

    # ----- probe ----------------------------------------------------------------------
    async def _probe(self, ae: Any) -> None:
        rid = f"{PROBE_PREFIX}{next(self._ids)}"
        embed = getattr(getattr(ae, "engine", None), "task", "generate") in ("embed", "classify")
        # an embedding or classify engine refuses SamplingParams: probe it with a one-token request
        params = PoolingParams() if embed else SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        self._probe_started = time.monotonic()
        ok, err = False, None
        try:
            async with asyncio.timeout(self.cfg.watchdog_timeout):
                async for out in ae.generate(rid, {"prompt_token_ids": self._probe_token_ids()},
                                             params):
                    if out.finished:
                        if embed:
                            pooled = getattr(out.outputs, "embedding", None) or getattr(out.outputs, "probs", None)
                            ok = pooled is not None and len(pooled) >= 1
                        else:
                            ok = bool(out.outputs) and len(out.outputs[0].token_ids) >= 1
                        if not ok:
                            err = "finished without " + ("an embedding" if embed else "a token")
        except TimeoutError:
            err = f"no token within {self.cfg.watchdog_timeout:g}s"
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            err = f"{type(exc).__name__}: {exc}"
        finally:
            self._probe_started = None
        if not ok and _sleeping(ae):  # aborted or refused by a sleep: says nothing about health
            return
        self.probe_ok, self.probe_error = ok, err
        if ok:
            self.probe_successes += 1
        else:
            self.probe_failures += 1
            log.warning("health probe failed: %s", err)
        await self.update()

    # ----- task -----------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="health-monitor")

    async def _run(self) -> None:
        while True:
            try:
                ae = self._get_engine()
                now = time.monotonic()
                if (ae is not None and ae.ready and ae.dead is None and not self._is_draining() and not _sleeping(ae)
                        and (self._probe_task is None or self._probe_task.done())
                        and now - self.last_probe_start >= self._probe_period()):
                    self.last_probe_start = now
                    self._probe_task = asyncio.get_running_loop().create_task(self._probe(ae))
                await self.update()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the monitor die
                log.exception("health monitor iteration failed")
            await asyncio.sleep(self.tick)

    def _probe_period(self) -> float:
        if self.probe_ok is None and self.probe_failures == 0:
            return 0.0  # first probe: at once
        if not self.probe_ok:  # failing: retry sooner so recovery shows quickly
            return min(self.cfg.health_probe_interval, max(4 * self.tick, 1.0))
        return self.cfg.health_probe_interval

    async def stop(self) -> None:
        for t in (self._task, self._probe_task):
            if t is not None and not t.done():
                t.cancel()
                try:
                    await t
                except (asyncio.CancelledError, Exception):
                    pass
