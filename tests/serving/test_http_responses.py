"""``POST /v1/responses`` (OpenAI's Responses API) with the official ``openai`` client (no jax).

Behind the server: the real host engine over the fake runner (greedy: the next token is a hash
of the context, or a scripted text for a given user message). References, independent of
serving/openai_responses*.py: the same conversation sent to /v1/chat/completions (its text,
tool calls and token counts), ``jsonschema`` for constrained answers, reasoning / content written
out by hand, and the openai client's own accumulation of the event stream (``responses.stream``)
against the non-streamed response.
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from http_helpers import ThreadedServer, make_llm_engine
from test_http_reasoning import SCRIPTS, _engine as scripted_engine
from test_http_tools import WEATHER
from tests.fakes.grammar_tokenizers import fake_grammar_tokenizer

FLAT_TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather forecast",
               "parameters": WEATHER, "strict": True}]
CHAT_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather forecast",
                                                "parameters": WEATHER, "strict": True}}]


@pytest.fixture(scope="module")
def srv():
    s = ThreadedServer(make_llm_engine(max_model_len=512, num_blocks=512, grammar_tokenizer=fake_grammar_tokenizer))
    yield s
    s.close()


@pytest.fixture(scope="module")
def r1():
    s = ThreadedServer(scripted_engine(), reasoning_parser="deepseek_r1", enable_auto_tool_choice=True,
                       tool_call_parser="hermes")
    yield s
    s.close()


def _client(s):
    return openai.OpenAI(base_url=s.base_url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def client(srv):
    with _client(srv) as c:
        yield c


def shape(resp) -> list[dict]:
    """A response's output without the random ids (nor what the client's parsing adds)."""
    out = []
    for item in resp.output:
        d = item.model_dump(exclude_none=True)
        for key in ("id", "call_id", "parsed_arguments"):
            d.pop(key, None)
        for part in d.get("content") or ():
            part.pop("parsed", None)
        out.append(d)
    return out


def both(c, **kw):
    """(non-streamed response, raw stream events, the client's accumulated final response)."""
    kw.setdefault("model", "fake-llm")
    resp = c.responses.create(**kw)
    events = list(c.responses.create(stream=True, **kw))
    with c.responses.stream(**kw) as stream:
        for _ in stream:
            pass
        final = stream.get_final_response()
    return resp, events, final


def check_events(events, final):
    """Numbered from 0 without gaps; created/in_progress first, completed last; each item's
    deltas add up to its done event and its final state; the completed body = the accumulation."""
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[-1].type == "response.completed"
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    done = {e.output_index: e.item for e in events if e.type == "response.output_item.done"}
    added = [e.output_index for e in events if e.type == "response.output_item.added"]
    assert added == list(range(len(done))) == sorted(done)
    for k, item in done.items():
        deltas = "".join(e.delta for e in events if getattr(e, "output_index", None) == k and e.type.endswith(".delta"))
        if item.type == "message":
            assert deltas == item.content[0].text
        elif item.type == "reasoning":
            assert deltas == item.content[0].text
        else:
            assert deltas == item.arguments
    completed = events[-1].response
    assert [i.model_dump() for i in completed.output] == [done[k].model_dump() for k in sorted(done)]
    assert completed.id == events[0].response.id
    assert shape(final) == shape(completed)


def test_text_equals_the_chat_answer_and_the_stream_adds_up_to_it(client):
    inp = [{"role": "user", "content": [{"type": "input_text", "text": "Tell me "}, {"type": "input_text", "text": "a joke"}]},
           {"role": "assistant", "content": [{"type": "output_text", "text": "Why?"}]},
           {"type": "message", "role": "developer", "content": "Be brief."},
           {"role": "user", "content": "Go on"}]
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me a joke"},
            {"role": "assistant", "content": "Why?"}, {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Go on"}]
    chat = client.chat.completions.create(model="fake-llm", messages=msgs, max_tokens=12, temperature=0)
    resp, events, final = both(client, input=inp, instructions="You are terse.", max_output_tokens=12,
                               temperature=0, metadata={"k": "v"})
    assert resp.output_text == chat.choices[0].message.content and len(resp.output_text) > 0
    assert resp.object == "response" and resp.id.startswith("resp_") and resp.model == "fake-llm"
    assert resp.instructions == "You are terse." and resp.metadata == {"k": "v"} and resp.max_output_tokens == 12
    u = resp.usage
    assert (u.input_tokens, u.output_tokens, u.total_tokens) == (chat.usage.prompt_tokens, chat.usage.completion_tokens,
                                                                 chat.usage.total_tokens)
    assert u.output_tokens_details.reasoning_tokens == 0
    # 12 tokens without an EOS: ran out of max_output_tokens
    assert chat.choices[0].finish_reason == "length"
    assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
    assert resp.output[0].status == "incomplete"
    check_events(events, final)
    assert shape(final) == shape(resp) and final.output_text == resp.output_text
    assert final.status == resp.status and final.usage.output_tokens == u.output_tokens
    assert any(e.type == "response.output_text.delta" for e in events)


def test_a_string_input_is_one_user_message(client):
    chat = client.chat.completions.create(model="fake-llm", messages=[{"role": "user", "content": "hello"}],
                                          max_tokens=8, temperature=0, top_p=0.5)
    resp = client.responses.create(model="fake-llm", input="hello", max_output_tokens=8, temperature=0, top_p=0.5)
    assert resp.output_text == chat.choices[0].message.content
    assert resp.temperature == 0 and resp.top_p == 0.5


def test_named_tool_choice_is_one_function_call_parsed_by_the_client(client):
    kw = dict(input="Weather in Paris?", tools=FLAT_TOOLS, tool_choice={"type": "function", "name": "get_weather"},
              max_output_tokens=200, temperature=0)
    resp, events, final = both(client, **kw)
    [call] = resp.output  # no message item: a forced call has no content
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    assert call.call_id.startswith("call_") and call.id.startswith("fc_")
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    chat = client.chat.completions.create(model="fake-llm", messages=[{"role": "user", "content": "Weather in Paris?"}],
                                          tools=CHAT_TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                          max_tokens=200, temperature=0)
    assert call.arguments == chat.choices[0].message.tool_calls[0].function.arguments
    assert resp.status == "completed" and resp.tool_choice.name == "get_weather"
    assert resp.tools[0].name == "get_weather"
    check_events(events, final)
    assert shape(final) == shape(resp)
    assert [e.type for e in events if getattr(e, "output_index", None) == 0 and "arguments" in e.type][-1] == \
        "response.function_call_arguments.done"
    # the strict tool's arguments parsed by the client's stream helper
    assert final.output[0].parsed_arguments == json.loads(call.arguments)


def test_function_call_and_its_output_continue_the_conversation_as_chat_does(client):
    inp = [{"role": "user", "content": "Weather in Paris?"},
           {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'},
           {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
           {"type": "reasoning", "id": "rs_1", "summary": []}]
    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                                  "arguments": '{"city": "Paris", "days": 1}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    chat = client.chat.completions.create(model="fake-llm", messages=msgs, tools=CHAT_TOOLS, tool_choice="none",
                                          max_tokens=10, temperature=0)
    resp = client.responses.create(model="fake-llm", input=inp, tools=FLAT_TOOLS, tool_choice="none",
                                   max_output_tokens=10, temperature=0)
    assert resp.output_text == chat.choices[0].message.content
    assert resp.usage.input_tokens == chat.usage.prompt_tokens


def test_json_schema_text_format_validates(client):
    fmt = {"type": "json_schema", "name": "weather", "schema": WEATHER, "strict": True}
    resp, events, final = both(client, input="Weather?", text={"format": fmt}, max_output_tokens=200, temperature=0)
    jsonschema.validate(json.loads(resp.output_text), WEATHER)
    assert resp.text.format.type == "json_schema" and resp.text.format.name == "weather"
    check_events(events, final)
    assert final.output_text == resp.output_text


def test_reasoning_and_an_auto_tool_call_become_their_own_items(r1):
    text = '<think>\nNeed the weather.\n</think>\n<tool_call>{"name": "get_weather", "arguments": {"city": "Rome", "days": 2}}</tool_call>'
    SCRIPTS["rsp-tool"] = (text, True)
    with _client(r1) as c:
        resp, events, final = both(c, input="rsp-tool", tools=FLAT_TOOLS, max_output_tokens=300, temperature=0,
                                   reasoning={"effort": "low"})
        chat = c.chat.completions.create(model="fake-llm", messages=[{"role": "user", "content": "rsp-tool"}],
                                         tools=CHAT_TOOLS, max_tokens=300, temperature=0)
    assert [i.type for i in resp.output] == ["reasoning", "function_call"]
    assert resp.output[0].content[0].text == "\nNeed the weather.\n"
    assert json.loads(resp.output[1].arguments) == {"city": "Rome", "days": 2}
    assert resp.usage.output_tokens_details.reasoning_tokens == \
        chat.usage.completion_tokens_details.reasoning_tokens > 0
    assert resp.reasoning.effort == "low"
    check_events(events, final)
    assert shape(final) == shape(resp)
    assert any(e.type == "response.reasoning_text.delta" for e in events)


def test_reasoning_then_text(r1):
    SCRIPTS["rsp-text"] = ("<think>Two and two.</think>It is 4.", True)
    with _client(r1) as c:
        resp, events, final = both(c, input="rsp-text", max_output_tokens=300, temperature=0)
    assert [(i.type, i.content[0].text) for i in resp.output] == [("reasoning", "Two and two."),
                                                                  ("message", "It is 4.")]
    assert resp.output_text == "It is 4." and resp.status == "completed"
    check_events(events, final)
    assert shape(final) == shape(resp)


BAD = [
    (dict(previous_response_id="resp_x"), "previous_response_id",
     "previous_response_id='resp_x' is not supported: this server stores no responses; send the whole conversation in input"),
    (dict(background=True), "background", None),
    (dict(include=["reasoning.encrypted_content"]), "include",
     "include[0]='reasoning.encrypted_content' is not supported: this server adds only 'message.output_text.logprobs'"),
    (dict(include=["message.output_text.logprobs"], top_logprobs=21), "top_logprobs",
     "top_logprobs=21 is invalid: must be in [0, 20]"),
    (dict(tools=[{"type": "web_search"}]), "tools",
     "tools[0].type='web_search' is not supported: this server has no built-in tools (only 'function')"),
    (dict(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]), "input",
     "input[0].content[0].type='input_image' is not supported: only text parts ('input_text', 'output_text') are "
     "(no images, files or audio)"),
    (dict(input=[{"role": "robot", "content": "hi"}]), "input", None),
    (dict(input=[]), "input", "input=[] is invalid: must hold at least one item"),
    (dict(max_output_tokens=100000), "max_output_tokens", None),
    (dict(tools=FLAT_TOOLS, tool_choice={"type": "function", "name": "nope"}), "tool_choice",
     "tool_choice.name='nope' is invalid: tools has no such function (it has get_weather)"),
    (dict(max_output_tokenz=5), "max_output_tokenz", "max_output_tokenz is not a supported field"),
    (dict(truncation="auto"), "truncation", None),
    (dict(text={"format": {"type": "json_schema", "name": "x", "schema": {"type": 5}}}), "text.format",
     "text.format.schema={'type': 5} is invalid: type must be a string or array of strings"),
    (dict(tools=FLAT_TOOLS, tool_choice={"type": "function", "name": "get_weather"}, text={"format": {"type": "json_object"}}),
     "tool_choice", "tool_choice={'type': 'function', 'name': 'get_weather'} is invalid with text.format: the tool's "
     "schema already constrains the output; set one of them"),
]


@pytest.mark.parametrize("extra, param, message", BAD)
def test_every_unsupported_or_bad_field_is_a_one_line_400_naming_it(srv, extra, param, message):
    import httpx

    body = {"model": "fake-llm", "input": "hi", **extra}
    r = httpx.post(srv.base_url + "/v1/responses", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and "\n" not in err["message"]
    assert err["message"].startswith(param.split(".")[0]), err["message"]
    if message is not None:
        assert err["message"] == message
    if param == "max_output_tokens":
        assert "max_tokens" not in err["message"]


def test_store_is_accepted_and_nothing_is_stored(client):
    resp = client.responses.create(model="fake-llm", input="hi", store=True, max_output_tokens=2)
    assert resp.store is False


def test_engine_death_mid_stream_is_one_error_event_last():
    import httpx

    from tests.fakes.fake_engine import FakeEngine

    eng = FakeEngine(step_delay=0.01)
    s = ThreadedServer(eng, engine_death_grace=30.0)
    try:
        with httpx.Client(base_url=s.base_url, timeout=10) as h:
            with h.stream("POST", "/v1/responses", json={"input": "doomed", "max_output_tokens": 200,
                                                         "stream": True}) as r:
                assert r.headers["content-type"].startswith("text/event-stream")
                it = (line for line in r.iter_lines() if line.startswith("data: "))
                assert json.loads(next(it)[6:])["type"] == "response.created"
                eng.inject_raise()
                rest = [json.loads(line[6:]) for line in it]
            assert [e["type"] for e in rest].count("error") == 1 and rest[-1]["type"] == "error"
            assert "response.completed" not in [e["type"] for e in rest]
            assert rest[-1]["code"] == "internal" and "injected fault" in rest[-1]["message"]
            assert [e["sequence_number"] for e in rest] == list(range(1, len(rest) + 1))
    finally:
        s.close()
