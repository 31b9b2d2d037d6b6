"""gRPC chat = HTTP chat: a tool round trip's history (assistant ``tool_calls``, ``role: "tool"``
messages with ``tool_call_id``) and the ``--reasoning-parser`` split over ``Generate``.

Behind one server (both doors): the real host engine over the fake runner, scripted to write a
given text for a given conversation, and a fake tokenizer whose chat template writes the history
out in full (each call's id, name and arguments, which it requires as an object, as vLLM hands
them to templates; each tool message's ``tool_call_id``). References: the prompt the template
must render, written out by hand; the HTTP door's answer to the same conversation (content,
reasoning, tool calls, finish reason, usage); the reasoning text written by hand.
"""

from __future__ import annotations

import json

import grpc
import httpx
import pytest

from http_helpers import ThreadedServer, make_llm_engine
from serving.client_messages import Completion, build_request
from serving.proto.jaxllm.v1 import generation_pb2 as pb
from serving.proto.jaxllm.v1 import generation_pb2_grpc as pb_grpc
from tests.fakes.fake_runner import context_hash
from tests.fakes.fake_tokenizer import EOS, SEP, FakeTokenizer
from tests.fakes.grammar_tokenizers import fake_grammar_tokenizer

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
           "required": ["city", "days"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
ASK = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]
CALL = ('<think>I should call the tool.</think><tool_call>\n'
        '{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>')
ANSWER = "<think>The tool says sunny.</think>It is sunny in Paris, 21C."


class HistoryTokenizer(FakeTokenizer):
    """FakeTokenizer whose template writes tool calls, tool results and template kwargs out."""

    def chat_prompt(self, messages, add_generation_prompt=True, *, chat_template=None,
                    continue_final_message=False, tools=None, chat_template_kwargs=None) -> dict:
        lines = []
        if tools:
            lines.append("tools: " + ",".join(t["function"]["name"] for t in tools))
        if chat_template_kwargs:
            lines.append("kwargs: " + json.dumps(chat_template_kwargs, sort_keys=True))
        for m in messages:
            line = f"{m['role']}: {m['content']}"
            for c in m.get("tool_calls") or ():
                args = c["function"]["arguments"]
                if not isinstance(args, dict):
                    raise ValueError(f"the template got arguments as {type(args).__name__}, not an object")
                line += f" [call {c['id']} {c['function']['name']} {json.dumps(args, sort_keys=True)}]"
            if m.get("tool_call_id"):
                line += f" [re {m['tool_call_id']}]"
            lines.append(line)
        ids: list[int] = []
        for line in lines:
            ids += self.encode(line, add_special_tokens=False) + [SEP]
        if add_generation_prompt:
            ids += self.encode("assistant: ", add_special_tokens=False)
        return {"prompt": self.decode(ids, skip_special_tokens=False), "prompt_token_ids": ids}


TOK = HistoryTokenizer()


def _engine():
    e = make_llm_engine(max_model_len=1024, num_blocks=1024, grammar_tokenizer=fake_grammar_tokenizer)
    e.tokenizer = TOK

    def next_token(ctx, s):
        prompt = TOK.decode(ctx[:s.num_prompt_tokens], skip_special_tokens=False)
        text = ANSWER if "[re call_1]" in prompt else CALL if "user: Weather in Paris?" in prompt else None
        k = len(ctx) - s.num_prompt_tokens
        if text is None:
            return context_hash(ctx) % e.runner.vocab_size
        ids = TOK.encode(text, add_special_tokens=False)
        return ids[k] if k < len(ids) else EOS

    e.runner.next_token_fn = next_token
    return e


@pytest.fixture(scope="module")
def srv():
    s = ThreadedServer(_engine(), reasoning_parser="deepseek_r1", enable_auto_tool_choice=True,
                       tool_call_parser="hermes")
    with grpc.insecure_channel(f"127.0.0.1:{s.server.port}") as ch:
        s.stub = pb_grpc.GenerationStub(ch)
        yield s
    s.close()


def grpc_chat(srv, messages, **kw) -> Completion:
    req = build_request(chat=messages, tools=TOOLS, temperature=0, max_tokens=200)
    for name, value in kw.items():
        setattr(req.chat, name, value)
    c = Completion()
    for resp in srv.stub.Generate(req, timeout=60):
        c.add(resp)
    return c


def http_chat(srv, messages, **kw) -> dict:
    body = {"messages": messages, "tools": TOOLS, "temperature": 0, "max_tokens": 200, **kw}
    r = httpx.post(srv.base_url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _history(call: dict) -> list[dict]:
    """The conversation after the tool ran: the call as the assistant made it, then its result."""
    return ASK + [{"role": "assistant", "content": None, "tool_calls": [
                      {"id": "call_1", "type": "function",
                       "function": {"name": call["name"], "arguments": call["arguments"]}}]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"}]


def test_tool_round_trip_equals_http(srv):
    # turn 1: reasoning, then a call (hermes under "auto"), read from the content only
    g = grpc_chat(srv, ASK)
    h = http_chat(srv, ASK)
    msg = h["choices"][0]["message"]
    assert g.reasonings[0] == msg["reasoning"] == "I should call the tool."
    assert [(c["name"], c["arguments"]) for c in g.tool_calls[0]] == \
        [(t["function"]["name"], t["function"]["arguments"]) for t in msg["tool_calls"]]
    assert json.loads(g.tool_calls[0][0]["arguments"]) == {"city": "Paris", "days": 2}
    assert g.contents.get(0, "") == (msg["content"] or "")
    assert g.finish_reasons[0] == h["choices"][0]["finish_reason"] == "tool_calls"
    assert g.usage.reasoning_tokens == h["usage"]["completion_tokens_details"]["reasoning_tokens"] \
        == len("I should call the tool.")

    # turn 2: the history carries the call and its result, over both doors
    history = _history(g.tool_calls[0][0])
    g2 = grpc_chat(srv, history)
    h2 = http_chat(srv, history)
    want_prompt = ("tools: get_weather<sep>system: Be brief.<sep>user: Weather in Paris?<sep>"
                   'assistant:  [call call_1 get_weather {"city": "Paris", "days": 2}]<sep>'
                   "tool: sunny, 21C [re call_1]<sep>assistant: ")
    assert TOK.decode(g2.prompt_token_ids, skip_special_tokens=False) == want_prompt
    tokenized = httpx.post(srv.base_url + "/tokenize", json={"messages": history, "tools": TOOLS}, timeout=30).json()
    assert g2.prompt_token_ids == tokenized["tokens"]
    assert g2.usage.prompt_tokens == h2["usage"]["prompt_tokens"] == len(g2.prompt_token_ids)
    # gRPC Tokenize counts what Generate sends (the tools and the history rendered the same way)
    req = build_request(chat=history, tools=TOOLS)
    assert list(srv.stub.Tokenize(pb.TokenizeRequest(chat=req.chat), timeout=30).token_ids) == g2.prompt_token_ids
    m2 = h2["choices"][0]["message"]
    assert (g2.reasonings[0], g2.contents[0]) == (m2["reasoning"], m2["content"]) == \
        ("The tool says sunny.", "It is sunny in Paris, 21C.")
    assert g2.text == ANSWER and not g2.tool_calls and g2.finish_reasons[0] == h2["choices"][0]["finish_reason"] == "stop"
    assert g2.usage.reasoning_tokens == h2["usage"]["completion_tokens_details"]["reasoning_tokens"] \
        == len("The tool says sunny.")


def test_include_reasoning_false_and_template_kwargs(srv):
    history = _history({"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'})
    g = grpc_chat(srv, history, include_reasoning=False, chat_template_kwargs_json='{"style": "terse"}')
    h = http_chat(srv, history, include_reasoning=False, chat_template_kwargs={"style": "terse"})
    assert g.reasonings == {} and h["choices"][0]["message"]["reasoning"] is None
    assert g.contents[0] == h["choices"][0]["message"]["content"] == "It is sunny in Paris, 21C."
    assert 'kwargs: {"style": "terse"}<sep>' in TOK.decode(g.prompt_token_ids, skip_special_tokens=False)
    assert len(g.prompt_token_ids) == h["usage"]["prompt_tokens"]


def test_plain_chat_gets_the_reasoning_split(srv):
    """No tools: the reasoning parser still splits a gRPC chat, as HTTP's chat."""
    history = _history({"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'})
    req = build_request(chat=history, temperature=0, max_tokens=200)
    c = Completion()
    for resp in srv.stub.Generate(req, timeout=60):
        c.add(resp)
    h = httpx.post(srv.base_url + "/v1/chat/completions", json={"messages": history, "temperature": 0,
                                                               "max_tokens": 200}, timeout=60).json()
    m = h["choices"][0]["message"]
    assert (c.reasonings[0], c.contents[0]) == (m["reasoning"], m["content"])
    assert c.usage.reasoning_tokens == h["usage"]["completion_tokens_details"]["reasoning_tokens"] > 0
    # a text prompt is not a chat: no split, as /v1/completions
    t = Completion()
    for resp in srv.stub.Generate(build_request("Weather in Paris?", max_tokens=3), timeout=60):
        t.add(resp)
    assert t.reasonings == {} and t.contents == {} and t.usage.reasoning_tokens == 0


@pytest.mark.parametrize("messages, kw, message", [
    (ASK + [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "{bad"}}]}], {},
     "chat.messages[2].tool_calls[0].arguments='{bad' is invalid: not JSON"),
    (ASK, {"chat_template_kwargs_json": "[1"}, "chat.chat_template_kwargs_json is invalid: not JSON"),
    (ASK, {"chat_template_kwargs_json": "[1]"}, "chat.chat_template_kwargs_json="),
])
def test_bad_history_names_the_proto_field(srv, messages, kw, message):
    with pytest.raises(grpc.RpcError) as err:
        grpc_chat(srv, messages, **kw)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details(), \
        err.value.details()


def test_beam_search_refuses_the_reasoning_parser_as_http(srv):
    req = build_request(chat=ASK, use_beam_search=True, n=2, max_tokens=3)
    with pytest.raises(grpc.RpcError) as err:
        list(srv.stub.Generate(req, timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "use_beam_search=true is invalid under --reasoning-parser" in err.value.details()
    r = httpx.post(srv.base_url + "/v1/chat/completions", json={"messages": ASK, "use_beam_search": True, "n": 2,
                                                               "max_tokens": 3}, timeout=30)
    assert r.status_code == 400 and "use_beam_search=true is invalid under --reasoning-parser" in r.text
