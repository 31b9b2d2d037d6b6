"""AsyncEngine contract without gRPC: one engine thread, streams, abort, death, stop."""

from __future__ import annotations

import asyncio
import threading

import pytest

from jaxllm.engine.async_engine import AsyncEngine, DuplicateRequestError, EngineDeadError
from jaxllm.sampling_params import SamplingParams
from serving_helpers import run
from tests.fakes.fake_engine import FakeEngine


def test_streams_abort_and_single_thread():
    async def main():
        eng = FakeEngine(step_delay=0.002)
        ae = AsyncEngine(eng, idle_tick=0.01)
        await ae.start()
        outs = [o async for o in ae.generate("a", "abcdef", SamplingParams(max_tokens=5))]
        assert outs[-1].finished and outs[-1].outputs[0].text == "abcde"
        # a stream keeps only the newest (cumulative) output: a slow consumer may skip one
        lens = [len(o.outputs[0].token_ids) for o in outs]
        assert lens == sorted(set(lens)) and lens[-1] == 5
        with pytest.raises(ValueError, match="top_p"):
            await ae.add_request("b", "x", SamplingParams(top_p=5.0))
        stream = await ae.add_request("c", "xyz", SamplingParams(max_tokens=1000))
        with pytest.raises(DuplicateRequestError):
            await ae.add_request("c", "xyz", SamplingParams())
        await stream.get_batch()
        ae.abort("c")
        ae.abort("c")
        ae.abort("unknown")  # no-op
        agen = ae.generate("d", "qwerty", SamplingParams(max_tokens=1000))
        await agen.__anext__()
        await agen.aclose()  # consumer stops early -> aborted
        for _ in range(100):
            if not eng.has_unfinished_requests():
                break
            await asyncio.sleep(0.01)
        assert eng.aborted == ["c", "d"] and eng.free_blocks == eng.config.num_blocks
        assert ae.num_active == 0 and ae.stats.num_free_blocks == eng.config.num_blocks
        assert eng.thread_ids == {ae._thread.ident} and ae._thread.ident != threading.get_ident()
        assert ae.health_info()["alive"] and ae.num_steps > 0
        await ae.stop()
        assert not ae._thread.is_alive()
        with pytest.raises(RuntimeError):
            await ae.add_request("e", "x", SamplingParams())
    run(main())


def test_death_fails_streams_and_later_adds():
    async def main():
        eng = FakeEngine(step_delay=0.002)
        ae = AsyncEngine(eng, idle_tick=0.01)
        died = []
        ae.add_death_callback(died.append)
        await ae.start()
        stream = await ae.add_request("x", "hello", SamplingParams(max_tokens=500))
        await stream.get_batch()
        eng.inject_raise()
        with pytest.raises(EngineDeadError) as ei:
            while True:
                await stream.get_batch()
        assert "injected fault" in str(ei.value.cause)
        assert died and ae.dead is not None and not ae.is_alive
        with pytest.raises(EngineDeadError):
            await ae.add_request("y", "hello", SamplingParams())
    run(main())


def test_factory_failure_is_reported():
    def boom():
        raise OSError("weights not found")

    async def main():
        ae = AsyncEngine(engine_factory=boom)
        with pytest.raises((OSError, EngineDeadError)):
            await ae.start()
        assert isinstance(ae.dead, OSError) and not ae.ready
    run(main())
