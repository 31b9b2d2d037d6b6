"""The official ``openai`` client (sync and async) against the HTTP API on loopback.

Behind the server: the real host engine (scheduler, KV cache manager, output processor) over the
fake runner/tokenizer. The reference is the offline ``LLM`` over a second engine built the same
way: the fake runner's tokens depend only on the context (and, sampled, on seed and position),
so greedy and seeded outputs, logprobs and stop-string cuts must match exactly; usage counts must
equal the token counts the offline engine produced.
"""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from http_helpers import ThreadedServer, make_llm_engine
from jaxllm import LLM, SamplingParams

PROMPTS = ["The three primary colors are", "Once upon a time", "def add(a, b):"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]


@pytest.fixture(scope="module")
def srv():
    s = ThreadedServer(make_llm_engine())
    yield s
    s.close()


@pytest.fixture(scope="module")
def llm():
    return LLM("fake-llm", engine=make_llm_engine())


@pytest.fixture(scope="module")
def client(srv):
    with openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def offline(llm, prompt, **kw):
    return llm.generate([prompt], SamplingParams(**kw), use_tqdm=False)[0]


def test_models_lists_the_served_model(client, srv):
    models = client.models.list().data
    assert [m.id for m in models] == ["fake-llm"]
    # vLLM's ModelCard fields: root (the --model value), parent, max_model_len, permission
    card = httpx.get(srv.base_url + "/v1/models").json()["data"][0]
    assert set(card) == {"id", "object", "created", "owned_by", "root", "parent", "max_model_len", "permission"}
    assert (card["object"], card["root"], card["parent"], card["max_model_len"]) == ("model", "fake-llm", None, 128)
    [perm] = card["permission"]
    assert perm["id"].startswith("modelperm-") and perm["object"] == "model_permission"
    assert perm["created"] == card["created"] and perm["organization"] == "*" and perm["group"] is None
    assert [k for k in perm if perm[k] is True] == ["allow_sampling", "allow_logprobs", "allow_view"]
    assert [k for k in perm if perm[k] is False] == ["allow_create_engine", "allow_search_indices",
                                                     "allow_fine_tuning", "is_blocking"]


def test_completions_greedy_equals_offline_with_usage(client, llm):
    resp = client.completions.create(model="fake-llm", prompt=PROMPTS, max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert [c.index for c in resp.choices] == [0, 1, 2]
    want = [offline(llm, p, max_tokens=12, temperature=0, ignore_eos=True) for p in PROMPTS]
    for c, w in zip(resp.choices, want):
        assert c.text == w.outputs[0].text and c.finish_reason == "length"
    assert resp.usage.prompt_tokens == sum(len(w.prompt_token_ids) for w in want)
    assert resp.usage.completion_tokens == sum(len(w.outputs[0].token_ids) for w in want) == 36
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_completions_token_id_prompt_and_stream_with_usage(client, llm):
    ids = llm.get_tokenizer().encode("token ids in")
    want = offline(llm, {"prompt_token_ids": ids}, max_tokens=10, temperature=0, ignore_eos=True)
    stream = client.completions.create(model="fake-llm", prompt=ids, max_tokens=10, temperature=0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == want.outputs[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == len(ids)


def test_stop_strings_cut_like_offline(client, llm):
    full = offline(llm, PROMPTS[1], max_tokens=16, temperature=0, ignore_eos=True).outputs[0].text
    stop = full[5:7]  # a string the model does produce
    want = offline(llm, PROMPTS[1], max_tokens=16, temperature=0, ignore_eos=True, stop=[stop]).outputs[0]
    assert want.finish_reason == "stop" and len(want.text) < len(full)
    resp = client.completions.create(model="fake-llm", prompt=PROMPTS[1], max_tokens=16, temperature=0,
                                     stop=[stop], extra_body={"ignore_eos": True})
    assert resp.choices[0].text == want.text and resp.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="fake-llm", prompt=PROMPTS[1], max_tokens=16, temperature=0, stop=[stop], stream=True,
        extra_body={"ignore_eos": True}))
    assert streamed == want.text  # text past the stop string was never sent


def test_n2_seeded_sampling_and_logprobs_equal_offline(client, llm):
    kw = dict(max_tokens=8, temperature=0.8, seed=7, n=2, ignore_eos=True, logprobs=2)
    want = offline(llm, PROMPTS[0], **kw).outputs
    resp = client.completions.create(model="fake-llm", prompt=PROMPTS[0], max_tokens=8, temperature=0.8,
                                     seed=7, n=2, logprobs=2, extra_body={"ignore_eos": True})
    assert [c.index for c in resp.choices] == [0, 1]
    assert resp.choices[0].text != resp.choices[1].text
    for c, w in zip(resp.choices, want):
        assert c.text == w.text
        assert c.logprobs.token_logprobs == pytest.approx([lp[t].logprob for t, lp in zip(w.token_ids, w.logprobs)])
        # vLLM's legacy top_logprobs: the sampled token and the top k (2 or 3 entries here)
        assert c.logprobs.top_logprobs == [pytest.approx(legacy_top(lp, t, 2)) for t, lp in zip(w.token_ids, w.logprobs)]
        assert "".join(c.logprobs.tokens) == c.text
    assert resp.usage.completion_tokens == 16


def legacy_top(entry, tid, k):
    """vLLM's legacy completions ``top_logprobs`` of one token from the offline entry: the
    sampled token plus the top k by rank (k = 0: the sampled token alone)."""
    return {lp.decoded_token: lp.logprob for t, lp in entry.items() if t == tid or lp.rank <= k}


def test_completions_logprobs_0_holds_the_sampled_token(client, llm):
    kw = dict(max_tokens=6, temperature=0.9, seed=11, ignore_eos=True)
    want = offline(llm, PROMPTS[2], logprobs=3, **kw).outputs[0]
    resp = client.completions.create(model="fake-llm", prompt=PROMPTS[2], logprobs=0, max_tokens=6,
                                     temperature=0.9, seed=11, extra_body={"ignore_eos": True})
    lp = resp.choices[0].logprobs
    assert resp.choices[0].text == want.text
    assert lp.top_logprobs == [pytest.approx({w[t].decoded_token: w[t].logprob}) for t, w in zip(want.token_ids, want.logprobs)]
    assert lp.top_logprobs == [{tok: own} for tok, own in zip(lp.tokens, lp.token_logprobs)]
    streamed = [top for ch in client.completions.create(
        model="fake-llm", prompt=PROMPTS[2], logprobs=0, max_tokens=6, temperature=0.9, seed=11, stream=True,
        extra_body={"ignore_eos": True}) for top in (ch.choices[0].logprobs.top_logprobs if ch.choices else [])]
    assert streamed == lp.top_logprobs


def test_chat_greedy_equals_offline_chat(client, llm):
    want = llm.chat(CHAT, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True), use_tqdm=False)[0]
    resp = client.chat.completions.create(model="fake-llm", messages=CHAT, max_completion_tokens=10,
                                          temperature=0, extra_body={"ignore_eos": True})
    msg = resp.choices[0].message
    assert msg.role == "assistant" and msg.content == want.outputs[0].text
    assert resp.usage.prompt_tokens == len(want.prompt_token_ids) and resp.usage.completion_tokens == 10
    chunks = list(client.chat.completions.create(model="fake-llm", messages=CHAT, max_tokens=10, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.outputs[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_logprobs_and_n2(client, llm):
    kw = dict(max_tokens=6, temperature=1.0, seed=3, n=2, ignore_eos=True, logprobs=3)
    want = llm.chat(CHAT, SamplingParams(**kw), use_tqdm=False)[0].outputs
    resp = client.chat.completions.create(model="fake-llm", messages=CHAT, max_tokens=6, temperature=1.0,
                                          seed=3, n=2, logprobs=True, top_logprobs=3,
                                          extra_body={"ignore_eos": True})
    assert len(resp.choices) == 2
    for c, w in zip(resp.choices, want):
        assert c.message.content == w.text
        got = [(e.token, e.logprob) for e in c.logprobs.content]
        assert [lp for _, lp in got] == pytest.approx([lp[t].logprob for t, lp in zip(w.token_ids, w.logprobs)])
        assert "".join(t for t, _ in got) == w.text
        assert all(len(e.top_logprobs) == 3 for e in c.logprobs.content)


def test_async_client_concurrent_streams_equal_offline(srv, llm):
    want = {p: offline(llm, p, max_tokens=12, temperature=0, ignore_eos=True).outputs[0].text for p in PROMPTS}

    async def main():
        async with openai.AsyncOpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0) as c:
            async def one(p):
                stream = await c.completions.create(model="fake-llm", prompt=p, max_tokens=12, temperature=0,
                                                    stream=True, extra_body={"ignore_eos": True})
                return "".join([ch.choices[0].text async for ch in stream])

            async def chat():
                r = await c.chat.completions.create(model="fake-llm", messages=CHAT, max_tokens=4)
                return r.usage.completion_tokens

            got = await asyncio.gather(*(one(p) for p in PROMPTS * 3), chat())
        return got

    got = asyncio.run(main())
    assert got[:-1] == [want[p] for p in PROMPTS * 3]
    assert got[-1] <= 4
    srv.wait_idle()


def test_tokenize_detokenize_roundtrip(srv, llm):
    import httpx

    tok = llm.get_tokenizer()
    with httpx.Client(base_url=srv.base_url) as h:
        r = h.post("/tokenize", json={"prompt": "Hello"}).json()
        assert r["tokens"] == tok.encode("Hello") and r["count"] == 5 and r["max_model_len"] == 128
        chat = h.post("/tokenize", json={"messages": CHAT}).json()
        assert chat["tokens"] == llm.get_tokenizer().chat_prompt(CHAT)["prompt_token_ids"]
        assert h.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": "Hello"}
        assert h.get("/health").status_code == 200
        # vLLM's return_token_strs: each token's vocabulary string (the fake's: its character; specials kept)
        assert r["token_strs"] is None
        strs = h.post("/tokenize", json={"prompt": "Hi!", "return_token_strs": True}).json()
        assert strs["tokens"] == tok.encode("Hi!") and strs["token_strs"] == ["H", "i", "!"]
        with_chat = h.post("/tokenize", json={"messages": CHAT, "return_token_strs": True}).json()
        assert with_chat["token_strs"] == [tok.decode([t], skip_special_tokens=False) for t in chat["tokens"]]
        assert "<sep>" in with_chat["token_strs"]  # special tokens keep their strings


def test_stream_two_prompts_n2_indices_and_texts(client, llm):
    kw = dict(max_tokens=6, temperature=0.7, seed=11, n=2, ignore_eos=True)
    want = [offline(llm, p, **kw).outputs for p in PROMPTS[:2]]
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    for ch in client.completions.create(model="fake-llm", prompt=PROMPTS[:2], max_tokens=6, temperature=0.7,
                                        seed=11, n=2, stream=True, extra_body={"ignore_eos": True}):
        for c in ch.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                assert c.index not in finish
                finish[c.index] = c.finish_reason
    assert texts == {k * 2 + i: want[k][i].text for k in range(2) for i in range(2)}
    assert finish == {i: "length" for i in range(4)}


def test_chat_message_carries_an_empty_tool_calls_list_as_vllm(client):
    """vLLM's ChatMessage has ``tool_calls`` default [] and the response is dumped whole: a message
    without a call says ``"tool_calls": []`` (with tools given or not); streamed deltas do not."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    for extra in ({}, {"tools": tools, "tool_choice": "none"}):
        raw = client.chat.completions.with_raw_response.create(
            model="fake-llm", messages=CHAT, max_tokens=4, temperature=0, extra_body={"ignore_eos": True}, **extra)
        msg = raw.http_response.json()["choices"][0]["message"]
        assert msg["tool_calls"] == [] and msg["role"] == "assistant" and len(msg["content"]) == 4, extra
        parsed = raw.parse().choices[0].message
        assert parsed.tool_calls == [] and parsed.content == msg["content"]
        chunks = list(client.chat.completions.create(model="fake-llm", messages=CHAT, max_tokens=4, temperature=0,
                                                     stream=True, extra_body={"ignore_eos": True}, **extra))
        assert all(c.choices[0].delta.tool_calls is None for c in chunks if c.choices)
        # the answer's message goes back into the conversation as the client holds it
        again = client.chat.completions.create(model="fake-llm", messages=CHAT + [parsed, {"role": "user", "content": "?"}],
                                               max_tokens=2, temperature=0, **extra)
        assert again.choices[0].message.tool_calls == []
