"""vLLM's ``return_token_ids`` and per-choice ``continuous_usage_stats`` through the HTTP door
(serving/openai_choices.py). Behind the server: the real host engine over the fake runner/tokenizer
(one token per ASCII character, no BOS). References: the offline ``LLM`` over a second engine built
the same way (the fake runner's tokens depend only on the context, seeds on (seed, sample index)), the
non-streamed answer for the stream, and each choice's own logprob rows for its running usage.
"""

from __future__ import annotations

import time

import httpx
import pytest

from http_helpers import ThreadedServer, make_llm_engine, sse_events
from jaxllm import LLM, SamplingParams

PROMPTS = ["The three primary colors are", "Name a prime:"]
CHAT = [{"role": "user", "content": "Capital of France?"}]


@pytest.fixture(scope="module")
def srv():
    s = ThreadedServer(make_llm_engine(max_model_len=256))
    yield s
    s.close()


@pytest.fixture(scope="module")
def llm():
    return LLM("fake-llm", engine=make_llm_engine(max_model_len=256))


def post(srv, path: str, **body) -> httpx.Response:
    r = httpx.post(srv.base_url + path, json={"model": "fake-llm", **body}, timeout=30)
    assert r.status_code == 200, r.text
    return r


def streamed_ids(chunks: list[dict]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for c in chunks:
        for ch in c["choices"]:
            out.setdefault(ch["index"], []).extend(ch["token_ids"])
    return out


def test_completions_token_ids_equal_the_offline_engines(srv, llm):
    sp = dict(max_tokens=7, temperature=0.8, seed=11, n=2)
    refs = llm.generate(PROMPTS, SamplingParams(**sp), use_tqdm=False)
    body = dict(prompt=PROMPTS, return_token_ids=True, **sp)
    whole = post(srv, "/v1/completions", **body).json()
    assert [c["index"] for c in whole["choices"]] == [0, 1, 2, 3]
    for c in whole["choices"]:  # vLLM: both on each choice
        ref = refs[c["index"] // 2]
        assert c["prompt_token_ids"] == list(ref.prompt_token_ids)
        assert c["token_ids"] == list(ref.outputs[c["index"] % 2].token_ids)
    assert whole["usage"]["completion_tokens"] == sum(len(c["token_ids"]) for c in whole["choices"])
    chunks = sse_events(post(srv, "/v1/completions", stream=True, **body))
    assert streamed_ids(chunks) == {c["index"]: c["token_ids"] for c in whole["choices"]}
    first: dict[int, list] = {}
    for c in chunks:
        for ch in c["choices"]:
            if ch["index"] not in first:  # a choice's first chunk carries its prompt's ids, later ones null
                first[ch["index"]] = ch["prompt_token_ids"]
            else:
                assert ch["prompt_token_ids"] is None
    assert first == {c["index"]: c["prompt_token_ids"] for c in whole["choices"]}


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_unset_the_keys_are_null_where_vllm_writes_them(srv, path):
    """vLLM without return_token_ids: its non-streamed bodies are whole model_dumps (every choice's
    ``token_ids``, a completion choice's ``prompt_token_ids``, chat's response ``prompt_token_ids``: null);
    its chunks set both on every completion choice and ``token_ids`` on every chat choice, and chat's
    ``prompt_token_ids`` on the chunk of a choice's first delta. The openai client parses them as None."""
    body = dict(max_tokens=3, n=2, temperature=0.5, seed=1)
    body.update(messages=CHAT) if "chat" in path else body.update(prompt=PROMPTS[0])
    whole = post(srv, path, **body).json()
    want = ["token_ids"] + (["prompt_token_ids"] if "chat" not in path else [])
    assert all(ch[k] is None for ch in whole["choices"] for k in want) and len(whole["choices"]) == 2
    assert ("chat" not in path) == ("prompt_token_ids" not in whole)  # chat: on the response
    assert whole.get("prompt_token_ids", None) is None
    chunks = sse_events(post(srv, path, stream=True, **body))
    assert all(ch[k] is None for c in chunks for ch in c["choices"] for k in want)
    if "chat" in path:
        firsts = [c for c in chunks if any(ch["delta"].get("role") for ch in c["choices"])]
        assert firsts and all(c["prompt_token_ids"] is None for c in firsts)
        assert all("prompt_token_ids" not in c for c in chunks if c not in firsts)
    import openai

    client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x")
    parsed = (client.chat.completions.create(model="fake-llm", messages=CHAT, max_tokens=3) if "chat" in path
              else client.completions.create(model="fake-llm", prompt=PROMPTS[0], max_tokens=3))
    assert parsed.choices[0].model_extra["token_ids"] is None


def test_completions_echo_with_token_ids_returns_the_prompt_as_ids(srv, llm):
    """vLLM: with return_token_ids, echo's prompt comes back as prompt_token_ids and the text is the
    completion alone; echo's logprob rows for the prompt stay."""
    ref = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)[0]
    r = post(srv, "/v1/completions", prompt=PROMPTS[0], max_tokens=4, temperature=0, echo=True, logprobs=0,
             return_token_ids=True).json()["choices"][0]
    assert r["text"] == ref.outputs[0].text and r["token_ids"] == list(ref.outputs[0].token_ids)
    assert r["prompt_token_ids"] == list(ref.prompt_token_ids)
    assert len(r["logprobs"]["tokens"]) == len(ref.prompt_token_ids) + 4
    scored = post(srv, "/v1/completions", prompt=PROMPTS[0], max_tokens=0, echo=True,
                  return_token_ids=True).json()["choices"][0]  # max_tokens=0: the prompt alone
    assert (scored["text"], scored["token_ids"], scored["prompt_token_ids"]) == ("", [], list(ref.prompt_token_ids))
    chunks = sse_events(post(srv, "/v1/completions", prompt=PROMPTS[0], max_tokens=4, temperature=0, echo=True,
                         stream=True, return_token_ids=True))
    assert "".join(c["choices"][0]["text"] for c in chunks) == ref.outputs[0].text
    assert streamed_ids(chunks) == {0: list(ref.outputs[0].token_ids)}


def test_chat_token_ids_on_the_response_and_the_choices(srv, llm):
    sp = dict(max_tokens=6, temperature=0.7, seed=3, n=2)
    ref = llm.chat(CHAT, SamplingParams(**sp), use_tqdm=False)[0]
    body = dict(messages=CHAT, return_token_ids=True, **sp)
    whole = post(srv, "/v1/chat/completions", **body).json()
    assert whole["prompt_token_ids"] == list(ref.prompt_token_ids)  # vLLM: on the response
    assert [c["token_ids"] for c in whole["choices"]] == [list(o.token_ids) for o in ref.outputs]
    chunks = sse_events(post(srv, "/v1/chat/completions", stream=True, **body))
    assert streamed_ids(chunks) == {c["index"]: c["token_ids"] for c in whole["choices"]}
    with_ids = [c for c in chunks if "prompt_token_ids" in c]  # the chunks of each choice's first delta
    assert with_ids and all(c["prompt_token_ids"] == whole["prompt_token_ids"] for c in with_ids)
    assert {ch["index"] for c in with_ids for ch in c["choices"]} == {0, 1}
    assert all(ch["delta"].get("role") == "assistant" for c in with_ids for ch in c["choices"])
    text = "".join(ch["delta"].get("content", "") for c in chunks for ch in c["choices"] if ch["index"] == 1)
    assert text == whole["choices"][1]["message"]["content"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_continuous_usage_with_n2_counts_each_chunks_own_choice(srv, path):
    """vLLM: with n > 1 each chunk carries one choice and its usage counts that choice's tokens so far
    (plus its prompt's); the last usage chunk sums them all, as the non-streamed answer."""
    chat = "chat" in path
    body = dict(max_tokens=8, temperature=0.9, seed=5, n=2, logprobs=True if chat else 0)
    body.update(messages=CHAT) if chat else body.update(prompt=PROMPTS[1])
    whole = post(srv, path, **body).json()["usage"]
    chunks = sse_events(post(srv, path, stream=True, stream_options={"include_usage": True,
                                                                  "continuous_usage_stats": True}, **body))
    seen = {0: 0, 1: 0}
    for c in chunks[:-1]:
        [choice] = c["choices"]  # one choice per chunk
        lp = choice["logprobs"]
        seen[choice["index"]] += len(lp["content"] if chat else lp["tokens"])  # this chunk's tokens
        p = whole["prompt_tokens"]
        assert c["usage"] == {"prompt_tokens": p, "completion_tokens": seen[choice["index"]],
                              "total_tokens": p + seen[choice["index"]]}
    assert seen == {0: 8, 1: 8}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole and whole["completion_tokens"] == 16


def test_held_back_deltas_still_send_their_token_ids():
    """A hermes tool call behind a deepseek_r1 think block: the reader holds text back, yet every id is
    streamed (an empty delta carries them, as vLLM); reference: the scripted ids then EOS. With
    include_reasoning=false the ids are null (they would show the hidden reasoning)."""
    from test_http_reasoning import SCRIPTS, TOK, _engine
    from test_http_tools import HERMES, TOOLS

    from tests.fakes.fake_tokenizer import EOS

    text = "<think>check the weather</think>" + HERMES
    SCRIPTS["token ids?"] = (text, True)
    want = TOK.encode(text, add_special_tokens=False) + [EOS]
    engine = _engine()
    scripted = engine.runner.next_token_fn

    def paced(ctx, seq):  # a token every few ms: the stream reader sees them one by one, not coalesced
        time.sleep(0.004)
        return scripted(ctx, seq)

    engine.runner.next_token_fn = paced
    s = ThreadedServer(engine, reasoning_parser="deepseek_r1", enable_auto_tool_choice=True,
                       tool_call_parser="hermes")
    try:
        body = dict(messages=[{"role": "user", "content": "token ids?"}], tools=TOOLS, max_tokens=200,
                    return_token_ids=True)
        whole = post(s, "/v1/chat/completions", **body).json()
        [choice] = whole["choices"]
        assert choice["finish_reason"] == "tool_calls" and choice["token_ids"] == want
        chunks = sse_events(post(s, "/v1/chat/completions", stream=True, **body))
        assert streamed_ids(chunks) == {0: want}
        assert any(ch["delta"] == {} and ch["token_ids"] for c in chunks for ch in c["choices"])
        hidden = post(s, "/v1/chat/completions", include_reasoning=False, **body).json()
        assert hidden["choices"][0]["token_ids"] is None and hidden["prompt_token_ids"] == whole["prompt_token_ids"]
    finally:
        s.close()
        SCRIPTS.pop("token ids?", None)


def test_beam_search_choices_carry_their_beams_ids(srv):
    """use_beam_search: each beam's token_ids are the ids of its text (the fake tokenizer's one character
    per id; an <eos> that ends a beam is in its ids, not its text), its prompt_token_ids the prompt's."""
    from tests.fakes.fake_tokenizer import EOS, FakeTokenizer

    r = post(srv, "/v1/completions", prompt=PROMPTS[0], max_tokens=4, n=2, use_beam_search=True,
             return_token_ids=True).json()
    assert len(r["choices"]) == 2
    for c in r["choices"]:
        ids = c["token_ids"]
        assert EOS not in ids[:-1] and FakeTokenizer().decode(ids) == c["text"]
        assert len(c["text"]) == len(ids) - (ids[-1:] == [EOS])
        assert c["prompt_token_ids"] == FakeTokenizer().encode(PROMPTS[0])
