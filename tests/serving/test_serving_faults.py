"""Faults in one request's host-side processing (detokenizer, stop checks) behind the real server:
that request ends INTERNAL naming the cause, its blocks are freed, the others are untouched and
health stays SERVING. (A device step that raises: test_serving_health.test_step_raises_...)"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from jaxllm.sampling_params import SamplingParams
from serving_helpers import SERVING, collect, offline, run, running_server
from test_serving_llm_engine import make_engine, offline as llm_offline
from tests.fakes.fake_engine import FakeEngine
from tests.fakes.faults import PoisonDetokenizer, explode_on_boom_stop


async def _expect_internal(c, part: str, **kw):
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await c.generate(**kw)
    assert ei.value.code() == grpc.StatusCode.INTERNAL, ei.value
    assert ei.value.details().startswith("request failed: ") and part in ei.value.details()


def test_fake_engine_request_fault_fails_only_that_request():
    async def main():
        eng = FakeEngine(step_delay=0.002)
        eng.poison = "POISON"
        async with running_server(eng) as c:
            good = [c.generate(prompt=f"good {i}", max_tokens=30) for i in range(6)]
            bad = _expect_internal(c, "UnicodeDecodeError", prompt="a POISON pill", max_tokens=30)
            res = await asyncio.gather(*good, bad)
            for i, r in enumerate(res[:6]):
                assert collect(r)["texts"][0] == offline(f"good {i}", max_tokens=30)[0].text
            await c.wait_blocks_free()
            assert not c.server.door.active and c.server.async_engine.num_active == 0
            assert await c.health_status() == SERVING
    run(main())


def test_llm_engine_detokenizer_and_stop_checker_faults(monkeypatch):
    explode_on_boom_stop(monkeypatch)
    prompts = [f"request {i}: about {'xyz' * i}" for i in range(6)]
    want = llm_offline(prompts, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))

    async def main():
        eng = make_engine()
        eng.detokenizer_factory = PoisonDetokenizer
        async with running_server(eng) as c:
            good = [c.generate(prompt=p, temperature=0.0, max_tokens=10, ignore_eos=True)
                    for p in prompts]
            res = await asyncio.gather(
                *good,
                _expect_internal(c, "UnicodeDecodeError: 'utf-8' codec can't decode",
                                 prompt="POISON pill", max_tokens=10, n=2),
                _expect_internal(c, "RuntimeError: stop checker exploded", prompt="boom",
                                 max_tokens=10, stop=["BOOM"]))
            for i, r in enumerate(res[:6]):
                assert collect(r)["tokens"][0] == want[str(i)].outputs[0].token_ids
            await c.wait_blocks_free()
            assert not eng.has_unfinished_requests() and not eng.scheduler.requests
            assert await c.health_status() == SERVING
            r = collect(await c.generate(prompt=prompts[0], temperature=0.0, max_tokens=10,
                                         ignore_eos=True))
            assert r["tokens"][0] == want["0"].outputs[0].token_ids
    run(main())
