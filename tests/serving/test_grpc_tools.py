"""Tool calling on the gRPC door (``ChatMessages.tools_json`` / ``tool_choice``; no jax).

Reference: the HTTP door of the same server answering the same chat as /v1/chat/completions
(non-streamed): the gRPC stream, accumulated by ``serving.client.Completion``, must give the same
content, calls (name and arguments) and finish reason; the prompt must be the /tokenize count of
the chat with its tools. The engine is the real host engine with structured outputs over the fake
runner (deterministic at temperature 0).
"""

from __future__ import annotations

import json
import re

import grpc
import httpx
import pytest

from http_helpers import ThreadedServer, make_llm_engine
from serving.client import Completion
from serving.proto.jaxllm.v1 import generation_pb2 as pb
from serving.proto.jaxllm.v1 import generation_pb2_grpc as pb_grpc
from tests.fakes.grammar_tokenizers import fake_grammar_tokenizer

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER, "strict": True}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
MSGS = [{"role": "user", "content": "Weather in Paris?"}]
HERMES = 'Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3}}\n</tool_call>'


@pytest.fixture(scope="module")
def srv():
    s = ThreadedServer(make_llm_engine(max_model_len=512, num_blocks=512, grammar_tokenizer=fake_grammar_tokenizer),
                       enable_auto_tool_choice=True, tool_call_parser="hermes")
    with grpc.insecure_channel(f"127.0.0.1:{s.server.port}") as ch:
        s.stub = pb_grpc.GenerationStub(ch)
        yield s
    s.close()


def _grpc(srv, tool_choice: str = "", regex: str | None = None, structured: bool = False, **sampling):
    chat = pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in MSGS], tools_json=json.dumps(TOOLS),
                           tool_choice=tool_choice)
    sp = pb.SamplingParams(**{"temperature": 0, "max_tokens": 300, **sampling})
    if regex is not None:
        sp.structured_outputs.regex = regex
    if structured:
        sp.structured_outputs.json = json.dumps(WEATHER)
    c = Completion()
    for resp in srv.stub.Generate(pb.GenerateRequest(chat=chat, sampling=sp), timeout=60):
        c.add(resp)
    return c


def _http(srv, tool_choice=None, regex: str | None = None) -> dict:
    body = {"messages": MSGS, "tools": TOOLS, "temperature": 0, "max_tokens": 300}
    if tool_choice is not None:
        body["tool_choice"] = tool_choice
    if regex is not None:
        body["structured_outputs"] = {"regex": regex}
    r = httpx.post(srv.base_url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("grpc_choice, http_choice, regex", [
    ("get_weather", {"type": "function", "function": {"name": "get_weather"}}, None),
    ("required", "required", None),
    ("", None, re.escape(HERMES)),  # "auto" with tools, the hermes parser
])
def test_grpc_tool_calls_equal_the_http_answer(srv, grpc_choice, http_choice, regex):
    g = _grpc(srv, grpc_choice, regex)
    h = _http(srv, http_choice, regex)["choices"][0]
    want = [(t["function"]["name"], t["function"]["arguments"]) for t in h["message"]["tool_calls"]]
    assert want and [(c["name"], c["arguments"]) for c in g.tool_calls[0]] == want
    assert all(re.fullmatch(r"chatcmpl-tool-[0-9a-f]{32}", c["id"]) for c in g.tool_calls[0])
    assert g.contents.get(0, "") == (h["message"]["content"] or "")
    assert g.finish_reasons[0] == h["finish_reason"]
    if regex is not None:
        assert g.text == HERMES and g.contents[0] == "Let me check. " and g.finish_reasons[0] == "tool_calls"
        assert json.loads(g.tool_calls[0][0]["arguments"]) == {"city": "Oslo", "days": 3}


def test_tool_choice_none_renders_the_tools_and_answers_plain_text(srv):
    g = _grpc(srv, "none", max_tokens=5, ignore_eos=True)
    count = httpx.post(srv.base_url + "/tokenize", json={"messages": MSGS, "tools": TOOLS}, timeout=30).json()["count"]
    assert len(g.prompt_token_ids) == count and g.tool_calls == {} and g.contents == {}
    assert g.finish_reasons[0] == "length" and len(g.token_ids[0]) == 5
    plain = Completion()
    for resp in srv.stub.Generate(pb.GenerateRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in MSGS]),
                                                     sampling=pb.SamplingParams(max_tokens=1)), timeout=60):
        plain.add(resp)
    assert len(plain.prompt_token_ids) < count  # without tools_json the template has no tools


@pytest.mark.parametrize("kw, message", [
    (dict(tool_choice="nope"), "tool_choice.function.name='nope' is invalid: tools has no such function"),
    (dict(tool_choice="get_weather", structured=True),
     "chat.tool_choice='get_weather' is invalid with sampling.structured_outputs"),
])
def test_bad_tool_fields_are_invalid_argument(srv, kw, message):
    with pytest.raises(grpc.RpcError) as err:
        _grpc(srv, **kw)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()


def test_bad_tools_json_names_the_field(srv):
    for tools_json, message in (("[{", "chat.tools_json is invalid: not JSON"),
                                ('[{"type": "function", "function": {}}]', "chat.tools_json[0].function.name")):
        chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")], tools_json=tools_json)
        with pytest.raises(grpc.RpcError) as err:
            list(srv.stub.Generate(pb.GenerateRequest(chat=chat), timeout=30))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details(), \
            err.value.details()


def test_client_cli_prints_the_calls(srv, tmp_path, capsys):
    from serving import client

    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(TOOLS))
    argv = [MSGS[0]["content"], "--target", f"127.0.0.1:{srv.server.port}", "--chat", "--tools", str(tools),
            "--tool-choice", "get_weather", "--temperature", "0", "--max-tokens", "300"]
    assert client.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    h = _http(srv, {"type": "function", "function": {"name": "get_weather"}})["choices"][0]["message"]
    want = {"index": 0, "name": "get_weather", "arguments": h["tool_calls"][0]["function"]["arguments"]}
    assert json.loads(lines[-1]) == want and lines[0] == want["arguments"]  # the raw text, then the call
    with pytest.raises(SystemExit):
        client.main(["hi", "--tools", str(tools)])  # --tools without --chat
    assert "--tools/--tool-choice need --chat" in capsys.readouterr().err
