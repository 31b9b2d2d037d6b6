"""vLLM's server flags through a running HTTP door (serving/http_args.py, serving/chat_args.py): root
path, CORS, docs on/off, prompt-token details from the prefix cache, usage forced into streams, the
response role, the token-id default, request log lines, default chat template variables.

Behind the server: the real host engine over the fake runner/tokenizer (tests/serving/http_helpers.py).
References: the engine's own prefix-cache hit counter, Starlette's CORS rules as vLLM configures them
(any origin listed answers with that origin, others get no CORS header), the request's messages."""

from __future__ import annotations

import logging

import httpx
import pytest

from http_helpers import ThreadedServer, make_llm_engine, sse_events
from serving.config import ServerConfig
from serving.openai_protocol import ChatCompletionRequest
from serving.openai_tools import render_body
from tests.fakes.fake_tokenizer import OFFSET, FakeTokenizer

KEY = {"Authorization": "Bearer k"}
UI = "https://ui.example"
CHAT = [{"role": "user", "content": "Capital of France?"}]


@pytest.fixture(scope="module")
def srv():
    # probes every 30 s: none runs between a test's two reads of the prefix-cache counter
    s = ThreadedServer(make_llm_engine(max_model_len=256), root_path="/api", allowed_origins=(UI,), api_key="k",
                       fastapi_docs=False, enable_prompt_tokens_details=True, enable_force_include_usage=True,
                       response_role="bot", return_tokens_as_token_ids=True, enable_log_requests=True,
                       max_log_len=8, health_probe_interval=30.0)
    yield s
    s.close()


def post(srv, path: str, headers=KEY, **body) -> httpx.Response:
    return httpx.post(srv.base_url + path, json={"model": "fake-llm", **body}, headers=headers, timeout=30)


def test_root_path_serves_with_and_without_the_prefix(srv):
    for path in ("/api/v1/models", "/v1/models"):
        r = httpx.get(srv.base_url + path, headers=KEY)
        assert r.status_code == 200 and r.json()["data"][0]["id"] == "fake-llm", (path, r.text)
    # open paths stay open under the prefix; a key-guarded one under it still needs the key
    assert httpx.get(srv.base_url + "/api/health").status_code == 200
    assert httpx.get(srv.base_url + "/api/v1/models").status_code == 401


def test_load_and_tokenizer_info_without_their_flags(srv):
    """vLLM's defaults: /load is served without the key (answering 0: nothing is counted,
    test_http_names_keys_load.py checks what is); /tokenizer_info does not exist."""
    assert httpx.get(srv.base_url + "/api/load").json() == {"server_load": 0}
    assert httpx.get(srv.base_url + "/v1/models").status_code == 401  # the key is asked elsewhere
    assert httpx.get(srv.base_url + "/tokenizer_info", headers=KEY).status_code == 404


def test_cors_as_configured(srv):
    pre = httpx.options(srv.base_url + "/api/v1/chat/completions", headers={
        "Origin": UI, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"})
    assert pre.status_code == 200, pre.text  # the preflight is answered before the key check
    assert pre.headers["access-control-allow-origin"] == UI and "POST" in pre.headers["access-control-allow-methods"]
    r = httpx.get(srv.base_url + "/v1/models", headers={"Origin": UI})  # a refusal a page can read
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == UI
    other = httpx.get(srv.base_url + "/v1/models", headers={"Origin": "https://evil.example", **KEY})
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers
    bad = httpx.options(srv.base_url + "/v1/models", headers={"Origin": "https://evil.example",
                                                              "Access-Control-Request-Method": "GET"})
    assert bad.status_code == 400 and "access-control-allow-origin" not in bad.headers


def test_docs_off_and_on(srv):
    for path in ("/docs", "/redoc", "/openapi.json", "/api/openapi.json"):
        assert httpx.get(srv.base_url + path, headers=KEY).status_code == 404, path
    on = ThreadedServer(make_llm_engine(), root_path="/api")  # vLLM's default: docs served
    try:
        spec = httpx.get(on.base_url + "/openapi.json")
        assert spec.status_code == 200 and "/v1/chat/completions" in spec.json()["paths"]
        page = httpx.get(on.base_url + "/api/docs")
        assert page.status_code == 200 and "/api/openapi.json" in page.text  # linked through the proxy's prefix
    finally:
        on.close()


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_tokens_details_are_the_engines_prefix_cache_hits(srv, stream):
    prompt = f"{'stream' if stream else 'plain'}: a prompt long enough to fill several KV blocks"
    seen = []
    for _ in range(2):
        before = srv.wait_idle().prefix_cache_hits
        r = post(srv, "/v1/completions", prompt=prompt, max_tokens=3, temperature=0, stream=stream)
        # no stream_options: --enable-force-include-usage adds the usage chunk
        usage = sse_events(r)[-1]["usage"] if stream else r.json()["usage"]
        hits = srv.wait_idle().prefix_cache_hits - before
        assert usage["prompt_tokens_details"] == {"cached_tokens": hits}, (usage, hits)
        seen.append(hits)
    assert seen[0] == 0 and seen[1] >= 4 * ((len(prompt) - 1) // 4) - 4 > 0, seen  # block_size 4: whole blocks


def test_response_role_and_the_last_messages_role(srv):
    r = post(srv, "/v1/chat/completions", messages=CHAT, max_tokens=2, temperature=0).json()
    assert r["choices"][0]["message"]["role"] == "bot"
    chunks = sse_events(post(srv, "/v1/chat/completions", messages=CHAT, max_tokens=2, temperature=0, stream=True))
    assert chunks[0]["choices"][0]["delta"]["role"] == "bot"
    cont = post(srv, "/v1/chat/completions", messages=CHAT, max_tokens=2, temperature=0,
                add_generation_prompt=False).json()
    assert cont["choices"][0]["message"]["role"] == "user"  # vLLM: the answer continues the last message


def test_return_tokens_as_token_ids_is_the_servers_default(srv):
    def tokens(**kw):
        r = post(srv, "/v1/completions", prompt="Hi", max_tokens=3, temperature=0, logprobs=0, **kw).json()
        return r["choices"][0]["logprobs"]["tokens"], r["choices"][0]["text"]

    ids, text = tokens()
    assert ids == [f"token_id:{OFFSET + ord(c)}" for c in text]  # the fake tokenizer: one id per character
    assert tokens(return_tokens_as_token_ids=False)[0] == list(text)  # the request's own value wins


def test_enable_log_requests_clips_the_prompt(srv, caplog):
    with caplog.at_level(logging.INFO, logger="serving.frontdoor"):
        assert post(srv, "/v1/completions", prompt="0123456789abcdef", max_tokens=1,
                    request_id="logged-1").status_code == 200
        srv.wait_idle()
    lines = [r.getMessage() for r in caplog.records if "request cmpl-logged-1" in r.getMessage()]
    assert len(lines) == 1 and "prompt='01234567...'" in lines[0] and "max_tokens=1" in lines[0], lines


def test_default_chat_template_kwargs_under_the_requests_own():
    class Recording(FakeTokenizer):
        def chat_prompt(self, messages, add_generation_prompt=True, **kw):
            self.kw = kw
            return super().chat_prompt(messages, add_generation_prompt, **kw)

    tok = Recording()
    cfg = ServerConfig(default_chat_template_kwargs={"enable_thinking": False, "greeting": "hi"})
    render_body(tok, ChatCompletionRequest(messages=CHAT), cfg)
    assert tok.kw["chat_template_kwargs"] == {"enable_thinking": False, "greeting": "hi"}
    render_body(tok, ChatCompletionRequest(messages=CHAT, chat_template_kwargs={"enable_thinking": True},
                                           reasoning_effort="low"), cfg)
    assert tok.kw["chat_template_kwargs"] == {"enable_thinking": True, "greeting": "hi", "reasoning_effort": "low"}


def test_exclude_tools_when_tool_choice_none():
    class Recording(FakeTokenizer):
        def chat_prompt(self, messages, add_generation_prompt=True, **kw):
            self.kw = kw
            return super().chat_prompt(messages, add_generation_prompt, **kw)

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    tok = Recording()
    for exclude, choice, shown in ((False, "none", True), (True, "none", False), (True, None, True)):
        body = ChatCompletionRequest(messages=CHAT, tools=tools, **({"tool_choice": choice} if choice else {}))
        render_body(tok, body, ServerConfig(exclude_tools_when_tool_choice_none=exclude))
        assert ("tools" in tok.kw) == shown, (exclude, choice, tok.kw)
    from serving.openai_protocol import TokenizeRequest  # /tokenize: tools, no tool_choice

    render_body(tok, TokenizeRequest(messages=CHAT, tools=tools), ServerConfig(exclude_tools_when_tool_choice_none=True))
    assert "tools" in tok.kw
