"""``add_request(..., step_gate=True)`` / ``release_step``: a gated request computes one token per
release (its prefill's first), never runs ahead of its driver under sync or async scheduling, ends
with the tokens of the same request ungated, and frees its blocks when aborted while held; the
AsyncEngine carries releases through its command queue."""
import asyncio

import pytest

from jaxllm.engine.async_engine import AsyncEngine
from jaxllm.sampling_params import SamplingParams
from tests.engine.conftest import assert_clean, make_engine, run_all


def params(n=6, **kw):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


def reference(prompt, n):
    engine = make_engine(async_scheduling=False)
    engine.add_request("r", {"prompt_token_ids": prompt}, params(n))
    return run_all(engine)["r"].outputs[0].token_ids


def gen_tokens(engine, rid):
    return list(engine.scheduler.requests[rid].output_token_ids)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_one_token_per_release_and_the_same_tokens(async_scheduling):
    engine = make_engine(async_scheduling=async_scheduling)
    g_prompt, u_prompt = list(range(3, 12)), list(range(30, 35))
    engine.add_request("g", {"prompt_token_ids": g_prompt}, params(4), step_gate=True)
    engine.add_request("u", {"prompt_token_ids": u_prompt}, params(8))
    finals = {}
    for _ in range(40):  # u runs to its end; g stops at its first token
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    assert "u" in finals and len(gen_tokens(engine, "g")) == 1
    assert engine.step() == [] and engine.held_by_gates
    for k in (2, 3):
        assert engine.release_step("g")
        assert engine.release_step("g")  # idempotent until the token comes: still one more
        for _ in range(5):
            engine.step()
        assert len(gen_tokens(engine, "g")) == k and engine.held_by_gates
    assert engine.release_step("g")
    finals.update(run_all(engine))  # its 4th (last) token: g finishes, every block free
    assert finals["g"].outputs[0].token_ids == reference(g_prompt, 4)
    assert finals["u"].outputs[0].token_ids == reference(u_prompt, 8)
    assert not engine.release_step("g") and not engine.release_step("unknown")


def test_abort_while_held_frees_everything_and_refusals():
    engine = make_engine()
    engine.add_request("g", {"prompt_token_ids": list(range(3, 20))}, params(50), step_gate=True)
    for _ in range(3):
        engine.step()
    assert engine.held_by_gates and engine.kv.req_blocks["g"]
    engine.abort_request("g")
    assert_clean(engine)
    with pytest.raises(ValueError, match=r"^n=2 is invalid with step_gate=True"):
        engine.add_request("m", "hi", SamplingParams(n=2), step_gate=True)
    with pytest.raises(ValueError, match=r"^step_gate=1 is invalid: must be a bool"):
        engine.add_request("m", "hi", SamplingParams(), step_gate=1)
    assert_clean(engine)


def test_async_engine_releases_and_aborts_through_its_queue():
    async def main():
        engine = make_engine()
        ae = AsyncEngine(engine, idle_tick=0.01)
        await ae.start()
        try:
            g = await ae.add_request("g", {"prompt_token_ids": list(range(3, 12))}, params(30), step_gate=True)
            u = await ae.add_request("u", {"prompt_token_ids": list(range(30, 35))}, params(20))
            while not (await u.get_batch())[-1].finished:
                pass
            first = (await g.get_batch())[-1]
            assert len(first.outputs[0].token_ids) == 1  # 20 steps of u later: g still at its first token
            for k in (2, 3):
                ae.release_step("g")
                while len((out := (await g.get_batch())[-1]).outputs[0].token_ids) < k:
                    pass
                assert len(out.outputs[0].token_ids) == k
            ae.abort("g")
            ae.release_step("g")  # a driver racing its own abort: a no-op
            for _ in range(500):
                if not engine.has_unfinished_requests():
                    break
                await asyncio.sleep(0.01)
            assert ae.is_alive
            assert_clean(await ae.call(lambda e: e))
        finally:
            await ae.stop()

    asyncio.run(asyncio.wait_for(main(), 60))  # a lost release would hang the wait for its token
