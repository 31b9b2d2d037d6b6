"""Chat templates with tools through the real SmolLM2 tokenizer (transformers' Jinja renderer),
served with ``--chat-template FILE`` (a Hermes-style template written here) over the fake
runner. The reference for each rendering is the template rendered by jinja2 directly from the
conversation as vLLM hands it over (tool call arguments as dicts), then tokenized; offline
``LLM.chat(tools=...)`` must render the same ids."""

from __future__ import annotations

import json

import httpx
import jinja2
import pytest

from http_helpers import ThreadedServer
from jaxllm import LLM
from jaxllm.config import EngineConfig
from jaxllm.engine.engine import LLMEngine
from serving.__main__ import build_parser, server_config
from tests.fakes.fake_runner import FakeRunner

HERMES_TEMPLATE = """\
{%- if tools %}<|im_start|>system
You may call functions. <tools>
{%- for tool in tools %}
{{ tool.function | tojson }}
{%- endfor %}
</tools>
{%- if greeting is defined %} {{ greeting }}{% endif %}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{%- for tc in message.tool_calls %}
<tool_call>
{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response id="{{ message.tool_call_id }}">{{ message.content }}</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}{% if not (loop.last and message.role == "assistant" and not add_generation_prompt) %}<|im_end|>
{% endif %}{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Forecast",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
]


def reference(messages, tools=None, add_generation_prompt=True, **kw) -> str:
    msgs = json.loads(json.dumps(messages))
    for m in msgs:
        if m.get("content") is None:
            m["content"] = ""
        for tc in m.get("tool_calls") or ():
            tc["function"]["arguments"] = json.loads(tc["function"]["arguments"])
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)  # transformers' settings
    env.filters["tojson"] = lambda x: json.dumps(x, ensure_ascii=False)
    return env.from_string(HERMES_TEMPLATE).render(messages=msgs, tools=tools,
                                                   add_generation_prompt=add_generation_prompt, **kw)


@pytest.fixture(scope="module")
def tok():
    from checkpoints import load_config, load_tokenizer

    mc, src = load_config("smollm2-135m")
    return load_tokenizer(src, mc)


@pytest.fixture(scope="module")
def engine(tok):
    config = EngineConfig(model="smollm2-135m", block_size=4, max_model_len=512, max_num_batched_tokens=64,
                          max_num_seqs=4)
    return LLMEngine(config, FakeRunner(256, 4, vocab_size=tok.vocab_size, eos_token_ids=tok.eos_token_ids), tok)


@pytest.fixture(scope="module")
def srv(engine, tmp_path_factory):
    path = tmp_path_factory.mktemp("tpl") / "hermes.jinja"
    path.write_text(HERMES_TEMPLATE)
    cfg = server_config(build_parser().parse_args(["--chat-template", str(path), "--trust-request-chat-template"]))
    s = ThreadedServer(engine, chat_template=cfg.chat_template,
                       trust_request_chat_template=cfg.trust_request_chat_template)
    yield s
    s.close()


def tokenize(s, **body) -> httpx.Response:
    return httpx.post(s.base_url + "/tokenize", json={"model": "smollm2-135m", **body}, timeout=30)


def test_tools_and_tool_history_render_through_the_flag_template(srv, tok):
    r = tokenize(srv, messages=HISTORY, tools=TOOLS)
    assert r.status_code == 200, r.text
    want = reference(HISTORY, TOOLS)
    assert r.json()["tokens"] == tok.encode(want, add_special_tokens=False)
    text = tok.decode(r.json()["tokens"], skip_special_tokens=False)
    assert '{"name": "get_weather", "description": "Forecast", "parameters"' in text  # the tool, rendered
    assert '"arguments": {"city": "Paris"}' in text  # arguments reached the template as a dict
    assert '<tool_response id="call_1">sunny</tool_response>' in text
    # without tools the template's tools block is absent
    plain = tok.decode(tokenize(srv, messages=HISTORY[:1]).json()["tokens"], skip_special_tokens=False)
    assert "<tools>" not in plain and plain == reference(HISTORY[:1])


def test_template_kwargs_continue_final_message_and_request_template(srv, tok):
    r = tokenize(srv, messages=HISTORY[:1], tools=TOOLS, chat_template_kwargs={"greeting": "Hello there"})
    assert r.json()["tokens"] == tok.encode(reference(HISTORY[:1], TOOLS, greeting="Hello there"), add_special_tokens=False)
    partial = HISTORY[:1] + [{"role": "assistant", "content": "It is"}]
    r = tokenize(srv, messages=partial, add_generation_prompt=False, continue_final_message=True)
    text = tok.decode(r.json()["tokens"], skip_special_tokens=False)
    assert text.endswith("<|im_start|>assistant\nIt is"), text
    r = tokenize(srv, messages=HISTORY[:1], chat_template="[{{ messages[0].content }}]")
    assert tok.decode(r.json()["tokens"]) == "[Weather in Paris?]"


@pytest.mark.parametrize("extra, message", [
    ({"continue_final_message": True}, "continue_final_message=True is invalid with add_generation_prompt=True"),
    ({"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs.tools is invalid"),
    ({"chat_template": "{{ raise_exception('nope') }}"}, "the chat template failed: nope"),
])
def test_bad_template_fields_are_400s(srv, extra, message):
    for path in ("/v1/chat/completions", "/tokenize"):
        r = httpx.post(srv.base_url + path, json={"model": "smollm2-135m", "messages": HISTORY[:1], **extra,
                                                  "max_tokens": 2} if path != "/tokenize" else
                       {"model": "smollm2-135m", "messages": HISTORY[:1], **extra}, timeout=30)
        assert r.status_code == 400, r.text
        assert message in r.json()["error"]["message"] and "\n" not in r.json()["error"]["message"]


def test_chat_completion_prompt_and_offline_llm_chat_render_the_same(srv, engine, tok, monkeypatch):
    import openai

    with openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0) as c:
        resp = c.chat.completions.create(model="smollm2-135m", messages=HISTORY, tools=TOOLS, tool_choice="none",
                                         max_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    want = tok.encode(reference(HISTORY, TOOLS), add_special_tokens=False)
    assert resp.usage.prompt_tokens == len(want)
    # LLM.chat's rendering, stopped before it steps the engine: the server's engine thread owns the
    # engine (a second thread stepping it races the server's own loop and health probes)
    llm = LLM("smollm2-135m", engine=engine)
    ran: list = []
    monkeypatch.setattr(llm, "_run", lambda prompts, *a, **k: ran.extend(prompts) or [])
    llm.chat(HISTORY, chat_template=HERMES_TEMPLATE, tools=TOOLS, chat_template_kwargs={"greeting": "hi"},
             use_tqdm=False)
    (prompt,) = ran
    assert prompt["prompt_token_ids"] == tok.encode(reference(HISTORY, TOOLS, greeting="hi"),
                                                    add_special_tokens=False)


RAG_TEMPLATE = """{%- if documents %}<docs>{% for d in documents %}[{{ d.title }}: {{ d.text }}]{% endfor %}</docs>
{% endif %}{%- if reasoning_effort is defined %}<effort {{ reasoning_effort }}>
{% endif %}{%- for m in messages %}{{ m.role }}: {{ m.content }}
{% endfor %}"""


def test_documents_and_reasoning_effort_reach_the_template(srv, tok):
    """vLLM's `documents` and `reasoning_effort` fields are template variables (a request's own
    chat_template_kwargs win); the reference renders the template with jinja2 directly."""
    docs = [{"title": "Paris", "text": "capital of France"}, {"title": "Lyon", "text": "on the Rhone"}]
    msgs = [{"role": "user", "content": "Where?"}]

    def ids(**body):
        r = tokenize(srv, messages=msgs, chat_template=RAG_TEMPLATE, add_generation_prompt=False, **body)
        assert r.status_code == 200, r.text
        return r.json()["tokens"]

    def want(**kw):
        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        return tok.encode(env.from_string(RAG_TEMPLATE).render(messages=msgs, **kw), add_special_tokens=False)

    assert ids(documents=docs, reasoning_effort="high") == want(documents=docs, reasoning_effort="high")
    assert ids() == want() != want(documents=docs)
    assert ids(reasoning_effort="low", chat_template_kwargs={"reasoning_effort": "max"}) == want(reasoning_effort="max")
    r = httpx.post(srv.base_url + "/v1/chat/completions", timeout=30, json={
        "model": "smollm2-135m", "messages": msgs, "chat_template": RAG_TEMPLATE, "add_generation_prompt": False,
        "documents": docs, "max_tokens": 1})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(want(documents=docs)), r.text
