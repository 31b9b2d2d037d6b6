"""Tool calling on /v1/chat/completions with the official ``openai`` client (no jax).

Behind the server: the real host engine with structured outputs (llguidance over the fake byte
tokenizer) and the fake runner, so outputs are deterministic. References, independent of
serving/openai_tools.py: ``jsonschema`` for every call's arguments against its tool's schema;
for "required", the raw text of the same request answered plain (tool_choice "none", the array
schema written here as vLLM documents it) parsed with ``json``; for "auto", the hermes parser's
``extract`` of text the request forced with a regex; and the openai client's own stream
accumulation (``chat.completions.stream``) against the non-streamed answer.
"""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest

from http_helpers import ThreadedServer, make_llm_engine
from serving.tool_parsers import get_parser
from tests.fakes.grammar_tokenizers import fake_grammar_tokenizer

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "pattern": "^[A-Z]{3}$"}},
        "required": ["zone"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather forecast",
                                           "parameters": WEATHER, "strict": True}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME, "strict": True}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
MSGS = [{"role": "user", "content": "Weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def _engine():
    return make_llm_engine(max_model_len=512, num_blocks=512, grammar_tokenizer=fake_grammar_tokenizer)


@pytest.fixture(scope="module")
def srv():
    s = ThreadedServer(_engine())
    yield s
    s.close()


@pytest.fixture(scope="module")
def auto_srv():
    s = ThreadedServer(_engine(), enable_auto_tool_choice=True, tool_call_parser="hermes")
    yield s
    s.close()


def _client(s):
    return openai.OpenAI(base_url=s.base_url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def client(srv):
    with _client(srv) as c:
        yield c


def calls_of(message) -> list[tuple[str, str]]:
    return [(t.function.name, t.function.arguments) for t in message.tool_calls or ()]


def streamed(c, **kw):
    """The openai client's accumulation of the streamed answer."""
    with c.chat.completions.stream(model="fake-llm", messages=MSGS, **kw) as stream:
        for _ in stream:
            pass
        return stream.get_final_completion()


def test_named_tool_choice_answers_one_call_matching_the_schema_streamed_the_same(client):
    kw = dict(tools=TOOLS, tool_choice=NAMED, max_tokens=200, temperature=0)
    resp = client.chat.completions.create(model="fake-llm", messages=MSGS, **kw)
    ch = resp.choices[0]
    assert ch.message.content == "" and ch.finish_reason == "stop"
    [(name, args)] = calls_of(ch.message)
    assert name == "get_weather"
    jsonschema.validate(json.loads(args), WEATHER)
    tc = ch.message.tool_calls[0]
    assert tc.type == "function" and re.fullmatch(r"chatcmpl-tool-[0-9a-f]{32}", tc.id)
    # the raw text is the arguments: the same request answered plain under the same schema
    plain = client.chat.completions.create(model="fake-llm", messages=MSGS, tools=TOOLS, tool_choice="none",
                                           max_tokens=200, temperature=0,
                                           response_format={"type": "json_schema",
                                                            "json_schema": {"name": "w", "schema": WEATHER}})
    assert plain.choices[0].message.content == args and plain.choices[0].message.tool_calls == []
    final = streamed(client, **kw)
    fc = final.choices[0]
    assert calls_of(fc.message) == [(name, args)] and fc.finish_reason == "stop"
    assert fc.message.content == "" and fc.message.tool_calls[0].id.startswith("chatcmpl-tool-")
    assert resp.usage.completion_tokens == len(args) + 1  # one byte per token, then EOS


def required_schema(tools, parallel=True) -> dict:
    """vLLM's documented schema for tool_choice "required", written independently of the server's."""
    s = {"type": "array", "minItems": 1,
         "items": {"anyOf": [{"type": "object", "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                                                               "parameters": t["function"]["parameters"]},
                              "required": ["name", "parameters"], "additionalProperties": False} for t in tools]}}
    if not parallel:
        s["maxItems"] = 1
    return s


@pytest.mark.parametrize("parallel", [True, False])
def test_required_parses_the_constrained_array_into_calls(client, parallel):
    kw = dict(tools=TOOLS, max_tokens=400, temperature=0, parallel_tool_calls=parallel)
    resp = client.chat.completions.create(model="fake-llm", messages=MSGS, tool_choice="required", **kw)
    ch = resp.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content == ""
    plain = client.chat.completions.create(
        model="fake-llm", messages=MSGS, tool_choice="none", **kw,
        extra_body={"structured_outputs": {"json": required_schema(TOOLS, parallel)}})
    raw = json.loads(plain.choices[0].message.content)
    jsonschema.validate(raw, required_schema(TOOLS, parallel))
    got = calls_of(ch.message)
    assert [(n, json.loads(a)) for n, a in got] == [(x["name"], x["parameters"]) for x in raw]
    for n, a in got:
        jsonschema.validate(json.loads(a), SCHEMAS[n])
    assert len(got) == 1 if not parallel else len(got) >= 1
    assert len({t.id for t in ch.message.tool_calls}) == len(got)
    final = streamed(client, tool_choice="required", **kw)
    assert calls_of(final.choices[0].message) == got and final.choices[0].finish_reason == "tool_calls"


def test_n2_sampled_streams_keep_their_own_calls_with_logprobs_and_usage(client):
    kw = dict(tools=TOOLS, tool_choice="required", max_tokens=400, temperature=1.0, seed=7, n=2,
              logprobs=True, top_logprobs=2)
    resp = client.chat.completions.create(model="fake-llm", messages=MSGS, **kw)
    assert [c.index for c in resp.choices] == [0, 1]
    stream = client.chat.completions.create(model="fake-llm", messages=MSGS, stream=True,
                                            stream_options={"include_usage": True}, **kw)
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage == resp.usage
    from openai.lib.streaming.chat import ChatCompletionStreamState

    state = ChatCompletionStreamState()
    for ch in chunks:
        state.handle_chunk(ch)
    final = state.get_final_completion()
    for want, got in zip(resp.choices, sorted(final.choices, key=lambda c: c.index)):
        assert calls_of(got.message) == calls_of(want.message) and calls_of(want.message)
        assert got.finish_reason == want.finish_reason == "tool_calls"
        # the tokens' text is the raw array the calls were read from
        raw = json.loads("".join(t.token for t in want.logprobs.content if t.token != "<eos>"))
        assert [(x["name"], x["parameters"]) for x in raw] == [(n, json.loads(a)) for n, a in calls_of(want.message)]
        assert [t.token for t in got.logprobs.content] == [t.token for t in want.logprobs.content]
        assert all(len(t.top_logprobs) == 2 for t in want.logprobs.content)
    # each stream's first tool-call delta carries id, type and name; later ones only arguments
    for idx in (0, 1):
        deltas = [tc for ch in chunks for c in ch.choices if c.index == idx for tc in c.delta.tool_calls or ()]
        firsts = [d for d in deltas if d.id is not None]
        assert all(d.type == "function" and d.function.name for d in firsts)
        assert all(d.function.name is None and d.type is None for d in deltas if d.id is None)
        assert len(firsts) == len(calls_of(resp.choices[idx].message))


HERMES = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3}}\n</tool_call>'


@pytest.mark.parametrize("text, called", [("Let me check. " + HERMES, True), ("No tools needed.", False)])
def test_auto_splits_content_and_calls_with_the_hermes_parser(auto_srv, text, called):
    kw = dict(tools=TOOLS, max_tokens=300, temperature=0,  # tool_choice unset: "auto" with tools
              extra_body={"structured_outputs": {"regex": re.escape(text)}})
    with _client(auto_srv) as c:
        resp = c.chat.completions.create(model="fake-llm", messages=MSGS, **kw)
        final = streamed(c, **kw)
    want = get_parser("hermes")(TOOLS).extract(text)
    ch = resp.choices[0]
    assert ch.message.content == want.content
    assert calls_of(ch.message) == [(t.name, t.arguments) for t in want.calls]
    assert ch.finish_reason == ("tool_calls" if called else "stop")
    if called:
        assert json.loads(ch.message.tool_calls[0].function.arguments) == {"city": "Oslo", "days": 3}
        assert ch.message.content == "Let me check. "  # vLLM's hermes: the text before <tool_call>
    fc = final.choices[0]
    assert (fc.message.content, calls_of(fc.message), fc.finish_reason) == (
        ch.message.content, calls_of(ch.message), ch.finish_reason)


@pytest.mark.parametrize("parallel", [None, False])
def test_auto_without_parallel_tool_calls_answers_only_the_first_call(auto_srv, parallel):
    second = HERMES.replace("get_weather", "get_time").replace('"city": "Oslo", "days": 3', '"zone": "CET"')
    text = HERMES + "\n" + second
    kw = dict(tools=TOOLS, max_tokens=300, temperature=0, extra_body={"structured_outputs": {"regex": re.escape(text)}})
    if parallel is not None:
        kw["parallel_tool_calls"] = parallel
    want = [(t.name, t.arguments) for t in get_parser("hermes")(TOOLS).extract(text).calls]
    assert [n for n, _ in want] == ["get_weather", "get_time"]
    with _client(auto_srv) as c:
        resp = c.chat.completions.create(model="fake-llm", messages=MSGS, **kw)
        final = streamed(c, **kw)
    expect = want if parallel is None else want[:1]
    assert calls_of(resp.choices[0].message) == calls_of(final.choices[0].message) == expect
    assert resp.choices[0].finish_reason == final.choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("parser, text, first", [
    ("pythonic", "[get_weather(city='Rome', days=2), get_time(zone='UTC')]", {"city": "Rome", "days": 2}),
    ("llama3_json", '{"name": "get_time", "parameters": {"zone": "EST"}}', {"zone": "EST"}),
    ("mistral", 'Checking. [TOOL_CALLS]get_weather[ARGS]{"city": "Rome", "days": 2}'
                '[TOOL_CALLS]get_time{"zone": "UTC"}', {"city": "Rome", "days": 2}),
    # values are raw text typed by the request's schema: zone "123" stays a string (untyped: a number)
    ("qwen3_coder", "Checking.\n<tool_call>\n<function=get_time>\n<parameter=zone>\n123\n</parameter>\n</function>"
                    "\n</tool_call>\n<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n"
                    "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>", {"zone": "123"}),
])
def test_auto_with_other_parsers(parser, text, first):
    s = ThreadedServer(_engine(), enable_auto_tool_choice=True, tool_call_parser=parser)
    try:
        kw = dict(tools=TOOLS, max_tokens=300, temperature=0, extra_body={"structured_outputs": {"regex": re.escape(text)}})
        with _client(s) as c:
            resp = c.chat.completions.create(model="fake-llm", messages=MSGS, **kw)
            final = streamed(c, **kw)
    finally:
        s.close()
    want = get_parser(parser)(TOOLS).extract(text)
    assert want.calls and calls_of(resp.choices[0].message) == [(t.name, t.arguments) for t in want.calls]
    assert calls_of(final.choices[0].message) == calls_of(resp.choices[0].message)
    assert resp.choices[0].message.content == final.choices[0].message.content == want.content
    assert resp.choices[0].finish_reason == final.choices[0].finish_reason == "tool_calls"
    assert json.loads(resp.choices[0].message.tool_calls[0].function.arguments) == first


def test_tool_history_renders_and_none_is_plain_text(client):
    history = MSGS + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Paris", "days": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    resp = client.chat.completions.create(model="fake-llm", messages=history, tools=TOOLS, tool_choice="none",
                                          max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    ch = resp.choices[0]
    assert ch.message.tool_calls == [] and len(ch.message.content) == 5 and ch.finish_reason == "length"


def test_an_answer_message_appended_as_it_is_continues_the_conversation(srv, client):
    """The agent loop: the client's own ChatCompletionMessage goes back in ``messages``."""
    r = client.chat.completions.create(model="fake-llm", messages=MSGS, tools=TOOLS, tool_choice=NAMED,
                                       max_tokens=100, temperature=0)
    m = r.choices[0].message
    msgs = MSGS + [m, {"role": "tool", "tool_call_id": m.tool_calls[0].id, "content": "sunny"}]
    r2 = client.chat.completions.create(model="fake-llm", messages=msgs, tools=TOOLS, tool_choice="none",
                                        max_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    as_dicts = MSGS + [{"role": "assistant", "content": ""}, {"role": "tool", "content": "sunny"}]
    want = _post(srv, {"messages": as_dicts, "tools": TOOLS}, "/tokenize").json()["count"]
    assert r2.usage.prompt_tokens == want and r2.choices[0].message.tool_calls == []


def _post(s, body, path="/v1/chat/completions"):
    return httpx.post(s.base_url + path, json=body, timeout=30)


BAD = [
    ({"tool_choice": "required"}, "tool_choice", "without tools"),
    ({"tool_choice": NAMED}, "tool_choice", "without tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "tool_choice.function.name='nope' is invalid: tools has no such function"),
    ({"tools": TOOLS, "tool_choice": "any"}, "tool_choice", "tool_choice='any' is invalid"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools", "tools.0.type='retrieval' is invalid"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}], "tool_choice": "none"}, "tools",
     "tools[0].function.name='bad name' is invalid"),
    ({"tools": TOOLS + TOOLS[:1], "tool_choice": "none"}, "tools", "tools[2].function.name='get_weather' is invalid"),
    ({"tools": TOOLS}, "tool_choice",
     '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'),
    ({"tools": TOOLS, "tool_choice": "auto"}, "tool_choice", "--enable-auto-tool-choice"),
    ({"tools": TOOLS, "tool_choice": NAMED, "response_format": {"type": "json_object"}}, "tool_choice",
     "is invalid with response_format/structured_outputs"),
    ({"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": "no"}, "parallel_tool_calls", "is invalid"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "f", "arguments": "{oops"}}]}]}, "messages", "messages[0].tool_calls[0].function.arguments="),
    ({"chat_template": "{{ messages }}"}, "chat_template", "--trust-request-chat-template"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "foo"}}}],
      "tool_choice": {"type": "function", "function": {"name": "f"}}}, "tools",
     "tools[0].function.parameters is invalid for tool_choice 'f': "),
    ({"tools": TOOLS + [{"type": "function", "function": {"name": "f", "parameters": {"type": "foo"}}}],
      "tool_choice": "required"}, "tools", "tools are invalid for tool_choice 'required': a parameters schema: "),
]


@pytest.mark.parametrize("extra, param, message", BAD)
def test_every_bad_tool_field_is_a_one_line_400_naming_it(srv, extra, param, message):
    body = {"model": "fake-llm", "messages": MSGS, "max_tokens": 4, **extra}
    r = _post(srv, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert message in err["message"] and "\n" not in err["message"], err
    assert err["param"] == param, err
    srv.wait_idle()
