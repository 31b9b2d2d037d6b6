"""Speculative decoding on the real SmolLM2-135M (fp32 on CPU): greedy (and seeded) outputs with
n-gram drafts equal those without, token for token, on the 24-request mixed workload of the async
runner test and on repetitive text, with a KV cache small enough that both runs preempt (and
recompute) requests; nothing compiled after warm-up. One runner (built with the speculative config,
so its mixed buckets hold 1 + K rows per sequence) serves both engines."""
from __future__ import annotations

import pytest

from jaxllm.config import EngineConfig
from jaxllm.engine.engine import LLMEngine
from jaxllm.engine.factory import build_engine
from jaxllm.sampling_params import SamplingParams
from tests.runner.test_async_engine_vs_sync import exact, run, workload

pytestmark = pytest.mark.slow

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 1}
# a 64-token step budget: mixed T in [64] (not [64, 128]), one 30-layer program fewer to compile; the
# longer prompts prefill in chunks. 24 blocks of 16 (K and V, 30 layers, 3 kv heads of 64, fp32): the
# longest request (110 + 64 tokens) fits in 11 and max_model_len 256 in 16, but 8 running ones do not,
# so both runs preempt (measured: 3 plain, 4 speculative; 80 blocks and max_model_len 512 preempted 0)
KW = dict(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64, block_size=16,
          kv_cache_memory_bytes=24 * 2 * 30 * 16 * 3 * 64 * 4)


@pytest.fixture(scope="module")
def built():
    return build_engine(EngineConfig(model="smollm2-135m", speculative_config=SPEC, **KW), compile_cache=False)


def engine(built, spec):
    return LLMEngine(EngineConfig(model="smollm2-135m", seed=0, async_scheduling=False, speculative_config=spec, **KW),
                     built.runner, built.tokenizer)


def logprobs(o):
    """Every logprob entry's (token id, rank, logprob), flattened. A step with drafts runs the mixed
    attention path where the plain run decodes: through 30 layers that moves logprobs by ~2e-5."""
    out = []
    for c in o.outputs:
        for e in c.logprobs or []:
            for tid, v in sorted(e.items()):
                out += [tid, v.rank, v.logprob]
    return out


def test_smollm2_spec_outputs_equal_plain(built):
    runner, tok = built.runner, built.tokenizer
    para = ("def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\n"
            "def mul(a, b):\n    return a * b\n")
    rep = [(f"rep{i}", tok.apply_chat_template([{"role": "user", "content": f"Repeat this code exactly:\n{para}"}]),
            SamplingParams(temperature=0.0, max_tokens=64, logprobs=2 if i else None), None) for i in range(2)]
    reqs = workload() + rep
    compiled = runner.compile_count
    plain = engine(built, None)
    want = run(plain, reqs)
    eng = engine(built, SPEC)
    got = run(eng, reqs)
    assert runner.compile_count == compiled, "compiled after warm-up"
    assert set(got) == set(want)
    for rid in want:
        assert exact(got[rid]) == exact(want[rid]), rid
        assert logprobs(got[rid]) == pytest.approx(logprobs(want[rid]), rel=1e-4, abs=1e-4), rid
    assert eng.num_accepted_tokens > 0 and eng.mean_accepted_tokens > 1.5, eng.mean_accepted_tokens
    assert eng.num_steps < plain.num_steps
    assert runner.num_blocks == 24
    # preempted requests were recomputed (drafts of a preempted sequence dropped) with equal outputs
    assert eng.get_stats().num_preemptions > 0 and plain.get_stats().num_preemptions > 0
