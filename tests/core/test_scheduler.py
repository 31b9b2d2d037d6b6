import random

import pytest

from jaxllm.config import SchedulerConfig
from jaxllm.core.kv_cache_manager import KVCacheManager
from jaxllm.core.request import Request, RequestStatus
from jaxllm.core.scheduler import Scheduler
from jaxllm.sampling_params import SamplingParams
from tests.fakes.fake_runner import FakeRunner

BS = 4


def make(num_blocks=64, budget=32, max_seqs=8, max_len=256, caching=True):
    kv = KVCacheManager(num_blocks, BS, enable_caching=caching)
    sched = Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                                      max_model_len=max_len), kv)
    return sched, FakeRunner(num_blocks, BS)


def req(rid, prompt, max_tokens=4, seed=0, **kw):
    p = SamplingParams(max_tokens=max_tokens, temperature=kw.pop("temperature", 0.0), **kw)
    return Request(rid, list(prompt), p, seed=seed, max_output_tokens=max_tokens)


def drive(sched, runner, on_step=None):
    """Minimal engine loop: stop at max_output_tokens (or max_model_len), no EOS."""
    cfg = sched.config
    finished = {}
    for _ in range(10_000):
        if not sched.has_unfinished_requests():
            break
        out = sched.schedule()
        assert out.num_batched_tokens <= cfg.max_num_batched_tokens
        assert len(out.seqs) <= cfg.max_num_seqs and len(sched.running) <= cfg.max_num_seqs
        if on_step:
            on_step(out)
        sampled = runner.execute(out)
        assert set(sampled) == {s.request_id for s in out.seqs if s.sample}
        new = sched.update_from_output(out, {k: v.token_id for k, v in sampled.items()})
        for r, _ in new:
            assert r.num_tokens <= cfg.max_model_len
            if r.num_output_tokens >= r.max_output_tokens or r.num_tokens >= cfg.max_model_len:
                finished[r.request_id] = r
                sched.finish_requests(r.request_id, RequestStatus.FINISHED_LENGTH)
    else:
        raise AssertionError("did not finish")
    assert_no_leaks(sched)
    return finished


def assert_no_leaks(sched):
    assert not sched.requests and not sched.running and not sched.waiting
    assert sched.kv.num_free_blocks == sched.kv.num_blocks
    assert not sched.kv.req_blocks and not sched.kv.req_hashes
    sched.kv.pool.check_invariants()


def test_chunked_prefill_respects_budget():
    sched, runner = make(budget=16)
    sched.add_request(req("a", range(3, 53), max_tokens=3))
    plan = []
    drive(sched, runner, lambda o: plan.append([(s.start_pos, len(s.token_ids), s.sample) for s in o.seqs]))
    assert plan == [[(0, 16, False)], [(16, 16, False)], [(32, 16, False)], [(48, 2, True)],
                    [(50, 1, True)], [(51, 1, True)]]


def test_running_first_then_fcfs_with_chunking():
    sched, runner = make(budget=10)
    for i in range(3):
        sched.add_request(req(f"r{i}", range(10 * i + 3, 10 * i + 11), max_tokens=2))
    plan = []
    drive(sched, runner, lambda o: plan.append([(s.request_id, len(s.token_ids)) for s in o.seqs]))
    assert plan[0] == [("r0", 8), ("r1", 2)]
    assert plan[1] == [("r0", 1), ("r1", 6), ("r2", 3)]
    assert plan[2] == [("r1", 1), ("r2", 5)]


def test_max_num_seqs():
    sched, runner = make(max_seqs=2, budget=100)
    for i in range(5):
        sched.add_request(req(f"r{i}", [5 + i] * 6, max_tokens=3))
    seen = []
    drive(sched, runner, lambda o: seen.append(len(o.seqs)))
    assert max(seen) == 2


def test_preemption_latest_first_and_resume():
    # 8 blocks of 4 tokens; 3 requests of 8 prompt tokens growing by 12 tokens each -> must preempt
    sched, runner = make(num_blocks=8, budget=64)
    for i in range(3):
        sched.add_request(req(f"r{i}", range(20 * i + 3, 20 * i + 11), max_tokens=12))
    events = []

    def on_step(o):
        events.extend(o.finished_or_preempted_ids)
    finished = drive(sched, runner, on_step)
    assert sched.num_preemptions > 0
    assert events[0] == "r2"  # the latest arrival goes first
    alone = {}
    for i in range(3):
        s2, r2 = make(num_blocks=64)
        s2.add_request(req(f"r{i}", range(20 * i + 3, 20 * i + 11), max_tokens=12))
        alone.update(drive(s2, r2))
    for rid, r in finished.items():
        assert r.output_token_ids == alone[rid].output_token_ids, rid
        assert len(r.output_token_ids) == 12


@pytest.mark.parametrize("caching", [True, False])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_mixed_batch_identical_to_alone(caching, temperature):
    rng = random.Random(1)
    shared = [rng.randrange(3, 131) for _ in range(40)]
    reqs = []
    for i in range(24):
        n = rng.choice([1, 3, 5, 9, 17, 40, 70, 120])
        prompt = [rng.randrange(3, 131) for _ in range(n)]
        if i % 3 == 0:
            prompt = shared[: rng.randint(4, 40)] + prompt
        reqs.append((f"q{i}", prompt, rng.randint(1, 20), 1000 + i))

    def build(rid, prompt, mt, seed):
        return req(rid, prompt, max_tokens=mt, seed=seed, temperature=temperature)

    sched, runner = make(num_blocks=48, budget=24, max_seqs=6, caching=caching, max_len=180)
    for r in reqs:
        sched.add_request(build(*r))
    together = drive(sched, runner)
    assert sched.num_preemptions > 0
    assert any(len(s.seqs) > 1 for s in runner.steps)
    for r in reqs:
        s2, r2 = make(num_blocks=64, budget=512, caching=False, max_len=180)
        s2.add_request(build(*r))
        alone = drive(s2, r2)[r[0]]
        assert together[r[0]].output_token_ids == alone.output_token_ids, r[0]


def test_prefix_cache_hits_set_num_cached_tokens():
    sched, runner = make(num_blocks=64, budget=64)
    prefix = list(range(3, 3 + 4 * BS))  # 4 full blocks
    sched.add_request(req("a", prefix + [100, 101], max_tokens=2))
    drive(sched, runner)
    sched.add_request(req("b", prefix + [102], max_tokens=2))
    sched.add_request(req("c", prefix, max_tokens=2))  # whole prompt cached: 1 token recomputed
    firsts = []
    drive(sched, runner, lambda o: firsts.extend((s.request_id, s.start_pos) for s in o.seqs))
    assert ("b", 16) in firsts and ("c", 12) in firsts
    assert sched.kv.prefix_hit_rate > 0


def test_same_step_identical_prompts_share_blocks():
    sched, runner = make(num_blocks=64, budget=64)
    prompt = list(range(3, 3 + 3 * BS + 2))
    for i in range(3):
        sched.add_request(req(f"s{i}", prompt, max_tokens=3))
    first = []
    drive(sched, runner, lambda o: first.append(o) if not first else None)
    tables = {s.request_id: s.block_ids.tolist() for s in first[0].seqs}  # as scheduled (a snapshot)
    assert tables["s0"][:3] == tables["s1"][:3] == tables["s2"][:3]
    assert [s.start_pos for s in first[0].seqs] == [0, 12, 12]


def test_finish_waiting_and_unknown_is_noop():
    sched, runner = make(num_blocks=64, budget=4)
    sched.add_request(req("a", range(3, 20)))
    sched.add_request(req("b", range(3, 20)))
    out = sched.schedule()
    runner.execute(out)
    sched.update_from_output(out, {})
    assert [r.request_id for r in sched.finish_requests(["b", "zzz"], RequestStatus.FINISHED_ABORTED)] == ["b"]
    sched.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    assert sched.finish_requests("a", RequestStatus.FINISHED_ABORTED) == []
    assert set(sched.schedule().finished_or_preempted_ids) == {"a", "b"}
    assert_no_leaks(sched)


def test_add_request_rejects_too_long_and_duplicates():
    sched, _ = make(max_len=16)
    with pytest.raises(ValueError, match="max_model_len=16"):
        sched.add_request(req("a", range(16)))
    sched.add_request(req("a", range(15)))
    with pytest.raises(ValueError, match="request_id='a'"):
        sched.add_request(req("a", range(3)))
    sched.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    assert_no_leaks(sched)


def test_never_exceeds_max_model_len():
    sched, runner = make(max_len=20, budget=8)
    sched.add_request(req("a", range(3, 15), max_tokens=100))
    fin = drive(sched, runner)
    assert fin["a"].num_tokens == 20


def test_long_prefill_token_threshold_caps_each_requests_chunk():
    """vLLM's --long-prefill-token-threshold: one request's prefill chunk is at most the threshold per
    step (the rest of the budget goes to others); the tokens generated are those of the uncapped run."""
    def run(threshold):
        kv = KVCacheManager(64, BS, enable_caching=True)
        sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=32, max_model_len=256,
                                          long_prefill_token_threshold=threshold), kv)
        sched.add_request(req("long", range(10, 40), max_tokens=3))  # 30 prompt tokens
        sched.add_request(req("short", range(50, 56), max_tokens=3))  # 6
        chunks = []
        done = drive(sched, FakeRunner(64, BS), on_step=lambda out: chunks.append(
            {s.request_id: len(s.token_ids) for s in out.seqs}))
        return chunks, {k: r.output_token_ids for k, r in done.items()}

    capped, outs = run(8)
    assert capped[:4] == [{"long": 8, "short": 6}, {"long": 8, "short": 1}, {"long": 8, "short": 1},
                          {"long": 6}]  # 8 + 8 + 8 + 6 = 30 (the last chunk samples); short's 3 tokens done
    assert all(n <= 8 for step in capped for n in step.values())
    uncapped, ref = run(0)
    assert uncapped[0] == {"long": 30, "short": 2}  # without it the long prompt takes the budget first
    assert outs == ref
    with pytest.raises(ValueError, match=r"long_prefill_token_threshold=-1 is invalid: must be an integer >= 0"):
        SchedulerConfig(long_prefill_token_threshold=-1).validate()
