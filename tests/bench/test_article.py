"""bench/article.py: the chat-like length draw, the latency summaries, and the run's bookkeeping on the
real LLMEngine over the fake runner (no jax)."""
import math
import statistics

import pytest

from bench.article import (CHAT_SIGMA, SHAREGPT_INPUT_MEAN, SHAREGPT_OUTPUT_MEAN, chat_lengths, chat_requests,
                           latency_stats, run_article)
from jaxllm.config import EngineConfig
from jaxllm.engine.engine import LLMEngine
from tests.fakes.fake_runner import FakeRunner
from tests.fakes.fake_tokenizer import FakeIncrementalDetokenizer, FakeTokenizer


def test_chat_lengths_seeded_and_filtered_like_vllm():
    a, b, c = chat_lengths(512), chat_lengths(512), chat_lengths(512, seed=1)
    assert a == b and a != c and len(a) == 512
    # vLLM's ShareGPT filter: both >= 4, prompt <= 1024, prompt + output <= 2048
    assert all(p >= 4 and o >= 4 and p <= 1024 and p + o <= 2048 for p, o in a)
    small = chat_lengths(200, input_mean=20, output_mean=10, max_prompt=30, max_total=40)
    assert all(4 <= p <= 30 and o >= 4 and p + o <= 40 for p, o in small)
    with pytest.raises(ValueError, match="max_total"):
        chat_lengths(1, max_prompt=100, max_total=102)


def test_chat_lengths_follow_the_lognormal_they_name():
    # no filter in reach: the sample mean is the ShareGPT mean, the median exp(mu) = mean * e^(-sigma^2/2)
    pairs = chat_lengths(20000, seed=7, max_prompt=10 ** 7, max_total=2 * 10 ** 7)
    p, o = [x for x, _ in pairs], [y for _, y in pairs]
    assert statistics.fmean(p) == pytest.approx(SHAREGPT_INPUT_MEAN, rel=0.04)
    assert statistics.fmean(o) == pytest.approx(SHAREGPT_OUTPUT_MEAN, rel=0.04)
    shrink = math.exp(-CHAT_SIGMA ** 2 / 2)
    assert statistics.median(p) == pytest.approx(SHAREGPT_INPUT_MEAN * shrink, rel=0.04)
    assert statistics.median(o) == pytest.approx(SHAREGPT_OUTPUT_MEAN * shrink, rel=0.04)


def test_latency_stats_by_hand():
    stamps = {"a": [1.0, 1.1, 1.3], "b": [2.0], "c": []}
    s = latency_stats(stamps, t_submit=0.5)
    assert s["ttft_ms"]["n"] == 2 and s["ttft_ms"]["p50"] == pytest.approx(1000.0)  # 500 and 1500 ms
    assert s["itl_ms"]["n"] == 2 and s["itl_ms"]["p50"] == pytest.approx(150.0)  # 100 and 200 ms
    assert s["itl_ms"]["p99"] == pytest.approx(199.0)
    assert s["tpot_ms"]["n"] == 1 and s["tpot_ms"]["mean"] == pytest.approx(150.0)  # (1.3 - 1.0) / 2


def _engine(max_num_seqs=4):
    config = EngineConfig(model="fake", block_size=4, max_model_len=64, max_num_batched_tokens=32,
                          max_num_seqs=max_num_seqs)
    tok = FakeTokenizer()
    runner = FakeRunner(256, 4, vocab_size=tok.vocab_size, eos_token_ids=tok.eos_token_ids)
    return LLMEngine(config, runner, tok, detokenizer_factory=FakeIncrementalDetokenizer)


def test_run_article_stamps_every_token_of_every_request():
    engine = _engine()
    reqs = chat_requests(10, engine.vocab_size, input_mean=8, output_mean=6, max_prompt=24, max_total=48)
    res = run_article(engine, reqs, deadline_s=600)
    outs = [r.output_len for r in reqs]
    assert not res["truncated"] and res["completed"] == 10 and not engine.has_unfinished_requests()
    assert res["output_tokens"] == sum(outs) and res["prompt_tokens"] == sum(r.prompt_len for r in reqs)
    assert res["itl_ms"]["n"] == sum(o - 1 for o in outs)  # every gap inside a request, none across
    assert res["ttft_ms"]["n"] == 10 and res["tpot_ms"]["n"] == sum(o > 1 for o in outs)
    assert res["workload"]["output_tokens"] == sum(outs) and res["compiles"] == 0
    assert res["output_tokens_per_s"] == pytest.approx(res["output_tokens"] / res["elapsed_s"])
    # 10 requests through 4 slots: the step count is at least the longest queue of outputs
    assert res["steps"] >= max(outs) and res["itl_ms"]["p99"] >= res["itl_ms"]["p50"] > 0


def test_run_article_deadline_aborts_and_reports_what_was_made():
    engine = _engine()
    reqs = chat_requests(6, engine.vocab_size, input_mean=8, output_mean=6, max_prompt=24, max_total=48)
    res = run_article(engine, reqs, deadline_s=0.0)
    assert res["truncated"] and res["completed"] == 0 and res["output_tokens"] == 0
    assert not engine.has_unfinished_requests()  # everything aborted, the engine is idle again
    with pytest.raises(RuntimeError, match="idle"):
        engine.add_request("busy", {"prompt_token_ids": [5, 6, 7]})
        run_article(engine, reqs, deadline_s=1.0)
