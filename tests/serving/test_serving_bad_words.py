"""bad_words through the CLI flag, the HTTP body field and SamplingParams.bad_words over gRPC, into the
real LLMEngine over the fake runner (one token per character): the words the free run produced are
gone, the same as offline; a word over the token limit is one line naming bad_words."""
from __future__ import annotations

import grpc
import httpx
import pytest

from http_helpers import ThreadedServer, make_llm_engine
from jaxllm import generate
from jaxllm.cli_args import sampling_params_from_args
from jaxllm.engine.bad_words import tokenize_bad_words
from jaxllm.sampling_params import MAX_BAD_WORD_TOKENS, SamplingParams
from serving_helpers import collect, request, run, running_server
from tests.fakes.fake_tokenizer import FakeTokenizer

PROMPT = "Tell me a story"


def offline(params: SamplingParams) -> list[int]:
    eng = make_llm_engine()
    eng.add_request("x", PROMPT, params)
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                return list(out.outputs[0].token_ids)
    raise AssertionError("no output")


def words_and_expected():
    free = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    text = FakeTokenizer().decode(offline(free))
    words = [w for w in (text[2:4], text[9:12]) if w.strip() == w]
    assert words, text
    want = offline(free.clone(bad_words=words))
    seqs = tokenize_bad_words(words, FakeTokenizer(), FakeTokenizer.vocab_size)
    assert not any(want[k:k + len(s)] == list(s) for s in seqs for k in range(len(want)))
    assert want != offline(free)
    return words, want


def test_cli_flag():
    args = generate.build_parser().parse_args(["--bad-words", "foo", "--bad-words", " bar baz"])
    assert sampling_params_from_args(args).bad_words == ["foo", " bar baz"]
    assert sampling_params_from_args(generate.build_parser().parse_args([])).bad_words is None


def test_http_bad_words():
    words, want = words_and_expected()
    srv = ThreadedServer(make_llm_engine())
    try:
        with httpx.Client(base_url=srv.base_url, timeout=30) as h:
            body = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0, "ignore_eos": True, "bad_words": words}
            r = h.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == FakeTokenizer().decode(want)
            r = h.post("/v1/completions", json={**body, "bad_words": ["x" * (MAX_BAD_WORD_TOKENS + 1)]})
            assert r.status_code == 400 and r.json()["error"]["param"] == "bad_words", r.text
            assert r.json()["error"]["message"].startswith("bad_words word 'xxx")
            srv.wait_idle()
    finally:
        srv.close()


def test_grpc_bad_words():
    words, want = words_and_expected()

    async def main():
        async with running_server(make_llm_engine()) as c:
            req = request(prompt=PROMPT, max_tokens=24, temperature=0.0, ignore_eos=True)
            req.sampling.bad_words.extend(words)
            res = collect([r async for r in c.stub.Generate(req)])
            assert res["tokens"][0] == want
            bad = request(prompt=PROMPT, max_tokens=4)
            bad.sampling.bad_words.append("x" * (MAX_BAD_WORD_TOKENS + 1))
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                [r async for r in c.stub.Generate(bad)]
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert ei.value.details().startswith("bad_words word 'xxx")
            await c.wait_blocks_free()
    run(main())
