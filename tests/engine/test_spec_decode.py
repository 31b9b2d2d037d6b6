"""Speculative decoding (n-gram drafts) in the engine, on the fake runner: the same engine without
speculation is the reference. Same tokens, text, finish reasons and logprobs on the mixed 24-request
workload (preemption, chunked prefill, n > 1, stops, min_tokens, seeded random sampling, aborts);
drafts were really proposed and accepted; nothing left behind. Config errors are one line."""
import pytest

from jaxllm.config import EngineConfig
from jaxllm.sampling_params import SamplingParams
from tests.engine.conftest import make_engine
from tests.engine.test_async_scheduling import mixed_requests, run_workload, summary
from tests.fakes.fake_runner import context_hash

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 1}


def repetitive(ctx, seq):
    """Copies the token 7 back most of the time (prompt lookup drafts well), else a hash token."""
    h = context_hash(ctx)
    return ctx[-7] if len(ctx) >= 7 and h % 6 else 3 + h % 40


@pytest.mark.parametrize("fn", [None, repetitive], ids=["hash_model", "repetitive_model"])
def test_spec_matches_plain_on_24_mixed_requests(fn):
    kw = dict(num_blocks=40, block_size=4, max_model_len=150, max_num_batched_tokens=20, max_num_seqs=6,
              seed=0, async_scheduling=False, next_token_fn=fn)
    plain = make_engine(**kw)
    reqs = mixed_requests(plain.vocab_size)
    want = run_workload(plain, reqs)
    eng = make_engine(speculative_config=SPEC, **kw)
    got = run_workload(eng, reqs)
    assert set(got) == set(want) == {r[0] for r in reqs}
    for rid in want:
        assert summary(got[rid]) == summary(want[rid]), rid
    assert eng.runner.num_drafts_scheduled > 0 and eng.num_draft_tokens == eng.runner.num_drafts_scheduled
    if fn is repetitive:
        assert eng.num_accepted_tokens > 0 and eng.mean_accepted_tokens > 1.5
        assert eng.num_steps < plain.num_steps
    assert eng.get_stats()["num_preemptions"] > 0


def test_spec_forces_sync_and_repetitive_prompt():
    eng = make_engine(speculative_config=SPEC, async_scheduling=True, next_token_fn=repetitive)
    assert not eng.async_scheduling
    plain = make_engine(next_token_fn=repetitive, async_scheduling=False)
    p = SamplingParams(max_tokens=60, ignore_eos=True, logprobs=1)
    prompt = "the quick brown fox " * 3
    want = run_workload(plain, [("a", prompt, p, None)])
    got = run_workload(eng, [("a", prompt, p, None)])
    assert summary(got["a"]) == summary(want["a"])
    assert eng.num_steps < plain.num_steps


def test_no_drafts_with_penalties_or_grammar():
    eng = make_engine(speculative_config=SPEC, next_token_fn=repetitive)
    p = SamplingParams(max_tokens=30, ignore_eos=True, repetition_penalty=1.2)
    run_workload(eng, [("a", "abcabcabcabc", p, None)])
    assert eng.runner.num_drafts_scheduled == 0


@pytest.mark.parametrize("bad, msg", [
    ({"method": "eagle", "num_speculative_tokens": 2}, "speculative_config.method='eagle' is invalid"),
    ({"method": "ngram"}, "speculative_config.num_speculative_tokens is missing"),
    ({"method": "ngram", "num_speculative_tokens": 0}, r"num_speculative_tokens=0 is invalid: must be an integer in \[1, 16\]"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 3, "prompt_lookup_max": 2},
     "prompt_lookup_min=3 is invalid: must be <= prompt_lookup_max=2"),
    ({"method": "ngram", "num_speculative_tokens": 2, "draft_model": "x"}, "speculative_config.draft_model is invalid: unknown field"),
    ("{not json", "speculative_config='{not json' is invalid: not JSON"),
    ([1], r"speculative_config=\[1\] is invalid: must be a JSON object"),
])
def test_config_errors(bad, msg):
    with pytest.raises(ValueError, match=msg):
        EngineConfig(model="x", speculative_config=bad).validate()


def test_config_defaults_like_vllm():
    c = EngineConfig(model="x", speculative_config='{"method": "ngram", "num_speculative_tokens": 3}').speculative()
    assert (c.num_speculative_tokens, c.prompt_lookup_max, c.prompt_lookup_min) == (3, 5, 5)
    c = EngineConfig(model="x", speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                                                    "prompt_lookup_max": 2}).speculative()
    assert (c.prompt_lookup_max, c.prompt_lookup_min) == (2, 2)
    assert EngineConfig(model="x").speculative() is None


def test_flag_in_both_clis_and_llm_kwarg():
    import argparse

    from jaxllm.cli_args import add_engine_args, engine_config_from_args
    from serving.__main__ import build_parser

    ap = argparse.ArgumentParser()
    add_engine_args(ap)
    assert engine_config_from_args(ap.parse_args([])).speculative() is None
    flag = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4, "prompt_lookup_min": 2}'
    for parser, extra in ((ap, []), (build_parser(), ["--model", "m"])):
        c = engine_config_from_args(parser.parse_args(extra + ["--speculative-config", flag])).validate().speculative()
        assert (c.method, c.num_speculative_tokens, c.prompt_lookup_max, c.prompt_lookup_min) == ("ngram", 3, 4, 2)
    bad = engine_config_from_args(ap.parse_args(["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 99}']))
    with pytest.raises(ValueError, match=r"^speculative_config.num_speculative_tokens=99 is invalid: must be an integer in \[1, 16\]$"):
        bad.validate()


def test_runner_built_for_fewer_drafts_is_refused():
    from jaxllm.engine.engine import LLMEngine
    from tests.fakes.fake_runner import FakeRunner
    from tests.fakes.fake_tokenizer import FakeIncrementalDetokenizer, FakeTokenizer

    tok = FakeTokenizer()
    runner = FakeRunner(64, 4, vocab_size=tok.vocab_size, eos_token_ids=tok.eos_token_ids)
    runner.num_speculative_tokens = 2  # as a ModelRunner built with K=2: its mixed buckets hold 3 rows a seq
    cfg = EngineConfig(model="fake", block_size=4, max_model_len=128,
                       speculative_config={"method": "ngram", "num_speculative_tokens": 4})
    with pytest.raises(ValueError, match="num_speculative_tokens=4 is invalid for this runner: built for at most 2"):
        LLMEngine(cfg, runner, tok, detokenizer_factory=FakeIncrementalDetokenizer)


def test_backoff_stops_drafting_for_rejected_requests_outputs_unchanged():
    """The hash model rarely continues an earlier n-gram: most drafts are rejected, so the
    low-acceptance pause (engine/spec_backoff.py) cuts the drafts; tokens stay the plain run's."""
    reqs = [(f"r{i}", f"a prompt number {i} " * 3, SamplingParams(max_tokens=80, ignore_eos=True,
                                                                 logprobs=1 if i == 0 else None), None)
            for i in range(4)]
    want = run_workload(make_engine(seed=0, async_scheduling=False), reqs)
    on = make_engine(seed=0, async_scheduling=False, speculative_config=SPEC)
    off = make_engine(seed=0, async_scheduling=False, speculative_config=SPEC)
    off.spec_backoff = None
    got_on, got_off = run_workload(on, reqs), run_workload(off, reqs)
    for rid in want:
        assert summary(got_on[rid]) == summary(got_off[rid]) == summary(want[rid]), rid
    assert off.num_accepted_tokens < off.num_draft_tokens / 4  # mostly rejected without the pause
    assert 0 < on.num_draft_tokens < off.num_draft_tokens / 2, (on.num_draft_tokens, off.num_draft_tokens)
    assert on.runner.num_drafts_scheduled == on.num_draft_tokens
