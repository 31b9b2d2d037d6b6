"""Async scheduling on the fake runner: the synchronous engine is the reference. Same tokens,
text, finish reasons and logprobs on a mixed workload with preemption, chunked prefill, n > 1,
stops and aborts; nothing shown past a stop; nothing left behind."""
import random

import pytest

from jaxllm.sampling_params import SamplingParams
from tests.engine.conftest import assert_clean, make_engine, script_fn


def mixed_requests(vocab_size: int, num: int = 24, seed: int = 11):
    """(request_id, prompt, params, abort_after) with abort_after = abort once this many tokens show."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz "
    shared = "".join(rng.choice(letters) for _ in range(37))
    reqs = []
    for i in range(num):
        prompt = "".join(rng.choice(letters) for _ in range(rng.choice([1, 2, 5, 13, 30, 60, 90])))
        if i % 4 == 0:
            prompt = shared + prompt
        max_tokens = rng.randint(1, 24)
        p = SamplingParams(max_tokens=max_tokens, ignore_eos=i % 5 != 0,
                           temperature=0.0 if i % 2 else 0.8, seed=i if i % 3 else None,
                           n=2 if i % 7 == 3 else 1, stop=list("aeiouyz") if i % 6 == 1 else None,
                           stop_token_ids=rng.sample(range(3, vocab_size), 20) if i % 8 == 2 else None,
                           min_tokens=min(3, max_tokens) if i % 5 == 4 else 0,
                           logprobs=2 if i % 4 == 1 else None)
        abort_after = rng.randint(1, 6) if i % 9 == 5 and p.n == 1 else None
        reqs.append((f"r{i}", prompt, p, abort_after))
    return reqs


def run_workload(engine, reqs):
    """Every request's final RequestOutput; a request with abort_after is aborted as soon as its
    output shows that many tokens (the same point in both modes: its in-flight token is dropped)."""
    for rid, prompt, p, _ in reqs:
        engine.add_request(rid, prompt, p)
    abort_after = {rid: k for rid, _, _, k in reqs if k is not None}
    finals, shown = {}, {}
    for _ in range(10_000):
        if not engine.has_unfinished_requests():
            break
        to_abort = []
        for out in engine.step():
            rid = out.request_id
            assert rid not in finals, f"{rid}: output after its final one"
            for c in out.outputs:  # outputs only grow, and never past a stop
                prev = shown.get((rid, c.index), [])
                assert c.token_ids[:len(prev)] == prev, rid
                shown[(rid, c.index)] = list(c.token_ids)
            if out.finished:
                finals[rid] = out
            elif rid in abort_after and len(out.outputs[0].token_ids) >= abort_after[rid]:
                to_abort.append(rid)
        for o in engine.abort_request(to_abort):
            finals[o.request_id] = o
    assert_clean(engine)
    return finals


def summary(out):
    return [(c.token_ids, c.text, c.finish_reason, c.stop_reason, c.logprobs, c.cumulative_logprob)
            for c in out.outputs]


def test_async_matches_sync_on_24_mixed_requests_with_preemption_chunking_and_aborts():
    kw = dict(num_blocks=40, block_size=4, max_model_len=150, max_num_batched_tokens=20, max_num_seqs=6, seed=0)
    sync = make_engine(async_scheduling=False, **kw)
    reqs = mixed_requests(sync.vocab_size)
    want = run_workload(sync, reqs)
    eng = make_engine(async_scheduling=True, **kw)
    assert eng.async_scheduling and not sync.async_scheduling
    got = run_workload(eng, reqs)
    assert set(got) == set(want) == {r[0] for r in reqs}
    for rid in want:
        assert summary(got[rid]) == summary(want[rid]), rid
    reasons = {c.finish_reason for o in want.values() for c in o.outputs}
    assert reasons == {"stop", "length", "abort"}
    assert eng.runner.num_placeholders_fed > 0 and sync.runner.num_placeholders_fed == 0
    assert eng.get_stats()["num_preemptions"] > 0 and sync.get_stats()["num_preemptions"] > 0


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_stop_string_shows_nothing_past_the_stop_and_wastes_at_most_one_slot(async_scheduling):
    e = make_engine(next_token_fn=script_fn("abcXdefgh"), async_scheduling=async_scheduling)
    e.add_request("a", "hi", SamplingParams(max_tokens=50, stop=["X"], ignore_eos=True))
    outs = []
    while e.has_unfinished_requests():
        outs += e.step()
    final = outs[-1]
    assert final.finished and final.outputs[0].text == "abc" and len(final.outputs[0].token_ids) == 4
    assert all(len(o.outputs[0].token_ids) <= 4 for o in outs)
    sampled = sum(1 for st in e.runner.steps for s in st.seqs if s.request_id == "a" and s.sample)
    assert sampled == 4 + async_scheduling  # the one decode dispatched before the stop was seen
    assert_clean(e)


def test_abort_while_a_step_is_in_flight_drains_and_frees():
    e = make_engine(async_scheduling=True)
    e.add_request("a", "hello world", SamplingParams(max_tokens=30, ignore_eos=True))
    e.add_request("b", "other", SamplingParams(max_tokens=30, ignore_eos=True))
    for _ in range(3):
        e.step()
    assert e._in_flight is not None
    (out,) = e.abort_request("a")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    n = len(out.outputs[0].token_ids)
    for o in e.step():
        assert o.request_id == "b"
    e.abort_request("b")
    assert e._in_flight is None  # idle: the last step was read back and dropped
    assert_clean(e)
    assert n >= 1


def test_sync_switch_runs_one_step_at_a_time():
    e = make_engine(async_scheduling=False)
    e.add_request("a", "hello", SamplingParams(max_tokens=5, ignore_eos=True))
    while e.has_unfinished_requests():
        e.step()
        assert e._in_flight is None
    assert not any(s.placeholder for st in e.runner.steps for s in st.seqs)
    assert_clean(e)


def test_switch_in_config_and_both_clis():
    import argparse

    from jaxllm.config import EngineConfig
    from jaxllm.cli_args import add_engine_args, engine_config_from_args
    from serving.__main__ import build_parser

    assert EngineConfig().async_scheduling is None  # auto: the runner's async_by_default
    assert make_engine().async_scheduling  # the fake runner states no preference: on
    assert not make_engine(async_scheduling=False).async_scheduling
    with pytest.raises(ValueError, match="async_scheduling='no' is invalid: must be a bool"):
        EngineConfig(model="m", async_scheduling="no").validate()
    ap = argparse.ArgumentParser()
    add_engine_args(ap)
    assert engine_config_from_args(ap.parse_args([])).async_scheduling is None
    assert engine_config_from_args(ap.parse_args(["--no-async-scheduling"])).async_scheduling is False
    p = build_parser()  # the server shares the engine flags
    assert engine_config_from_args(p.parse_args(["--model", "m"])).async_scheduling is None
    assert engine_config_from_args(p.parse_args(["--model", "m", "--async-scheduling"])).async_scheduling is True
    assert engine_config_from_args(p.parse_args(["--model", "m", "--no-async-scheduling"])).async_scheduling is False
