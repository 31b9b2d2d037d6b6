"""/v1/completions ``echo`` and vLLM's ``prompt_logprobs`` through the official ``openai`` client.

Behind the server: the real host engine over the fake runner/tokenizer (whose prompt logprobs
are a deterministic function of the context). The references are independent of the HTTP
formatting: the offline ``LLM`` over a second engine built the same way
(``LLM.generate(..., prompt_logprobs=k)``, ``LLM.chat``), and the same server's ``echo=false``
answer for the generated part.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from http_helpers import ThreadedServer, make_llm_engine
from jaxllm import LLM, SamplingParams

PROMPTS = ["The three primary colors are", "Once upon a time"]
CHAT = [{"role": "user", "content": "Capital of France?"}]
MAX_LOGPROBS = 4  # the server's --max-logprobs


@pytest.fixture(scope="module")
def srv():
    s = ThreadedServer(make_llm_engine(), max_logprobs=MAX_LOGPROBS)
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


def complete(client, prompt, **kw):
    extra = {"ignore_eos": True, **kw.pop("extra_body", {})}
    return client.completions.create(model="fake-llm", prompt=prompt, temperature=0, extra_body=extra, **kw)


def vllm_prompt_logprobs(out, k):
    """What vLLM answers for RequestOutput.prompt_logprobs (None first, then per position the
    prompt token and the top k, keyed by the token id as a JSON string)."""
    want = []
    for tid, entry in zip(out.prompt_token_ids, out.prompt_logprobs):
        if entry is None:
            want.append(None)
            continue
        want.append({str(t): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": lp.decoded_token}
                     for t, lp in entry.items() if t == tid or lp.rank <= k})
    return want


def test_echo_text_is_prompt_plus_completion(client, llm):
    resp = complete(client, PROMPTS, max_tokens=6, echo=True)
    plain = complete(client, PROMPTS, max_tokens=6)
    for c, p, q in zip(resp.choices, PROMPTS, plain.choices):
        want = offline(llm, p, max_tokens=6, temperature=0, ignore_eos=True).outputs[0].text
        assert q.text == want and c.text == p + want
        assert c.finish_reason == "length" and c.logprobs is None
    assert resp.usage == plain.usage  # the echo is not counted as completion tokens
    # a token-id prompt echoes its decoded text, special tokens kept
    ids = [0] + llm.get_tokenizer().encode("ids in")
    resp = complete(client, ids, max_tokens=4, echo=True)
    want = offline(llm, {"prompt_token_ids": ids}, max_tokens=4, temperature=0, ignore_eos=True).outputs[0].text
    assert resp.choices[0].text == "<bos>ids in" + want


def test_echo_logprobs_cover_the_prompt_then_the_generated_tokens(client, llm):
    k, p = 2, PROMPTS[0]
    ref = offline(llm, p, max_tokens=5, temperature=0, ignore_eos=True, logprobs=k, prompt_logprobs=k)
    resp = complete(client, p, max_tokens=5, echo=True, logprobs=k)
    plain = complete(client, p, max_tokens=5, logprobs=k).choices[0].logprobs
    lp = resp.choices[0].logprobs
    n_prompt = len(ref.prompt_token_ids)
    assert len(lp.tokens) == n_prompt + 5
    # prompt part: the offline engine's prompt logprobs; the first token has none
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    tok = llm.get_tokenizer()
    assert lp.tokens[:n_prompt] == [tok.decode([t], skip_special_tokens=False) for t in ref.prompt_token_ids]
    assert "".join(lp.tokens[:n_prompt]) == p
    for i in range(1, n_prompt):
        entry = ref.prompt_logprobs[i]
        assert lp.token_logprobs[i] == pytest.approx(entry[ref.prompt_token_ids[i]].logprob)
        tid = ref.prompt_token_ids[i]  # vLLM's rule: the prompt token and the top k
        best = [x for t, x in entry.items() if t == tid or x.rank <= k]
        assert lp.top_logprobs[i] == pytest.approx({x.decoded_token: x.logprob for x in best})
    # generated part: the echo=false answer, offsets shifted by the prompt's text
    assert lp.tokens[n_prompt:] == plain.tokens
    assert lp.token_logprobs[n_prompt:] == plain.token_logprobs
    assert lp.top_logprobs[n_prompt:] == plain.top_logprobs
    assert lp.text_offset[n_prompt:] == [len(p) + o for o in plain.text_offset]
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert "".join(lp.tokens) == resp.choices[0].text
    # vLLM also answers the prompt logprobs list on the choice (k = logprobs)
    assert resp.choices[0].prompt_logprobs == vllm_prompt_logprobs(ref, k)


def test_echo_stream_concatenates_to_the_non_streamed_answer(client):
    kw = dict(max_tokens=7, echo=True, logprobs=1, n=2, temperature=0.9, seed=5,
              extra_body={"ignore_eos": True})
    whole = client.completions.create(model="fake-llm", prompt=PROMPTS, **kw)
    chunks = list(client.completions.create(model="fake-llm", prompt=PROMPTS, stream=True,
                                            stream_options={"include_usage": True}, **kw))
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    got: dict[int, dict] = {}
    for ch in chunks[:-1]:
        for c in ch.choices:
            g = got.setdefault(c.index, {"text": "", "tokens": [], "lps": [], "offsets": [], "first": c.text})
            g["text"] += c.text
            g["tokens"] += c.logprobs.tokens
            g["lps"] += c.logprobs.token_logprobs
            g["offsets"] += c.logprobs.text_offset
    assert sorted(got) == [0, 1, 2, 3]
    for c in whole.choices:
        g = got[c.index]
        assert g["first"].startswith(PROMPTS[c.index // 2])  # the prompt comes in the first chunk
        assert g["text"] == c.text and c.text.startswith(PROMPTS[c.index // 2])
        assert g["tokens"] == c.logprobs.tokens and g["lps"] == c.logprobs.token_logprobs
        assert g["offsets"] == c.logprobs.text_offset
    assert whole.choices[0].text != whole.choices[1].text  # two samples, not one twice


def test_echo_with_max_tokens_zero_scores_the_prompt(client, llm):
    p = PROMPTS[1]
    ref = offline(llm, p, max_tokens=1, temperature=0, prompt_logprobs=1)
    resp = complete(client, p, max_tokens=0, echo=True, logprobs=1)
    c = resp.choices[0]
    assert c.text == p and c.finish_reason == "length"
    assert c.logprobs.token_logprobs == [None] + [e[t].logprob for t, e in
                                                  zip(ref.prompt_token_ids[1:], ref.prompt_logprobs[1:])]
    assert "".join(c.logprobs.tokens) == p  # the generated token is dropped
    assert resp.usage.completion_tokens == 0 and resp.usage.prompt_tokens == len(ref.prompt_token_ids)
    chunks = list(client.completions.create(model="fake-llm", prompt=p, max_tokens=0, echo=True, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == p
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 0


def test_prompt_logprobs_on_completion_choices(client, llm):
    ref = offline(llm, PROMPTS[0], max_tokens=3, temperature=0, ignore_eos=True, prompt_logprobs=3)
    resp = complete(client, PROMPTS[0], max_tokens=3, n=2, extra_body={"prompt_logprobs": 3})
    want = vllm_prompt_logprobs(ref, 3)
    assert want[0] is None and all(len(e) in (3, 4) for e in want[1:])
    for c in resp.choices:
        assert c.prompt_logprobs == want
        assert c.text == ref.outputs[0].text and c.logprobs is None
    plain = complete(client, PROMPTS[0], max_tokens=3)
    assert plain.choices[0].prompt_logprobs is None


def test_prompt_logprobs_on_the_chat_response(client, llm):
    ref = llm.chat(CHAT, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, prompt_logprobs=2),
                   use_tqdm=False)[0]
    resp = client.chat.completions.create(model="fake-llm", messages=CHAT, max_tokens=4, temperature=0,
                                          extra_body={"ignore_eos": True, "prompt_logprobs": 2})
    assert resp.prompt_logprobs == vllm_prompt_logprobs(ref, 2)  # response level, as vLLM
    assert "prompt_logprobs" not in resp.choices[0].model_dump()
    assert resp.choices[0].message.content == ref.outputs[0].text


LIMITS = [
    ("/v1/completions", {"prompt": "x", "extra": {"prompt_logprobs": 5}}, "prompt_logprobs",
     ["prompt_logprobs=5", f"--max-logprobs={MAX_LOGPROBS}"]),
    ("/v1/completions", {"prompt": "x", "extra": {"prompt_logprobs": 21}}, "prompt_logprobs",
     ["prompt_logprobs=21", "[0, 20]"]),
    ("/v1/completions", {"prompt": "x", "echo": True, "logprobs": 5}, "logprobs",
     ["logprobs=5", f"--max-logprobs={MAX_LOGPROBS}"]),
    ("/v1/completions", {"prompt": "x", "echo": True, "logprobs": 1, "extra": {"prompt_logprobs": -1}},
     "prompt_logprobs", ["prompt_logprobs=-1", "[0, 20]"]),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens", ["max_tokens=0", "echo=true"]),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0, "echo": True, "extra": {"min_tokens": 2}},
     "min_tokens", ["min_tokens=2", "max_tokens=0"]),
    ("/v1/completions", {"prompt": "x", "stream": True, "extra": {"prompt_logprobs": 1}}, "prompt_logprobs",
     ["prompt_logprobs=1", "stream=true"]),
    ("/v1/chat/completions", {"messages": CHAT, "extra": {"prompt_logprobs": 5}}, "prompt_logprobs",
     ["prompt_logprobs=5", f"--max-logprobs={MAX_LOGPROBS}"]),
    ("/v1/chat/completions", {"messages": CHAT, "stream": True, "extra": {"prompt_logprobs": 2}},
     "prompt_logprobs", ["prompt_logprobs=2", "stream=true"]),
]


@pytest.mark.parametrize("path,body,param,words", LIMITS)
def test_limits_are_400_naming_the_field(srv, path, body, param, words):
    body = dict(body)
    body.update(body.pop("extra", {}))
    r = httpx.post(srv.base_url + path, json=body, timeout=10)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    for w in words:
        assert w in err["message"], (w, err["message"])
    srv.wait_idle()


def test_chat_echo_prepends_the_last_assistant_message(client, llm):
    conv = CHAT + [{"role": "assistant", "content": "The capital is"}]
    ref = llm.chat(conv, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=1),
                   use_tqdm=False)[0].outputs[0]
    kw = dict(model="fake-llm", messages=conv, max_tokens=5, temperature=0, logprobs=True, top_logprobs=1)
    resp = client.chat.completions.create(extra_body={"ignore_eos": True, "echo": True}, **kw)
    msg = resp.choices[0].message
    assert msg.role == "assistant" and msg.content == "The capital is" + ref.text
    # logprobs cover the generated tokens only (vLLM)
    assert "".join(e.token for e in resp.choices[0].logprobs.content) == ref.text
    assert resp.usage.completion_tokens == 5
    chunks = list(client.chat.completions.create(stream=True, extra_body={"ignore_eos": True, "echo": True}, **kw))
    assert chunks[0].choices[0].delta.content.startswith("The capital is")
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == msg.content
    # the last message is the user's: nothing to echo
    plain = llm.chat(CHAT, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), use_tqdm=False)[0]
    resp = client.chat.completions.create(model="fake-llm", messages=CHAT, max_tokens=5, temperature=0,
                                          extra_body={"ignore_eos": True, "echo": True})
    assert resp.choices[0].message.content == plain.outputs[0].text


def test_prompt_logprobs_json_clamps_and_trims():
    from jaxllm.outputs import Logprob, RequestOutput
    from serving.openai_echo import prompt_logprobs_json

    out = RequestOutput(request_id="r", prompt="ab", prompt_token_ids=[5, 6, 7], outputs=[], finished=True,
                        prompt_logprobs=[None,
                                         {6: Logprob(float("-inf"), 9, "b"), 8: Logprob(-0.1, 1, "x"),
                                          9: Logprob(-0.2, 2, "y")},
                                         {7: Logprob(-0.5, 1, None), 3: Logprob(-1.5, 2, "z")}])
    got = prompt_logprobs_json(out, 1, lambda t, lp: lp.decoded_token or f"<{t}>")
    assert got == [None,
                   {"6": {"logprob": -9999.0, "rank": 9, "decoded_token": "b"},  # -inf is not JSON: vLLM's clamp
                    "8": {"logprob": -0.1, "rank": 1, "decoded_token": "x"}},  # rank 2 is past k=1
                   {"7": {"logprob": -0.5, "rank": 1, "decoded_token": "<7>"}}]


def test_chat_echo_role_follows_add_generation_prompt():
    """vLLM's rule: the echoed role is the answer's (assistant) with the generation prompt, else the
    last message's own role; a user message is echoed only in the second case."""
    from types import SimpleNamespace

    from serving.openai_echo import chat_echo
    from serving.openai_protocol import ChatCompletionRequest

    user_last = [{"role": "user", "content": "Hi there"}]
    body = ChatCompletionRequest(messages=user_last, echo=True)
    assert chat_echo(body) is None
    body = ChatCompletionRequest(messages=user_last, echo=True, add_generation_prompt=False)
    echo = chat_echo(body)
    assert echo is not None and echo.texts == ["Hi there"]
    assert chat_echo(SimpleNamespace(echo=False, messages=body.messages)) is None
