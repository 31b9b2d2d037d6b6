"""The real jitted engine (ModelRunner + host core) on a tiny random HF llama.

References are independent of the engine: a brute-force greedy loop that recomputes every full
sequence with the model each step (fresh private cache, no reuse), with numpy penalties
(tests/runner/brute_force.py).
"""
from __future__ import annotations

import random

import jax.numpy as jnp
import msgspec
import numpy as np
import pytest

from jaxllm.config import EngineConfig
from jaxllm.engine.engine import LLMEngine
from jaxllm.engine.factory import build_engine
from jaxllm.llm import LLM
from jaxllm.runner.sampler import SAMPLE_PLANS
from jaxllm.sampling_params import SamplingParams
from jaxllm.structured_outputs import StructuredOutputsParams
from tests.engine_checks import assert_clean
from tests.fakes.grammar_tokenizers import byte_vocab_grammar_tokenizer, decode_bytes
from tests.models.hf_tiny import make_tiny_hf
from tests.runner.brute_force import BLOCK, MAX_LEN, VOCAB, Reference, assert_rank, random_prompts

PER_BLOCK_BYTES = 2 * 2 * BLOCK * 2 * 16 * 4  # k+v, 2 layers, 16 tokens, 2 kv heads, head_dim 16, f32


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return make_tiny_hf("llama", str(tmp_path_factory.mktemp("tiny_hf")))


def make_engine(path, **kw):
    cfg = dict(model=path, max_model_len=MAX_LEN, block_size=BLOCK, max_num_seqs=16, max_num_batched_tokens=256)
    cfg.update(kw)
    return build_engine(EngineConfig(**cfg), compile_cache=False)


@pytest.fixture(scope="module")
def engine(tiny_path):
    """Ample KV cache; buckets decode {8, 16}, mixed {64, 256}; grammars over a byte vocabulary."""
    e = make_engine(tiny_path)
    e._grammar_tokenizer = byte_vocab_grammar_tokenizer(VOCAB, e.eos_token_ids)
    return e


@pytest.fixture(scope="module")
def tight_engine(tiny_path):
    """Chunked prefill (64-token budget) and a 24-block cache: long batches must preempt."""
    return make_engine(tiny_path, max_num_seqs=8, max_num_batched_tokens=64,
                       kv_cache_memory_bytes=24 * PER_BLOCK_BYTES)


def generate(engine, prompts, params):
    outs = LLM("tiny", engine=engine).generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert_clean(engine)
    return outs


@pytest.fixture(scope="module")
def reference(tiny_path):
    return Reference(tiny_path)


# ----- tests --------------------------------------------------------------------------------
def test_greedy_matches_brute_force(engine, reference):
    prompts = random_prompts(0, 8, 1, 150)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=5)
    outs = generate(engine, prompts, params)
    want, lsm = reference.greedy(prompts, 20)
    spread = []
    for o, w, ls in zip(outs, want, lsm):
        c = o.outputs[0]
        assert c.token_ids == w
        assert c.finish_reason == "length"
        for tok, entry, row in zip(c.token_ids, c.logprobs, ls):  # raw logprobs of the model
            assert set(entry) >= {tok} and len(entry) >= 5
            top = np.argsort(-row, kind="stable")[:5]
            for r, t in enumerate(top):
                assert abs(entry[int(t)].logprob - row[t]) < 1e-4
                assert entry[int(t)].rank == r + 1 or int(t) == tok
            assert_rank(entry[tok].rank, row, tok)
            spread.append(row.max() - np.median(row))
    assert np.mean(spread) > 1.0, "near-uniform logits: greedy equality would be a weak check"


def test_allowed_token_ids_and_logit_bias_match_brute_force(engine, reference):
    prompts = random_prompts(5, 4, 3, 60)
    allowed = [int(t) for t in np.random.default_rng(5).choice(VOCAB, 12, replace=False)]
    bias = {allowed[0]: -100.0, allowed[1]: 4.0, allowed[2]: 2.0}
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, allowed_token_ids=allowed,
                            logit_bias=bias, repetition_penalty=1.3, logprobs=1)
    outs = generate(engine, prompts, params)
    want, lsm = reference.greedy(prompts, 12, rep=1.3, allowed=allowed, bias=bias)
    ranks = []
    for o, w, ls in zip(outs, want, lsm):
        c = o.outputs[0]
        assert c.token_ids == w and set(w) <= set(allowed) and allowed[0] not in w
        for tok, entry, row in zip(c.token_ids, c.logprobs, ls):
            assert abs(entry[tok].logprob - row[tok]) < 1e-4  # logprobs: the raw model distribution
            assert_rank(entry[tok].rank, row, tok)  # the allowed list often forces a low-ranked token
            ranks.append(entry[tok].rank)
    assert max(ranks) > 1, "every pick was the raw argmax: the rank check was weak"
    plain = generate(engine, prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in plain] == reference.greedy(prompts, 12)[0]  # rows without lists


def test_sampled_logprobs_ranks_and_texts_outside_the_top_k(engine, reference):
    """Temperature sampling: the engine's Logprob of every drawn token (logprob, rank in the full
    distribution, decoded_token) against the brute-force model's logits for the same context;
    hot draws land outside the top-2 that is returned alongside."""
    prompts = random_prompts(9, 3, 5, 40)
    outs = generate(engine, prompts, SamplingParams(temperature=3.0, seed=4, max_tokens=8, ignore_eos=True,
                                                    logprobs=2))
    assert engine.tokenizer.has_text is False
    outside = 0
    for p, o in zip(prompts, outs):
        c = o.outputs[0]
        rows = reference.logits([p + c.token_ids[:i] for i in range(len(c.token_ids))])
        for tok, entry, x in zip(c.token_ids, c.logprobs, rows):
            row = x - x.max() - np.log(np.exp(x - x.max()).sum())
            assert abs(entry[tok].logprob - row[tok]) < 1e-4
            assert_rank(entry[tok].rank, row, tok)
            outside += entry[tok].rank > 2
            top = np.argsort(-row, kind="stable")[:2]
            assert [entry[int(t)].rank for t in top if int(t) != tok] == [r + 1 for r, t in enumerate(top)
                                                                          if int(t) != tok]
            assert len(entry) == 2 + (tok not in top)
            # the tiny model has no tokenizer: no text (tests/engine/test_engine.py checks texts)
            assert all(lp.decoded_token is None for lp in entry.values())
    assert outside > 0, "no draw outside the top-2: raise the temperature"


def test_greedy_with_chunked_prefill_preemption_priority_and_n(tight_engine, reference):
    prompts = random_prompts(1, 8, 60, 150)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    before = tight_engine.get_stats()["num_preemptions"]
    outs = generate(tight_engine, prompts, params)
    assert tight_engine.get_stats()["num_preemptions"] > before, "the cache was not tight enough to preempt"
    want, _ = reference.greedy(prompts, 24)
    for o, w in zip(outs, want):
        assert o.outputs[0].token_ids == w
    # n > 1 greedy samples share the prompt and all equal the reference
    outs = generate(tight_engine, prompts[:2], SamplingParams(n=3, temperature=0.0, max_tokens=24, ignore_eos=True))
    for o, w in zip(outs, want[:2]):
        assert [c.token_ids for c in o.outputs] == [w] * 3
    # scheduling_policy="priority": a second engine over the same runner (the policy is host-side), the same
    # batch: it preempts, never the most urgent request (priority 0, the last to arrive: fcfs above preempts
    # the newest), and every output is the reference's
    prio = LLMEngine(msgspec.structs.replace(tight_engine.config, scheduling_policy="priority"),
                     tight_engine.runner, tight_engine.tokenizer)
    victims, preempt = [], prio.scheduler._preempt
    prio.scheduler._preempt = lambda r: (victims.append(r.priority), preempt(r))
    try:
        outs = LLM("tiny", engine=prio).generate([{"prompt_token_ids": p} for p in prompts], params,
                                                 use_tqdm=False, priority=[5, 4, 3, 1, 7, 2, 6, 0])
        assert_clean(prio)
    finally:
        assert tight_engine.reset_prefix_cache()  # the second engine overwrote cached blocks
    assert victims and 0 not in victims
    assert [o.outputs[0].token_ids for o in outs] == want


def test_penalties_match_brute_force_across_prefix_hits_and_preemption(tight_engine, reference):
    shared = random_prompts(2, 1, 48, 48)[0]
    prompts = [shared + p for p in random_prompts(3, 6, 30, 90)]  # prefix-cache hits after the first
    kw = dict(rep=1.6, freq=0.4, pres=0.3)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, repetition_penalty=kw["rep"],
                            frequency_penalty=kw["freq"], presence_penalty=kw["pres"])
    before = tight_engine.get_stats()
    outs = generate(tight_engine, prompts, params)
    after = tight_engine.get_stats()
    assert after["num_preemptions"] > before["num_preemptions"]
    assert after["prefix_cache_hits"] > before["prefix_cache_hits"]
    want, _ = reference.greedy(prompts, 24, **kw)
    plain, _ = reference.greedy(prompts[:2], 24)
    assert want[:2] != plain, "penalties changed nothing: the check would be weak"
    for o, w in zip(outs, want):
        assert o.outputs[0].token_ids == w


def test_cache_is_donated_and_updated_in_place(engine):
    r = engine.runner
    old = r.kv_cache
    ptr = old.k.unsafe_buffer_pointer()
    engine.add_request("donate", [5, 6, 7, 8], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    engine.step()
    assert old.k.is_deleted() and old.v.is_deleted(), "the step did not donate the KV cache"
    assert r.kv_cache.k.unsafe_buffer_pointer() == ptr, "the cache moved: the step copied it"
    assert float(jnp.abs(r.kv_cache.k).sum()) > 0  # the prompt's KV was written
    while engine.has_unfinished_requests():
        engine.step()
    assert_clean(engine)


def _random_params(rng: random.Random) -> SamplingParams:
    greedy = rng.random() < 0.3
    kw = dict(max_tokens=rng.randint(1, 40), seed=rng.choice([None, rng.randint(0, 2**40)]))
    if greedy:
        kw["temperature"] = 0.0
    else:
        kw["temperature"] = rng.uniform(0.3, 1.5)
        if rng.random() < 0.5:
            kw["top_k"] = rng.choice([1, 5, 50, 300])
        if rng.random() < 0.5:
            kw["top_p"] = rng.uniform(0.3, 1.0)
        if rng.random() < 0.3:
            kw["min_p"] = rng.uniform(0.0, 0.3)
    if rng.random() < 0.3:
        kw.update(repetition_penalty=rng.uniform(0.8, 1.5), presence_penalty=rng.uniform(-1, 1),
                  frequency_penalty=rng.uniform(-1, 1))
    if rng.random() < 0.3:
        kw["logprobs"] = rng.randint(0, 20)
    if rng.random() < 0.2:
        kw["n"] = rng.randint(2, 4)
    if rng.random() < 0.3:
        kw["stop_token_ids"] = rng.sample(range(VOCAB), 3)
    if rng.random() < 0.2:
        kw["min_tokens"] = rng.randint(0, kw["max_tokens"])
    if rng.random() < 0.15:
        kw["logit_bias"] = {t: rng.uniform(-100, 100) for t in rng.sample(range(VOCAB), rng.randint(1, VOCAB))}
    if rng.random() < 0.15:
        kw["allowed_token_ids"] = rng.sample(range(VOCAB), rng.randint(1, VOCAB))
    kw["ignore_eos"] = rng.random() < 0.5
    if rng.random() < 0.2:  # structured outputs; no min_tokens / allowed ids / stop ids that could
        kind, spec = rng.choice(GRAMMARS)  # leave the grammar no token, room to finish, EOS ends it
        kw.update(structured_outputs=StructuredOutputsParams(**{kind: spec}), max_tokens=rng.randint(12, 40),
                  ignore_eos=False, min_tokens=0, allowed_token_ids=None, stop_token_ids=None)
    return SamplingParams(**kw)


GRAMMARS = [("regex", r"[a-c]{1,4}x"), ("choice", ["ab", "cde", "f"]),
            ("json", {"type": "object", "properties": {"k": {"enum": [1, 22, "z"]}}, "required": ["k"],
                      "additionalProperties": False})]


def assert_matches(spec: StructuredOutputsParams, text: str) -> None:
    import json
    import re

    if spec.regex is not None:
        assert re.fullmatch(spec.regex, text), (spec.regex, text)
    elif spec.choice is not None:
        assert text in spec.choice, (spec.choice, text)
    else:
        assert json.loads(text) in ({"k": 1}, {"k": 22}, {"k": "z"}), text


def test_zero_compiles_after_warmup_serving_200_random_requests(engine):
    r = engine.runner
    compiled, traces = r.compile_count, r.num_traces
    # forward + prompt-lp per bucket, sampling per S (with branchless sampling one per SamplePlan), + the
    # block copy (beam search forks)
    n_sample = len(r.buckets.sample_sizes()) * (len(SAMPLE_PLANS) if r.branchless_sampling else 1)
    assert compiled == 2 * len(r.buckets.all()) + n_sample + 1 and traces == len(r.buckets.all()) + n_sample
    rng = random.Random(7)
    prompts = [np.random.default_rng(i).integers(0, VOCAB, rng.randint(1, 200)).tolist() for i in range(200)]
    params = [_random_params(rng) for _ in prompts]
    llm = LLM("tiny", engine=engine)
    outs = []
    for lo in range(0, 200, 50):  # four waves: the batch fills, drains and refills
        outs += llm.generate([{"prompt_token_ids": p} for p in prompts[lo:lo + 50]], params[lo:lo + 50],
                             use_tqdm=False)
        assert_clean(engine)
    assert r.compile_count == compiled, "a step compiled after warm-up"
    assert r.num_traces == traces, "a step retraced after warm-up"
    eos = engine.eos_token_ids
    for o, p, pr in zip(outs, params, prompts):
        assert o.prompt_token_ids == pr and len(o.outputs) == p.n
        for c in o.outputs:
            assert 1 <= len(c.token_ids) <= p.max_tokens
            assert all(0 <= t < VOCAB for t in c.token_ids)
            if c.finish_reason == "length":
                assert len(c.token_ids) == p.max_tokens
            else:
                assert c.finish_reason == "stop" and len(c.token_ids) >= p.min_tokens
                assert c.token_ids[-1] in set(p.stop_token_ids or ()) | (set() if p.ignore_eos else eos)
            # a stop/EOS id only ever ends a sequence, and never inside the first min_tokens
            banned = set(p.stop_token_ids or ()) | (set() if p.ignore_eos else eos)
            assert not banned & set(c.token_ids[:-1]) and not banned & set(c.token_ids[:p.min_tokens])
            if p.logprobs is not None:
                assert len(c.logprobs) == len(c.token_ids)
                assert all(t in e and len(e) >= p.logprobs for t, e in zip(c.token_ids, c.logprobs))
            if p.structured_outputs is not None:
                assert c.finish_reason == "stop", (p.structured_outputs, c.token_ids)
                assert_matches(p.structured_outputs, decode_bytes(c.token_ids, eos))
    assert sum(p.structured_outputs is not None for p in params) >= 20
    # seeded requests give the same tokens alone as inside the random batch
    seeded = [i for i, p in enumerate(params) if p.seed is not None and p.temperature > 0 and p.n == 1][:4]
    assert seeded
    for i in seeded:
        alone = generate(engine, [prompts[i]], params[i])[0]
        assert alone.outputs[0].token_ids == outs[i].outputs[0].token_ids
    assert r.compile_count == compiled


def test_penalties_count_every_prefix_hit_token_in_a_crowded_step(engine, reference):
    """Many requests admitted in one step with prefix-cache hits: the runner must seed each one's
    penalty state with its whole cached prefix, however many such tokens the step carries."""
    shared = random_prompts(4, 1, 96, 96)[0]  # 6 full blocks
    prompts = [shared + p for p in random_prompts(5, 7, 3, 20)]
    generate(engine, [shared + [7]], SamplingParams(temperature=0.0, max_tokens=1))  # cache the prefix
    kw = dict(rep=2.0, freq=0.0, pres=1.5)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, repetition_penalty=kw["rep"],
                            presence_penalty=kw["pres"])
    compiled = engine.runner.compile_count
    outs = generate(engine, prompts, params)
    assert engine.runner.compile_count == compiled  # the extra seeding steps reuse the bucket
    assert all(o.num_cached_tokens >= 96 for o in outs)
    want, _ = reference.greedy(prompts, 12, **kw)
    for i, (o, w) in enumerate(zip(outs, want)):
        assert o.outputs[0].token_ids == w, f"request {i}"


def test_mixed_constrained_and_free_batch_sync_and_async(engine):
    """The jitted path: seeded free requests get the same tokens beside constrained ones as alone;
    constrained completions match their specs; async scheduling (a second engine over the same
    runner) gives the synchronous engine's tokens. Nothing compiles."""
    import msgspec

    from jaxllm.engine.engine import LLMEngine

    compiled = engine.runner.compile_count
    prompts = random_prompts(11, 6, 3, 40)
    free = [SamplingParams(temperature=1.0, seed=100 + i, max_tokens=14, ignore_eos=True) for i in range(3)]
    constrained = [SamplingParams(temperature=1.0, seed=i, max_tokens=30, n=1 + i % 2, logprobs=1,
                                  structured_outputs=StructuredOutputsParams(**{k: v}))
                   for i, (k, v) in enumerate(GRAMMARS)]
    alone = [o.outputs[0].token_ids for o in generate(engine, prompts[:3], free)]
    mixed = generate(engine, prompts[:3] + prompts[3:], free + constrained)
    assert [o.outputs[0].token_ids for o in mixed[:3]] == alone
    for o, p in zip(mixed[3:], constrained):
        for c in o.outputs:
            assert c.finish_reason == "stop"
            assert_matches(p.structured_outputs, decode_bytes(c.token_ids, engine.eos_token_ids))
            assert all(t in lp for t, lp in zip(c.token_ids, c.logprobs))
    async_engine = LLMEngine(msgspec.structs.replace(engine.config, async_scheduling=True), engine.runner,
                             engine.tokenizer, grammar_tokenizer=engine._grammar_tokenizer)
    assert async_engine.async_scheduling
    again = generate(async_engine, prompts[:3] + prompts[3:], free + constrained)
    assert [[c.token_ids for c in o.outputs] for o in again] == [[c.token_ids for c in o.outputs] for o in mixed]
    assert engine.runner.compile_count == compiled


class _ByteTokenizer:
    """Byte i = id i (the tiny model's 256 ids): enough of a tokenizer for bad_words."""
    has_text = True

    def encode(self, text, add_special_tokens=True):
        return list(text.encode("latin-1"))


def test_bad_words_greedy_matches_brute_force_with_raw_logprobs(engine, reference):
    """bad_words on the jitted path: the engine's greedy tokens equal a brute-force loop that bans, at
    each step, the last token of every word the generated tokens are one token short of; no word the
    unconstrained run produced appears; logprobs stay the raw model's; nothing compiles."""
    from jaxllm.engine.bad_words import tokenize_bad_words

    compiled = engine.runner.compile_count
    prompts = random_prompts(21, 4, 5, 60)
    free = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    plain = [list(o.outputs[0].token_ids) for o in generate(engine, prompts, free)]
    words = []
    for t in plain:  # pieces of 3, 2 and 1 tokens of the free output (vLLM strips a word's leading spaces)
        starts = [i for i in range(len(t)) if not chr(t[i]).isspace()]
        words.append([bytes(t[i:i + n]).decode("latin-1") for i, n in zip(starts[1::4], (3, 2, 1))])
    seqs = [tokenize_bad_words(w, _ByteTokenizer(), VOCAB) for w in words]
    tok, engine.tokenizer = engine.tokenizer, _ByteTokenizer()
    try:
        outs = generate(engine, prompts, [free.clone(bad_words=w, logprobs=1, detokenize=False) for w in words])
    finally:
        engine.tokenizer = tok
    ctx, want, lsm = [list(p) for p in prompts], [[] for _ in prompts], [[] for _ in prompts]
    for _ in range(16):
        for i, x in enumerate(reference.logits(ctx)):
            lsm[i].append(x - x.max() - np.log(np.exp(x - x.max()).sum()))
            x = x.copy()
            for s in seqs[i]:  # brute force: ban s[-1] when the output ends with s[:-1]
                if len(s) - 1 <= len(want[i]) and want[i][len(want[i]) - len(s) + 1:] == list(s[:-1]):
                    x[s[-1]] = -np.inf
            want[i].append(int(np.argmax(x)))
            ctx[i].append(want[i][-1])
    assert engine.runner.compile_count == compiled
    for o, w, free_out, ss, ls in zip(outs, want, plain, seqs, lsm):
        c = o.outputs[0]
        assert c.token_ids == w
        assert all(any(free_out[k:k + len(s)] == list(s) for k in range(len(free_out))) for s in ss)
        assert not any(w[k:k + len(s)] == list(s) for s in ss for k in range(len(w)))
        for t, entry, row in zip(c.token_ids, c.logprobs, ls):
            assert abs(entry[t].logprob - row[t]) < 1e-4  # the raw distribution, bans or not
    assert sum(o.outputs[0].token_ids != f for o, f in zip(outs, plain)) == len(prompts)
