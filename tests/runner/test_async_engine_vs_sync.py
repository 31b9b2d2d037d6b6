"""Async scheduling with the real jitted runner on a tiny random llama: the synchronous engine is
the reference. One runner (compiled once) serves a sync engine, then an async one, on the same
24-request mixed workload: greedy and seeded sampling, penalties, stop strings and ids, min/max
tokens, n > 1, logprobs, prompt logprobs, aborts while a step is in flight, preemption (a 24-block
cache) and chunked prefill (a 64-token budget). Identical outputs; nothing compiled after warm-up;
nothing left behind."""
from __future__ import annotations

import random

import numpy as np
import pytest

from jaxllm.config import EngineConfig
from jaxllm.engine.engine import LLMEngine
from jaxllm.engine.factory import build_engine
from jaxllm.sampling_params import SamplingParams
from tests.engine_checks import assert_clean
from tests.fakes.fake_tokenizer import FakeIncrementalDetokenizer, FakeTokenizer
from tests.models.hf_tiny import make_tiny_hf

BLOCK = 16
VOCAB = 256
PER_BLOCK_BYTES = 2 * 2 * BLOCK * 2 * 16 * 4  # k+v, 2 layers, 16 tokens, 2 kv heads, head_dim 16, f32


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    path = make_tiny_hf("llama", str(tmp_path_factory.mktemp("tiny_hf")))
    cfg = EngineConfig(model=path, max_model_len=256, block_size=BLOCK, max_num_seqs=8, max_num_batched_tokens=64,
                       kv_cache_memory_bytes=24 * PER_BLOCK_BYTES)
    return build_engine(cfg, compile_cache=False).runner


def engine_on(runner, async_scheduling: bool, **kw) -> LLMEngine:
    """An engine around the shared runner, with a text tokenizer (the tiny model has none) whose EOS
    is the model's, so stop strings are exercised too."""
    tok = FakeTokenizer()
    tok.eos_token_ids = set(runner.eos_ids)
    cfg = EngineConfig(model="tiny", max_model_len=256, block_size=BLOCK, max_num_seqs=8, max_num_batched_tokens=64,
                       seed=0, async_scheduling=async_scheduling)
    return LLMEngine(cfg, runner, tok, detokenizer_factory=FakeIncrementalDetokenizer, **kw)


def workload():
    """24 (request_id, prompt ids, params, abort after this many shown tokens or None)."""
    rng = random.Random(12)
    shared = np.random.default_rng(99).integers(3, VOCAB, 40).tolist()
    reqs = []
    for i in range(24):
        prompt = np.random.default_rng(i).integers(3, VOCAB, rng.choice([3, 17, 40, 70, 110])).tolist()
        if i % 4 == 0:
            prompt = shared + prompt
        max_tokens = rng.randint(1, 20)
        kw = dict(max_tokens=max_tokens, ignore_eos=i % 5 != 0, temperature=0.0 if i % 2 else 0.9,
                  seed=i if i % 3 else None, n=2 if i % 7 == 3 else 1)
        if i % 6 == 1:
            kw["stop"] = [chr(c) for c in range(ord("a"), ord("z"))]  # fake text: ids 100..124
        if i % 8 == 2:
            kw["stop_token_ids"] = rng.sample(range(3, VOCAB), 20)
        if i % 5 == 4:
            kw["min_tokens"] = min(4, max_tokens)
        if i % 4 == 1:
            kw["logprobs"] = 3
        if i % 6 == 5:
            kw.update(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.3)
        if i % 11 == 7:
            kw["prompt_logprobs"] = 2
        abort_after = rng.randint(1, 5) if i % 9 == 4 and kw["n"] == 1 else None
        reqs.append((f"r{i}", prompt, SamplingParams(**kw), abort_after))
    return reqs


def run(engine, reqs):
    for rid, prompt, p, _ in reqs:
        engine.add_request(rid, {"prompt_token_ids": prompt}, p)
    abort_after = {rid: k for rid, _, _, k in reqs if k is not None}
    finals = {}
    while engine.has_unfinished_requests():
        to_abort = []
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
            elif out.request_id in abort_after and len(out.outputs[0].token_ids) >= abort_after[out.request_id]:
                to_abort.append(out.request_id)
        for o in engine.abort_request(to_abort):
            finals[o.request_id] = o
    assert_clean(engine)
    return finals


def exact(o):
    return [(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs]


def assert_same_logprobs(got, want, rid):
    """Same token ids in every logprob entry; values equal to float32 rounding. The two modes run
    different batches (async admits a step later), and XLA's reductions over a bucket of another
    shape may round the last bits differently."""
    def flat(o):
        entries = list(o.prompt_logprobs or []) + [e for c in o.outputs for e in (c.logprobs or [])]
        keys = [None if e is None else sorted(e) for e in entries]
        vals = [v.logprob for e in entries if e is not None for _, v in sorted(e.items())]
        vals += [v.rank for e in entries if e is not None for _, v in sorted(e.items())]
        return keys, vals + [c.cumulative_logprob or 0.0 for c in o.outputs]
    (gk, gv), (wk, wv) = flat(got), flat(want)
    assert gk == wk, rid
    assert gv == pytest.approx(wv, rel=1e-5, abs=1e-5), rid


def assert_same_run(runner, compiled, got, want, reqs):
    """``got`` (a run of ``reqs`` on ``runner``, warmed up with ``compiled`` = its (compile_count,
    num_traces) before) compiled nothing and equals ``want`` request for request: tokens, text,
    finish and stop reasons exactly, logprobs as ``assert_same_logprobs``."""
    assert (runner.compile_count, runner.num_traces) == compiled, "compiled after warm-up"
    assert set(got) == set(want) == {r[0] for r in reqs}
    for rid in want:
        assert exact(got[rid]) == exact(want[rid]), rid
        assert_same_logprobs(got[rid], want[rid], rid)


def test_async_and_sync_engines_give_identical_outputs_and_compile_nothing(runner):
    reqs = workload()
    compiled = (runner.compile_count, runner.num_traces)
    sync = engine_on(runner, async_scheduling=False)
    want = run(sync, reqs)
    eng = engine_on(runner, async_scheduling=True)
    assert eng.async_scheduling and not sync.async_scheduling
    placeholders = []
    dispatch = runner.dispatch
    runner.dispatch = lambda out: placeholders.append(sum(s.placeholder for s in out.seqs)) or dispatch(out)
    try:
        got = run(eng, reqs)
    finally:
        del runner.dispatch
    assert_same_run(runner, compiled, got, want, reqs)
    reasons = {c.finish_reason for o in want.values() for c in o.outputs}
    assert reasons == {"stop", "length", "abort"}, reasons
    assert any(o.prompt_logprobs for o in want.values())
    for e in (sync, eng):
        assert e.get_stats()["num_preemptions"] > 0
    # the async engine really overlapped: it scheduled decodes on tokens still on the device
    assert sum(placeholders) > 100


def test_constrained_requests_run_on_tokens_in_flight_with_the_sync_outputs(runner):
    """Structured outputs under async scheduling: a constrained request is scheduled on its token still
    on the device (late_bitmask: the runner launches the forward pass, the engine hands the masks over
    after reading the step before back), greedy and seeded, n > 1, an abort, beside free requests:
    the sync engine's outputs, every constrained text in its language, nothing compiled."""
    import re

    from jaxllm.structured_outputs import StructuredOutputsParams as SO
    from tests.fakes.grammar_tokenizers import byte_vocab_grammar_tokenizer, decode_bytes

    specs = [SO(regex=r"[a-z]{2,6}@[a-z]{2,4}\.(com|org)"), SO(choice=["red", "green", "blue"]),
             SO(regex=r"(0|[1-9][0-9]{0,3})(\+(0|[1-9][0-9]{0,3})){1,3}")]
    reqs = []
    for i in range(12):
        prompt = np.random.default_rng(100 + i).integers(3, VOCAB, 5 + 9 * i).tolist()
        kw = dict(max_tokens=30, temperature=0.0 if i % 2 else 0.8, seed=i, n=2 if i == 5 else 1)
        if i % 3 != 2:
            kw["structured_outputs"] = specs[i % 3] if i % 4 else specs[2]
        reqs.append((f"c{i}", prompt, SamplingParams(**kw), 3 if i == 7 else None))
    grammar = byte_vocab_grammar_tokenizer(VOCAB, runner.eos_ids)
    compiled = (runner.compile_count, runner.num_traces)
    want = run(engine_on(runner, False, grammar_tokenizer=grammar), reqs)
    late = []
    dispatch = runner.dispatch
    runner.dispatch = lambda out: late.append(out.late_bitmask) or dispatch(out)
    try:
        got = run(engine_on(runner, True, grammar_tokenizer=grammar), reqs)
    finally:
        del runner.dispatch
    assert_same_run(runner, compiled, got, want, reqs)
    assert sum(late) > 10, late  # constrained decodes went out on tokens still in flight
    for rid, _, p, abort in reqs:
        so = p.structured_outputs
        for c in got[rid].outputs:
            if so is None or abort is not None:
                continue
            text = decode_bytes(c.token_ids, runner.eos_ids)
            assert c.finish_reason == "stop", (rid, text)
            assert (text in so.choice) if so.choice else re.fullmatch(so.regex, text), (rid, text)
