"""``/v1/responses`` logprobs (``include: ["message.output_text.logprobs"]`` + ``top_logprobs``)
with the official ``openai`` client (no jax).

Reference: /v1/chat/completions with ``logprobs: true, top_logprobs: k`` for the same greedy
conversation on the same server (the real host engine over the fake runner: the next token and its
logprobs depend only on the context). The output_text part's logprobs must equal the chat
choice's ``logprobs.content`` entry for entry; the streamed ``response.output_text.delta`` events'
logprobs, concatenated, must equal the chat stream's (token, logprob, top token/logprob).
"""

from __future__ import annotations

import math

import openai
import pytest

from http_helpers import ThreadedServer, make_llm_engine
from test_http_reasoning import SCRIPTS, _engine as scripted_engine

INCLUDE = ["message.output_text.logprobs"]
ASK = "Capital of France?"


@pytest.fixture(scope="module")
def srv():
    s = ThreadedServer(make_llm_engine(max_model_len=512, num_blocks=512))
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(srv):
    with openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def _chat(c, k: int, stream: bool = False):
    return c.chat.completions.create(model="fake-llm", messages=[{"role": "user", "content": ASK}],
                                     max_tokens=12, temperature=0, logprobs=True, top_logprobs=k, stream=stream)


def _short(entries) -> list:
    """(token, logprob, [(top token, top logprob)]) of logprob entries (models or dicts)."""
    out = []
    for e in entries:
        e = e if isinstance(e, dict) else e.model_dump()
        out.append((e["token"], e["logprob"], [(t["token"], t["logprob"]) for t in e["top_logprobs"]]))
    return out


@pytest.mark.parametrize("k", [0, 3])
def test_output_text_logprobs_equal_the_chat_logprobs(client, k):
    resp = client.responses.create(model="fake-llm", input=ASK, max_output_tokens=12, temperature=0,
                                   include=INCLUDE, top_logprobs=k)
    chat = _chat(client, k)
    [msg] = resp.output
    part = msg.content[0]
    assert part.text == chat.choices[0].message.content
    want = [e.model_dump() for e in chat.choices[0].logprobs.content]
    assert [e.model_dump() for e in part.logprobs] == want
    assert len(part.logprobs) == resp.usage.output_tokens == chat.usage.completion_tokens == 12
    assert "".join(e.token for e in part.logprobs) == part.text
    for e in part.logprobs:
        assert len(e.top_logprobs) == k and e.logprob <= 0 and not math.isnan(e.logprob)
        assert bytes(e.bytes).decode() == e.token


def test_streamed_deltas_carry_the_chat_streams_logprobs(client):
    kw = dict(model="fake-llm", input=ASK, max_output_tokens=12, temperature=0, include=INCLUDE, top_logprobs=2)
    events = list(client.responses.create(stream=True, **kw))
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    got = _short([lp for e in deltas for lp in e.logprobs])
    chat = [lp for ch in _chat(client, 2, stream=True) if ch.choices and ch.choices[0].logprobs
            for lp in ch.choices[0].logprobs.content]
    assert got == _short(chat) and len(got) == 12
    # each delta's logprobs are its own tokens'; done and completed carry them all
    assert all("".join(lp.token for lp in e.logprobs) == e.delta for e in deltas)
    [done] = [e for e in events if e.type == "response.output_text.done"]
    assert _short(done.logprobs) == got
    completed = events[-1].response
    resp = client.responses.create(**kw)
    assert [e.model_dump() for e in completed.output[0].content[0].logprobs] == \
        [e.model_dump() for e in resp.output[0].content[0].logprobs]
    with client.responses.stream(**kw) as stream:
        for _ in stream:
            pass
        final = stream.get_final_response()
    assert _short(final.output[0].content[0].logprobs) == got


def test_no_include_no_logprobs(client):
    """vLLM's rule: top_logprobs alone asks for nothing; the parts say [] (OpenAI's shape)."""
    resp = client.responses.create(model="fake-llm", input=ASK, max_output_tokens=4, temperature=0, top_logprobs=3)
    assert resp.output[0].content[0].logprobs == []
    events = list(client.responses.create(model="fake-llm", input=ASK, max_output_tokens=4, temperature=0,
                                          stream=True))
    assert all(e.logprobs == [] for e in events if e.type == "response.output_text.delta")


def test_reasoning_and_eos_tokens_stream_as_they_answer():
    """Under --reasoning-parser the part holds every generated token's logprob (vLLM's
    non-streamed rule), the think block's and the EOS's too; the stream gives the same."""
    SCRIPTS["rsp-lp"] = ("<think>Two and two.</think>It is 4.", True)
    s = ThreadedServer(scripted_engine(), reasoning_parser="deepseek_r1")
    try:
        with openai.OpenAI(base_url=s.base_url + "/v1", api_key="unused", max_retries=0) as c:
            kw = dict(model="fake-llm", input="rsp-lp", max_output_tokens=100, temperature=0, include=INCLUDE,
                      top_logprobs=1)
            resp = c.responses.create(**kw)
            events = list(c.responses.create(stream=True, **kw))
            chat = c.chat.completions.create(model="fake-llm", messages=[{"role": "user", "content": "rsp-lp"}],
                                             max_tokens=100, temperature=0, logprobs=True, top_logprobs=1)
    finally:
        s.close()
    assert [i.type for i in resp.output] == ["reasoning", "message"]
    part = resp.output[1].content[0]
    assert part.text == "It is 4." and len(part.logprobs) == resp.usage.output_tokens
    assert [e.model_dump() for e in part.logprobs] == [e.model_dump() for e in chat.choices[0].logprobs.content]
    streamed = [lp for e in events if e.type == "response.output_text.delta" for lp in e.logprobs]
    assert _short(streamed) == _short(part.logprobs)
