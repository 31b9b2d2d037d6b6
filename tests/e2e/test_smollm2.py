"""End to end on the real SmolLM2-135M (GGUF, fp32 on CPU): ONE engine for the whole module.

The config is tight on purpose: a 128-token step budget forces chunked prefill and an 80-block
KV cache (1,280 tokens) forces preemption. The caching-off comparison reuses that engine's
runner (prefix caching is host-side only) under a second LLMEngine, so the module compiles once.
The CLI test runs the same config in a subprocess against this module's compile cache.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
import re
import subprocess
import sys

import msgspec
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jaxllm.engine.engine import LLMEngine
from jaxllm.llm import LLM
from jaxllm.sampling_params import SamplingParams
from tests.e2e.structured_strategies import ARITHMETIC, SETTINGS, choices, is_arithmetic, json_schemas, regexes
from tests.engine_checks import assert_clean

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
MAX_LEN = 1024
MAX_SEQS = 8
BUDGET = 128
BLOCKS = 80
KV_BYTES = BLOCKS * 2 * 30 * 16 * 3 * 64 * 4  # 30 layers, 3 kv heads, head_dim 64, f32
ENGINE_KW = dict(max_model_len=MAX_LEN, max_num_seqs=MAX_SEQS, max_num_batched_tokens=BUDGET,
                 kv_cache_memory_bytes=KV_BYTES)


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("xla"))


@pytest.fixture(scope="module")
def llm(compile_cache):
    old = os.environ.get("JAXLLM_COMPILE_CACHE")
    os.environ["JAXLLM_COMPILE_CACHE"] = compile_cache
    try:
        llm = LLM(model=MODEL, **ENGINE_KW)
    finally:
        if old is None:
            os.environ.pop("JAXLLM_COMPILE_CACHE")
        else:
            os.environ["JAXLLM_COMPILE_CACHE"] = old
    assert llm.engine.kv.num_blocks == BLOCKS
    return llm


@pytest.fixture(autouse=True)
def _no_leaks(request):
    yield
    if "llm" in request.fixturenames:
        assert_clean(request.getfixturevalue("llm").engine)


def corpus(tok) -> list[int]:
    """A few thousand tokens of natural text (stdlib docstrings and code), deterministic."""
    import argparse
    import textwrap

    return tok.encode(inspect.getsource(textwrap) + inspect.getsource(argparse))


def greedy(max_tokens, **kw):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


CHATS = [[{"role": "user", "content": "What is the capital of France?"}],
         [{"role": "user", "content": "Write a short poem about the sea."}]]
PLAIN = ["The three primary colors are", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number."]


@contextlib.contextmanager
def _gguf_parsed_once():
    """transformers' GGUF load parses the file's metadata twice (config, then weights: a GGUFReader each,
    ~300k tokenizer fields) and builds gguf's tensor-name table ~400 times (once per module it walks):
    the load took 51.6 s without this block, 20.2 s with it (2 cores, load ~6; state dicts equal).
    Within this block both are built once per argument
    (the reader is read-only, a memmap; the table a pure function of arch and layer count): the same
    weights, the same model. Anything else passes through."""
    import gguf

    real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers = {}

    def reader(path, *args, **kw):
        if args or kw:
            return real_reader(path, *args, **kw)
        if path not in readers:
            readers[path] = real_reader(path)
        return readers[path]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(real_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_map


def hf_greedy_choices(prompts: list[list[int]], completions: list[list[int]]) -> list[list[int]]:
    """HF transformers' greedy token (fp32, from the same GGUF) at every position of our completions,
    teacher-forced: one forward of prompt + completion each, argmax at each completion position.
    `choices == completion` iff HF's own token-by-token greedy decoding (never stopping at EOS) starts
    with our completion: by induction, each of its steps sees the prefix ours did. (One forward per
    prompt instead of 32 cached steps; with the load above, 39.0 s -> 17.0 s for this reference.)"""
    import torch
    from transformers import AutoModelForCausalLM

    from checkpoints.loader import packaged_model_path

    path = packaged_model_path(MODEL)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # several torch threads on a busy 2-core machine are 30x slower
    with _gguf_parsed_once():
        model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                     dtype=torch.float32)
    model.eval()
    outs = []
    with torch.no_grad():
        for p, c in zip(prompts, completions):
            logits = model(torch.tensor([p + c[:-1]])).logits[0, len(p) - 1:]  # [len(c), V]
            outs.append(logits.argmax(-1).tolist())
    torch.set_num_threads(threads)
    return outs


def test_greedy_batch_equals_alone_and_transformers(llm):
    tok = llm.get_tokenizer()
    text = corpus(tok)
    rng = np.random.default_rng(0)
    hf_prompts = [tok.apply_chat_template(c) for c in CHATS] + [tok.encode(p) for p in PLAIN]
    lengths = [5, 7, 10, 14, 19, 25, 32, 40, 50, 62, 76, 92, 110, 135, 165, 200, 250, 320, 420, 600]
    lengths.sort(reverse=True)  # the longest run together: the cache must preempt
    prompts = hf_prompts + [text[o:o + n] for n, o in zip(lengths, rng.integers(0, len(text) - 600, 20))]
    assert len(prompts) == 24 and min(map(len, prompts)) == 5 and max(map(len, prompts)) == 600
    params = [greedy(32)] * 4 + [greedy(8)] * 20  # few decode steps: "alone" runs 24 requests one by one
    before = llm.engine.get_stats()["num_preemptions"]
    batch = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert llm.engine.get_stats()["num_preemptions"] > before, "the KV budget did not force preemption"
    assert_clean(llm.engine)
    # alone: a chat and a plain prompt (32 tokens), the two longest (preempted in the batch), a
    # middle one and the shortest; every prompt alone tripled this test's time for little coverage
    for i in (0, 2, 4, 5, 14, 23):
        a = llm.generate({"prompt_token_ids": prompts[i]}, params[i], use_tqdm=False)[0]
        b = batch[i]
        assert b.outputs[0].token_ids == a.outputs[0].token_ids, f"prompt {i} (len {len(prompts[i])})"
        assert b.outputs[0].text == a.outputs[0].text
    assert "Paris" in batch[0].outputs[0].text
    # HF transformers greedy, 32 tokens, chat and plain prompts (EOS ends ours: compare up to it)
    ref = hf_greedy_choices(hf_prompts, [list(b.outputs[0].token_ids) for b in batch[:4]])
    for i, (b, r) in enumerate(zip(batch[:4], ref)):
        got = b.outputs[0].token_ids
        assert list(got) == r, f"prompt {i}: {got} != HF's greedy choices {r}"
        if b.outputs[0].finish_reason == "stop":
            assert got[-1] in llm.engine.eos_token_ids
        else:
            assert len(got) == 32
    assert sum(len(b.outputs[0].token_ids) for b in batch[:4]) >= 64


def test_prefix_caching_on_and_off(llm):
    tok = llm.get_tokenizer()
    text = corpus(tok)
    prefix = text[:1000]
    suffixes = [tok.encode(s) for s in ("\n# Summary:", "\n# What does this do?", "\ndef main():",
                                        "\nclass Parser:")]
    prompts = [{"prompt_token_ids": prefix + s} for s in suffixes]
    params = greedy(8)
    first = llm.generate(prompts[0], params, use_tqdm=False)[0]  # fills the cache
    on = [first] + llm.generate(prompts[1:], params, use_tqdm=False)
    for o in on[1:]:
        assert o.num_cached_tokens >= 992, o.num_cached_tokens
    # caching off: a second engine on the same runner (prefix caching is host-side only). It recomputes
    # the whole prefix, so it runs one prompt: the second, which caching on served from the cache (the
    # first was a miss in both engines, the same computation)
    cfg = msgspec.structs.replace(llm.engine.config, enable_prefix_caching=False)
    off_engine = LLMEngine(cfg, llm.engine.runner, llm.engine.tokenizer)
    try:
        off = LLM(MODEL, engine=off_engine).generate(prompts[1:2], params, use_tqdm=False)
        assert_clean(off_engine)
    finally:
        assert llm.engine.reset_prefix_cache()  # the off engine overwrote cached blocks
    assert all(o.num_cached_tokens == 0 for o in off)
    assert [o.outputs[0].token_ids for o in on[1:2]] == [o.outputs[0].token_ids for o in off]
    assert len({tuple(o.outputs[0].token_ids) for o in on}) > 1, "the suffixes should change the output"


def test_seeded_sampling_alone_and_in_a_batch(llm):
    tok = llm.get_tokenizer()
    prompt = {"prompt_token_ids": tok.apply_chat_template(CHATS[1])}
    sp = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate(prompt, sp, use_tqdm=False)[0].outputs[0]
    text = corpus(tok)
    rng = np.random.default_rng(1)
    others = [{"prompt_token_ids": text[o:o + n]} for o, n in zip(rng.integers(0, 2000, 16), rng.integers(5, 40, 16))]
    other_params = [SamplingParams(temperature=float(t), seed=int(s), max_tokens=int(m), min_p=0.05)
                    for t, s, m in zip(rng.uniform(0.5, 1.2, 16), rng.integers(0, 2**31, 16), rng.integers(4, 16, 16))]
    outs = llm.generate(others[:8] + [prompt] + others[8:], other_params[:8] + [sp] + other_params[8:],
                        use_tqdm=False)
    inside = outs[8].outputs[0]
    assert inside.token_ids == alone.token_ids and inside.text == alone.text
    # the seed matters: other seeds give other texts
    other_seed = llm.generate(prompt, sp.clone(seed=1, max_tokens=8), use_tqdm=False)[0].outputs[0]
    assert other_seed.token_ids != alone.token_ids[:8]


BAD_PARAMS = [
    (dict(temperature=-0.5), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_k=-2), "top_k"),
    (dict(min_p=1.5), "min_p"), (dict(max_tokens=0), "max_tokens"), (dict(n=0), "n="),
    (dict(logprobs=21), "logprobs"), (dict(presence_penalty=3.0), "presence_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(min_tokens=5, max_tokens=2), "min_tokens"),
    (dict(stop_token_ids=[49152]), "stop_token_ids"), (dict(stop=[""]), "stop"),
]


def test_bad_input_is_rejected_and_the_engine_keeps_working(llm):
    engine = llm.engine
    vocab = engine.vocab_size
    good = {"prompt_token_ids": llm.get_tokenizer().encode("The three primary colors are")}
    want = llm.generate(good, greedy(8), use_tqdm=False)[0].outputs[0].token_ids
    bad_prompts = [
        ({"prompt_token_ids": [5] * MAX_LEN}, "max_model_len"),
        ({"prompt_token_ids": [5] * (MAX_LEN + 50)}, "max_model_len"),
        ({"prompt_token_ids": []}, "at least 1 token"),
        ("", "at least 1 token"),
        ({"prompt_token_ids": [1, 2, vocab]}, "vocab_size"),
        ({"prompt_token_ids": [1, -1, 2]}, "vocab_size"),
        ({"prompt_token_ids": [1, 2.5]}, "vocab_size"),
    ]
    steps = engine.num_steps
    for prompt, msg in bad_prompts:
        with pytest.raises(ValueError, match=msg):
            engine.add_request("bad", prompt, greedy(4))
        assert_clean(engine)
    for kw, field in BAD_PARAMS:
        with pytest.raises(ValueError, match=field):
            engine.add_request("bad", good, SamplingParams(**kw))
        assert_clean(engine)
    # all or nothing through LLM: one bad prompt among good ones submits none
    with pytest.raises(ValueError, match="vocab_size"):
        llm.generate([good, good, {"prompt_token_ids": [vocab + 7]}], greedy(4), use_tqdm=False)
    assert_clean(engine)
    assert engine.num_steps == steps, "something was scheduled for a rejected request"
    # prompt + max_tokens over max_model_len is accepted and clamped (finish_reason "length")
    long = {"prompt_token_ids": [5] * (MAX_LEN - 3)}
    out = llm.generate(long, greedy(50, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"
    assert llm.generate(good, greedy(8), use_tqdm=False)[0].outputs[0].token_ids == want


def test_cli_generate(compile_cache, llm):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAXLLM_COMPILE_CACHE=compile_cache)
    cmd = [sys.executable, "-m", "jaxllm.generate", "--model", MODEL, "--chat", "--prompt",
           "What is the capital of France?", "--max-tokens", "16", "--temperature", "0", "--no-progress",
           "--choice", "The capital of France is Paris.", "--choice", "London", "--choice", "Rome",
           "--max-model-len", str(MAX_LEN), "--max-num-seqs", str(MAX_SEQS),
           "--max-num-batched-tokens", str(BUDGET), "--kv-cache-memory-bytes", str(KV_BYTES)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Paris" in res.stdout, res.stdout + res.stderr[-2000:]
    assert "output tok/s" in res.stdout + res.stderr


# ----- structured outputs (strategies and checks: tests/e2e/structured_strategies.py) -------------
def _so_params(seed, **so):
    from jaxllm.structured_outputs import StructuredOutputsParams

    return SamplingParams(temperature=1.0, max_tokens=200, seed=seed, structured_outputs=StructuredOutputsParams(**so))


@SETTINGS
@given(schemas=st.lists(json_schemas(), min_size=MAX_SEQS, max_size=MAX_SEQS))
def test_json_schema_completions_parse_and_validate_at_temperature_1(llm, schemas):
    import json

    import jsonschema

    traces = llm.engine.runner.num_traces
    prompts = [f"A JSON object for the schema {json.dumps(s)}:\n" for s in schemas]
    outs = llm.generate(prompts, [_so_params(i, json=s) for i, s in enumerate(schemas)], use_tqdm=False)
    for s, o in zip(schemas, outs):
        c = o.outputs[0]
        assert c.finish_reason == "stop", (s, c.text)
        jsonschema.validate(json.loads(c.text), s)
    assert llm.engine.runner.num_traces == traces


@SETTINGS
@given(rx=st.lists(regexes(), min_size=3, max_size=3), ch=st.lists(choices(), min_size=3, max_size=3))
def test_regex_choice_and_lark_completions_hold_at_temperature_1(llm, rx, ch):
    import re

    params = ([_so_params(i, regex=r) for i, r in enumerate(rx)] + [_so_params(i, choice=c) for i, c in enumerate(ch)]
              + [_so_params(i, grammar=ARITHMETIC) for i in range(2)])
    prompts = [f"Text matching /{r}/: " for r in rx] + [f"One of {c}: " for c in ch] + ["12*(3+4)-5 = 79; 7+8*2 ="] * 2
    outs = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
    assert all(c.finish_reason == "stop" for c in outs), [(c.text, c.finish_reason) for c in outs]
    for r, c in zip(rx, outs[:3]):
        assert re.fullmatch(r, c.text), (r, c.text)
    for choice, c in zip(ch, outs[3:6]):
        assert c.text in choice, (choice, c.text)
    for c in outs[6:]:
        assert is_arithmetic(c.text), c.text


def test_structured_outputs_with_n_seeds_logprobs_stop_strings_and_free_neighbours(llm):
    """n > 1 and a seed: the same completions alone and in a batch; logprobs are the raw model's (the
    constrained token's logprob is reported even when it is far from the top); a stop string cuts a
    constrained completion; seeded free requests get the same tokens beside constrained ones."""
    free = [SamplingParams(temperature=1.0, max_tokens=12, seed=s) for s in (1, 2)]
    prompts = ["The three primary colors are", "Once upon a time"]
    alone_free = [o.outputs[0].token_ids for o in llm.generate(prompts, free, use_tqdm=False)]
    colors = SamplingParams(temperature=1.0, max_tokens=20, seed=9, n=3, logprobs=2,
                            structured_outputs=_so_params(0, choice=["red", "green", "blue", "zebra"]).structured_outputs)
    code = _so_params(3, regex=r"[a-z]{3,5}-[0-9]{3}")
    code = code.clone(stop=["-"])
    mixed = llm.generate(prompts + ["My favourite color is", "A product code: "], free + [colors, code],
                         use_tqdm=False)
    assert [o.outputs[0].token_ids for o in mixed[:2]] == alone_free
    again = llm.generate("My favourite color is", colors, use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in mixed[2].outputs]
    for c in mixed[2].outputs:
        assert c.text in ("red", "green", "blue", "zebra") and c.finish_reason == "stop"
        for t, lp in zip(c.token_ids, c.logprobs):
            assert t in lp and lp[t].logprob <= 0 and lp[t].rank >= 1
    stopped = mixed[3].outputs[0]
    assert stopped.finish_reason == "stop" and re.fullmatch(r"[a-z]{3,5}", stopped.text), stopped.text


def test_bad_words_on_the_real_vocabulary(llm):
    """bad_words on SmolLM2's BPE vocabulary: words the free run produced never appear, the run is the
    free one up to the first ban, and the logprob there is the raw model's. (The priority engine against
    fcfs under preemption runs on the tiny model's jitted runner: tests/runner/test_model_runner.py.)"""
    from jaxllm.engine.bad_words import tokenize_bad_words

    tok = llm.get_tokenizer()
    free = llm.generate(PLAIN, greedy(24, logprobs=20), use_tqdm=False)
    banned = []  # per prompt: (the free completion, its words to ban, their token sequences)
    for f in free:
        c = f.outputs[0]
        words = [w for w in re.findall(r"[A-Za-z]{4,}", c.text)][:3]
        assert words, c.text
        seqs = tokenize_bad_words(words, tok, llm.engine.vocab_size)
        out = list(c.token_ids)
        hits = [k for k in range(len(out)) for s in seqs if out[k:k + len(s)] == list(s)]
        assert hits, (words, seqs, out)
        banned.append((c, words, seqs))
    # both banned runs in one batch, as the free run was (greedy tokens do not depend on the batch)
    gots = llm.generate(PLAIN, [greedy(24, logprobs=20, bad_words=words) for _, words, _ in banned], use_tqdm=False)
    for (c, words, seqs), got in zip(banned, (o.outputs[0] for o in gots)):
        out = list(c.token_ids)
        g = list(got.token_ids)
        assert not any(g[k:k + len(s)] == list(s) for s in seqs for k in range(len(g))), (words, got.text)
        first = min(k + len(s) - 1 for k in range(len(out)) for s in seqs if out[k:k + len(s)] == list(s))
        assert g[:first] == out[:first] and g[first] != out[first]
        for k in range(first):
            assert abs(got.logprobs[k][g[k]].logprob - c.logprobs[k][out[k]].logprob) < 1e-4
        if g[first] in c.logprobs[first]:  # the free run's top 20 there holds the raw logprob
            assert abs(got.logprobs[first][g[first]].logprob - c.logprobs[first][g[first]].logprob) < 1e-4
