"""Sleep mode on a real (tiny, random) engine: vLLM's sleep(level) / wake_up(tags) / is_sleeping().

The references are independent of the code under test: the device bytes are counted from
``jax.live_arrays()`` (what XLA still holds) against the weights' and cache's own nbytes taken before
sleeping; outputs after a wake-up are compared with the same prompts' outputs before the sleep
(greedy and seeded); compiles are counted three ways (the runner's executables, its traces, and JAX's
own backend-compile events); a level-2 wake-up's checkpoint reads are counted by a stand-in source
that raises when read."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from jax._src import monitoring

from jaxllm import LLM, SamplingParams
from jaxllm.config import EngineConfig
from jaxllm.engine.factory import build_engine
from jaxllm.engine.sleep_requests import EngineSleepingError, WeightsDiscardedError
from tests.engine_checks import assert_clean

# 2 decode + 1 mixed bucket; a 32-block cache (4 tokens of 2 layers x 4 kv heads x 8 dims, f32)
TINY = dict(model="dummy:tiny-llama", max_model_len=64, block_size=4, max_num_seqs=2, max_num_batched_tokens=16,
            kv_cache_memory_bytes=32 * 2 * 2 * 4 * 4 * 8 * 4, enable_sleep_mode=True)
PROMPTS = [{"prompt_token_ids": [5, 17, 3, 99, 42, 7]}, {"prompt_token_ids": [250, 1, 1, 8]}]
GREEDY = SamplingParams(max_tokens=6, temperature=0.0)
SEEDED = SamplingParams(max_tokens=6, temperature=1.0, seed=1234)


@pytest.fixture(scope="module")
def llm():
    return LLM(engine=build_engine(EngineConfig(**TINY)))


class Compiles:
    """Every compile while active: the runner's executables and traces, and JAX's backend compiles."""

    def __init__(self, runner):
        self.runner, self.backend = runner, 0

    def _event(self, event, *_a, **_k):
        if "backend_compile" in event:
            self.backend += 1

    def __enter__(self):
        self.before = (self.runner.compile_count, self.runner.num_traces)
        monitoring.register_event_duration_secs_listener(self._event)
        return self

    def __exit__(self, *exc):
        monitoring.unregister_event_duration_listener(self._event)
        self.after = (self.runner.compile_count, self.runner.num_traces)

    def none(self) -> bool:
        return self.after == self.before and self.backend == 0


def _run(llm) -> list[list[int]]:
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False) + llm.generate(PROMPTS, SEEDED, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _live_bytes() -> int:
    return sum(a.nbytes for a in jax.live_arrays())


def test_sleep_frees_weights_and_cache_and_wake_up_restores_them(llm):
    runner = llm.engine.runner
    before = _run(llm)
    weights = sum(x.nbytes for x in jax.tree.leaves(runner.state))
    cache = runner.kv_cache.k.nbytes + runner.kv_cache.v.nbytes
    live = _live_bytes()
    assert not llm.is_sleeping()
    llm.sleep(level=1)
    assert llm.is_sleeping()
    asleep = _live_bytes()
    assert live - asleep >= weights + cache  # what XLA still holds lost at least both
    llm.wake_up()
    assert not llm.is_sleeping()
    assert _live_bytes() - asleep >= weights + cache  # back (the last step's hidden states come with the next)
    with Compiles(runner) as c:
        after = _run(llm)
    assert after == before and c.none(), (c.before, c.after, c.backend)
    assert_clean(llm.engine)


def test_sleep_resets_the_prefix_cache(llm):
    kv = llm.engine.kv
    llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
    hits = kv.prefix_hits
    llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
    assert kv.prefix_hits > hits  # awake, the repeat hits its cached blocks
    hits = kv.prefix_hits
    llm.sleep(1)
    llm.wake_up()
    llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
    assert kv.prefix_hits == hits  # the repeat found nothing cached: the cache was reset


class Source:
    """A stand-in for the runner's checkpoint source that counts its reads (``raising``: refuses them)."""

    def __init__(self, runner, raising: bool = False):
        self.runner, self.raising, self.reads = runner, raising, 0

    def __call__(self, **kw):
        self.reads += 1
        if self.raising:
            raise AssertionError("the checkpoint was read")
        return self.original(**kw)

    def __enter__(self):
        self.original, self.runner.reload_weights = self.runner.reload_weights, self
        return self

    def __exit__(self, *exc):
        self.runner.reload_weights = self.original


def _all_zero(state) -> bool:
    return all(not np.asarray(jax.device_get(x)).any() for x in jax.tree.leaves(state))


def test_level_2_wake_up_reads_no_checkpoint_and_refuses_requests_until_a_load(llm):
    runner = llm.engine.runner
    before = _run(llm)
    specs = [(x.shape, x.dtype, x.sharding) for x in jax.tree.leaves(runner.state)]
    with Source(runner, raising=True) as src:
        llm.sleep(level=2)
        llm.wake_up(tags=["weights"])  # vLLM's RLHF order: weights first, then the KV cache
        assert llm.is_sleeping() and llm.engine.sleeping_tags == {"kv_cache"}
        with pytest.raises(EngineSleepingError, match="sleeping"):
            llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        llm.wake_up(tags=["kv_cache"])
        assert src.reads == 0 and not llm.is_sleeping()
    assert [(x.shape, x.dtype, x.sharding) for x in jax.tree.leaves(runner.state)] == specs
    assert _all_zero(runner.state)  # mapped back, contents undefined (here zeros): nothing was read
    with pytest.raises(WeightsDiscardedError, match=r"discarded by sleep\(level=2\): load them with load_weights"):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    with pytest.raises(WeightsDiscardedError):  # an embed/generate request alike: refused at add_request
        llm.engine.add_request("r1", {"prompt_token_ids": [1, 2, 3]}, GREEDY)
    assert llm.engine.step() == []
    assert_clean(llm.engine)
    with Source(runner) as src:
        llm.reload_weights()  # no path: the checkpoint the engine was built from
        assert src.reads == 1
    assert not llm.engine.weights_discarded
    with Compiles(runner) as c:
        assert _run(llm) == before  # dummy weights of the same seed, loaded once
    assert c.none()


def test_a_second_level_2_wake_up_compiles_nothing_and_level_1_keeps_the_mark(llm):
    runner = llm.engine.runner
    before = _run(llm)
    llm.sleep(2)
    llm.wake_up()  # the allocation is compiled here at the latest (the test above may have done it)
    with Source(runner, raising=True):
        llm.sleep(2)
        with Compiles(runner) as c:
            llm.wake_up()  # tags=None: both, no checkpoint read
        assert c.none(), (c.before, c.after, c.backend)
        llm.sleep(1)  # a level-1 sleep of discarded weights keeps them discarded
        llm.wake_up()
    assert llm.engine.weights_discarded and _all_zero(runner.state)
    llm.reload_weights()
    assert _run(llm) == before


def test_requests_while_asleep_are_refused_and_leak_nothing(llm):
    llm.sleep(1)
    try:
        with pytest.raises(EngineSleepingError, match=r"engine is sleeping .*wake_up\(\)"):
            llm.engine.add_request("r1", {"prompt_token_ids": [1, 2, 3]}, GREEDY)
        assert llm.engine.step() == []  # nothing to run, nothing touched the freed device memory
        assert_clean(llm.engine)
        assert llm.engine.sleep(1) == []  # asleep already: a no-op (vLLM's)
    finally:
        llm.wake_up()
    assert_clean(llm.engine)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_sleep_aborts_running_requests(llm, async_scheduling):
    """vLLM's default mode "abort": running and waiting requests end with finish_reason "abort", a step
    in flight (async scheduling) is read back first, no block or penalty row is left behind."""
    eng = llm.engine
    was, eng.async_scheduling = eng.async_scheduling, async_scheduling
    try:
        for i in range(3):  # 2 run (max_num_seqs), 1 waits
            eng.add_request(f"a{i}", PROMPTS[i % 2], SamplingParams(max_tokens=30, temperature=0.0))
        eng.step()
        eng.step()
        assert eng.has_unfinished_requests()
        outs = eng.sleep(1)
        assert sorted(o.request_id for o in outs) == ["a0", "a1", "a2"]
        assert all(o.finished and o.outputs[0].finish_reason == "abort" for o in outs)
        assert eng._in_flight is None
        assert_clean(eng)
        eng.wake_up()
        assert _run(llm)[0] == list(llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)[0].outputs[0].token_ids)
    finally:
        eng.async_scheduling = was
    assert_clean(eng)
