"""The adapter loader at shutdown (no jax): ``AdapterLoader.close`` cancels queued loads and returns
without waiting for one in flight; its workers are daemon threads, so a load in flight never holds
up interpreter exit; ``LLMEngine.close`` closes it, and AsyncEngine's loop calls that when it stops."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading

from jaxllm.engine.async_engine import AsyncEngine
from jaxllm.lora.loader import AdapterLoader
from jaxllm.sampling_params import SamplingParams
from tests.engine_checks import returns_within, threads_named
from tests.lora.host_fakes import FakeAdapter, GatedLoader, lora, make_lora_engine

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_close_cancels_queued_loads_without_waiting_for_the_one_in_flight():
    gated = GatedLoader(held={1})
    loader = AdapterLoader(gated)
    running = loader.submit(lora(1))
    assert gated.started[1].wait(10)
    queued = loader.submit(lora(2))
    assert threads_named("jaxllm-lora-load") and all(t.daemon for t in threads_named("jaxllm-lora-load"))
    assert returns_within(loader.close)  # load 1 is still held
    assert queued.cancelled() and not running.done()
    gated.let_go(1)  # the in-flight load ends on its own thread; nobody takes it
    assert running.result(10) == FakeAdapter("adapter1")
    assert gated.loads == {1: 1}  # load 2 never ran
    again = loader.submit(lora(3))  # a later submit starts a worker again
    assert again.result(10) == FakeAdapter("adapter3")
    loader.close()


def test_engine_close_closes_the_loader_with_a_load_in_flight():
    gated = GatedLoader(held={1, 2})
    e = make_lora_engine(max_loras=2, max_cpu_loras=2, loader=gated, async_scheduling=False)
    e.add_request("r1", "one", SamplingParams(max_tokens=2), lora_request=lora(1))
    assert gated.started[1].wait(10)
    e.add_request("r2", "two", SamplingParams(max_tokens=2), lora_request=lora(2))  # queued behind 1
    queued = e.lora.loading[2].future
    assert returns_within(e.close)
    assert queued.cancelled() and not e.lora.loader.pool.started
    gated.let_go(1)


def test_async_engine_stop_closes_the_engine():
    gated = GatedLoader(held={1})
    e = make_lora_engine(loader=gated, async_scheduling=False)
    closed = threading.Event()
    close = e.close
    e.close = lambda: (close(), closed.set())

    async def main():
        ae = AsyncEngine(e, idle_tick=0.01)
        await ae.start()
        await ae.call(lambda eng: eng.add_request("r1", "one", SamplingParams(max_tokens=2),
                                                  lora_request=lora(1)))
        assert gated.started[1].wait(10)
        await ae.stop(timeout=10)

    asyncio.run(main())
    assert closed.is_set() and not e.lora.loader.pool.started
    gated.let_go(1)


def test_a_load_in_flight_does_not_hold_up_interpreter_exit():
    """A process whose engine has a load that never finishes, exiting without any close: it exits
    (a ThreadPoolExecutor's worker is joined at exit: this process hung until the load ended)."""
    script = textwrap.dedent("""
        import threading
        from jaxllm.sampling_params import SamplingParams
        from tests.lora.host_fakes import lora, make_lora_engine

        started, never = threading.Event(), threading.Event()
        def load(req):
            started.set()
            never.wait()
        e = make_lora_engine(loader=load, async_scheduling=False)
        e.add_request("r1", "one", SamplingParams(max_tokens=2), lora_request=lora(1))
        assert started.wait(30)
        print("loading")
    """)
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "loading"
