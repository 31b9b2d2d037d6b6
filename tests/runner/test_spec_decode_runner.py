"""Speculative decoding (n-gram drafts) with the real jitted runner on a tiny random llama: the
same runner without drafts is the reference. One runner (compiled once, mixed buckets sized for
1 + K rows per sequence) serves a plain engine, then a speculative one, on the 24-request mixed
workload of the async test (greedy and seeded sampling, penalties, stops, min/max tokens, n > 1,
logprobs, prompt logprobs, aborts, preemption, chunked prefill) plus repetitive greedy prompts.
Identical tokens and text, logprobs to f32 rounding; drafts proposed and accepted; nothing
compiled after warm-up; nothing left behind."""
from __future__ import annotations

import numpy as np
import pytest

from jaxllm.config import EngineConfig
from jaxllm.engine.engine import LLMEngine
from jaxllm.engine.factory import build_engine
from jaxllm.sampling_params import SamplingParams
from tests.fakes.fake_tokenizer import FakeIncrementalDetokenizer, FakeTokenizer
from tests.models.hf_tiny import make_tiny_hf
from tests.runner.test_async_engine_vs_sync import BLOCK, PER_BLOCK_BYTES, VOCAB, assert_same_run, run, workload

SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    path = make_tiny_hf("llama", str(tmp_path_factory.mktemp("tiny_hf")))
    cfg = EngineConfig(model=path, max_model_len=256, block_size=BLOCK, max_num_seqs=8, max_num_batched_tokens=64,
                       kv_cache_memory_bytes=24 * PER_BLOCK_BYTES, speculative_config=SPEC)
    r = build_engine(cfg, compile_cache=False).runner
    assert r.buckets.mixed_s == 32  # 8 seqs x (1 + 3) rows
    return r


def engine_on(runner, spec) -> LLMEngine:
    tok = FakeTokenizer()
    tok.eos_token_ids = set(runner.eos_ids)
    cfg = EngineConfig(model="tiny", max_model_len=256, block_size=BLOCK, max_num_seqs=8, max_num_batched_tokens=64,
                       seed=0, async_scheduling=False, speculative_config=spec)
    return LLMEngine(cfg, runner, tok, detokenizer_factory=FakeIncrementalDetokenizer)


def repetitive():
    para = np.random.default_rng(5).integers(3, VOCAB, 12).tolist()
    return [(f"rep{i}", para * (2 + i), SamplingParams(max_tokens=40, ignore_eos=True, temperature=0.0,
                                                     logprobs=2 if i == 1 else None), None) for i in range(3)]


def test_spec_and_plain_engines_give_identical_outputs_and_compile_nothing(runner):
    reqs = workload() + repetitive()
    compiled = (runner.compile_count, runner.num_traces)
    plain = engine_on(runner, None)
    want = run(plain, reqs)
    eng = engine_on(runner, SPEC)
    drafts = []
    dispatch = runner.dispatch
    kinds = set()
    runner.dispatch = lambda out: (drafts.append(sum(s.num_draft_tokens for s in out.seqs)),
                                   kinds.add(runner.buckets.label(out.seqs).split("_")[0]))[0] or dispatch(out)
    try:
        got = run(eng, reqs)
    finally:
        del runner.dispatch
    assert_same_run(runner, compiled, got, want, reqs)
    assert sum(drafts) == eng.num_draft_tokens > 0
    assert kinds == {"decode", "draft", "mixed"}, kinds  # all-decoding steps with drafts ran draft buckets
    assert eng.num_accepted_tokens > 0, (eng.num_draft_tokens, eng.num_accepted_tokens)
    assert eng.get_stats()["num_preemptions"] > 0
