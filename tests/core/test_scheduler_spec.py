"""Scheduler with speculative decoding drafts: outputs identical to no drafts, budgets, rollback.

The fake runner (tests/fakes/fake_runner.py) verifies drafts greedily against its "model" and
checks, every step, that start_pos equals the context it knows to be valid (so a wrong rollback of
num_computed_tokens fails), that the KV read back holds the request's tokens, and that a prefix-cache
hit holds exactly the prompt (so a block filled from a rejected draft fails)."""

import random

import pytest

from jaxllm.config import SchedulerConfig
from jaxllm.core.kv_cache_manager import KVCacheManager
from jaxllm.core.ngram_proposer import NgramProposer
from jaxllm.core.request import Request, RequestStatus
from jaxllm.core.scheduler import Scheduler
from jaxllm.sampling_params import SamplingParams
from tests.core.test_scheduler import assert_no_leaks
from tests.fakes.fake_runner import FakeRunner, context_hash

BS = 4
VOCAB = 131


def periodic_model(ctx, s):
    """Mostly copies the token 5 back (repetitive text drafts well), sometimes a hash token."""
    h = context_hash(ctx)
    return ctx[-5] if len(ctx) >= 5 and h % 5 else h % VOCAB


def run(prompts, k, *, budget=32, num_blocks=256, max_seqs=8, max_len=128, caching=True,
        stop_ids=frozenset(), temperature=0.0, on_step=None):
    kv = KVCacheManager(num_blocks, BS, enable_caching=caching)
    sched = Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                                      max_model_len=max_len), kv)
    runner = FakeRunner(num_blocks, BS, vocab_size=VOCAB, next_token_fn=periodic_model)
    prop = NgramProposer(k, 1, 3) if k else None
    for i, (prompt, max_tokens) in enumerate(prompts):
        p = SamplingParams(max_tokens=max_tokens, temperature=temperature)
        sched.add_request(Request(f"r{i}", list(prompt), p, seed=i,
                                  max_output_tokens=min(max_tokens, max_len - len(prompt))))
    outs, stopped = {}, set()

    def on_token(r, tok):
        if tok in stop_ids:
            stopped.add(r.request_id)
            return True
        return False

    for _ in range(10_000):
        if not sched.has_unfinished_requests():
            break
        out = sched.schedule()
        assert out.num_batched_tokens <= budget == sched.config.max_num_batched_tokens
        assert out.num_batched_tokens == sum(len(s.token_ids) for s in out.seqs)
        for s, r in zip(out.seqs, out.requests):
            assert s.start_pos + len(s.token_ids) <= max_len
            assert s.num_draft_tokens == 0 or s.sample
            # the step can produce up to drafts + 1 tokens: never past max_tokens / max_model_len
            assert r.num_output_tokens + s.num_draft_tokens + 1 <= r.max_output_tokens
            assert r.num_tokens + s.num_draft_tokens + 1 <= max_len
        if on_step:
            on_step(out, sched)
        sampled = runner.execute(out)
        ids = {k_: [t.token_id for t in v] if isinstance(v, list) else v.token_id for k_, v in sampled.items()}
        new = sched.update_from_output(out, ids, on_token)
        done = set()
        for r, _ in new:
            if r.request_id in stopped or r.num_output_tokens >= r.max_output_tokens or r.num_tokens >= max_len:
                done.add(r.request_id)
        for rid in done:
            r = sched.requests[rid]
            outs[rid] = list(r.output_token_ids)
            sched.finish_requests(rid, RequestStatus.FINISHED_STOPPED)
        if prop is not None:
            prop.forget(done)
            for r in sched.running:  # the engine's part: fresh drafts for every running request
                r.spec_token_ids = prop.propose(r.request_id, r.all_token_ids)
    else:
        raise AssertionError("did not finish")
    assert_no_leaks(sched)
    return outs, runner


def workload(seed, n=10):
    rng = random.Random(seed)
    base = [rng.randrange(2, VOCAB) for _ in range(6)]
    prompts = []
    for _ in range(n):
        if rng.random() < 0.5:  # repetitive prompt
            prompts.append(((base * 5)[:rng.randrange(3, 30)], rng.randrange(1, 40)))
        else:
            prompts.append(([rng.randrange(2, VOCAB) for _ in range(rng.randrange(1, 30))], rng.randrange(1, 40)))
    return prompts


@pytest.mark.parametrize("caching", [True, False])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_outputs_identical_with_drafts(k, caching):
    for seed in range(4):
        prompts = workload(seed)
        want, _ = run(prompts, 0, caching=caching)
        got, runner = run(prompts, k, caching=caching)
        assert got == want
        assert runner.num_drafts_accepted > 0 and runner.num_drafts_scheduled > runner.num_drafts_accepted


def test_seeded_random_sampling_identical_with_drafts():
    """The fake's random token depends on (seed, position, context) only, as the real sampler's key:
    accepting drafts while they equal the token sampled at their position changes nothing."""
    prompts = workload(9)
    want, _ = run(prompts, 0, temperature=0.8)
    got, _ = run(prompts, 4, temperature=0.8)
    assert got == want


def test_tight_budget_blocks_and_max_len():
    """Drafts under a small budget, a small pool (preemption with drafts) and a short max_model_len."""
    for seed in range(4):
        prompts = workload(seed, n=8)
        kw = dict(budget=9, num_blocks=24, max_len=48)
        want, _ = run(prompts, 0, **kw)
        seen = []
        got, _ = run(prompts, 5, on_step=lambda o, s: seen.append(s.num_preemptions), **kw)
        assert got == want
    assert seen[-1] > 0  # preemption did happen with drafts in play


def test_stop_inside_accepted_drafts_ends_there():
    prompts = workload(3)
    want, _ = run(prompts, 0)
    stop = {t for o in want.values() for t in o[3:4]}  # a token that shows up mid-output
    want_stop, _ = run(prompts, 0, stop_ids=stop)
    got, runner = run(prompts, 5, stop_ids=stop)
    assert got == want_stop
    for rid, o in got.items():  # nothing past the first stop token
        first = next((i for i, t in enumerate(o) if t in stop), None)
        assert first is None or first == len(o) - 1, (rid, o)


def test_drafts_take_budget_and_slots():
    kv = KVCacheManager(64, BS)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8, max_model_len=64), kv)
    for rid in ("a", "b"):
        sched.add_request(Request(rid, [5, 6, 7], SamplingParams(max_tokens=20), seed=0, max_output_tokens=20))
    out = sched.schedule()  # prefill: 3 + 3 tokens, drafts ride on the prefill's last chunk only
    sched.update_from_output(out, {"a": 9, "b": 9})
    sched.requests["a"].spec_token_ids = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    sched.requests["b"].spec_token_ids = [1, 2]
    out = sched.schedule()
    (a,) = out.seqs  # drafts take budget like any token: a's 1 + 7 drafts fill it (as vLLM), b waits
    assert (a.token_ids, a.num_draft_tokens, a.sample) == ([9, 1, 2, 3, 4, 5, 6, 7], 7, True)
    assert out.num_batched_tokens == 8
    assert len(a.block_ids) * BS >= a.start_pos + 8
    assert sched.requests["a"].num_computed_tokens == 3 + 8 and not sched.requests["a"].spec_token_ids
    assert sched.requests["b"].spec_token_ids == [1, 2]  # not scheduled: its drafts are still valid
    sched.update_from_output(out, {"a": [1, 2, 8]})  # 2 drafts accepted, 5 rejected
    ra = sched.requests["a"]
    assert ra.output_token_ids == [9, 1, 2, 8] and ra.num_computed_tokens == 6 == ra.num_tokens - 1
    out = sched.schedule()
    assert [(s.token_ids, s.num_draft_tokens) for s in out.seqs] == [([8], 0), ([9, 1, 2], 2)]
    with pytest.raises(RuntimeError, match="must be 1..1"):
        sched.update_from_output(out, {"a": [3, 3], "b": 3})


def test_drafts_never_pass_max_tokens_or_max_len():
    kv = KVCacheManager(64, BS)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=12), kv)
    sched.add_request(Request("a", [5, 6, 7], SamplingParams(max_tokens=4), seed=0, max_output_tokens=4))
    sched.add_request(Request("b", [5, 6, 7, 8, 9, 10], SamplingParams(max_tokens=50), seed=0, max_output_tokens=6))
    sched.update_from_output(sched.schedule(), {"a": 9, "b": 9})
    for r in sched.running:
        r.spec_token_ids = list(range(20, 40))
    out = sched.schedule()
    # a: 1 output, at most 4: 2 drafts (+1 bonus = 4). b: 7 tokens, max_model_len 12: 4 drafts (+1 = 12)
    assert [s.num_draft_tokens for s in out.seqs] == [2, 4]
