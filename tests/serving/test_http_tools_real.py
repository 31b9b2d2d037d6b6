"""Tool calling with the real SmolLM2-135M behind the HTTP API (slow: one model load + warm-up).

The official ``openai`` client asks for a named call and for "required" calls; every call's
arguments must validate (``jsonschema``) against its tool's schema, and the client's accumulation
of the streamed answer (``chat.completions.stream``) must equal the non-streamed one; the streamed
arguments must arrive in more than one fragment (the model writes them token by token).
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from http_helpers import ThreadedServer

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER, "strict": True}},
         {"type": "function", "function": {"name": "get_time", "description": "Local time in a city",
                                           "parameters": TIME, "strict": True}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
MSGS = [{"role": "user", "content": "What is the weather like in Paris today?"}]


@pytest.fixture(scope="module")
def client():
    from jaxllm.config import EngineConfig
    from jaxllm.engine.factory import build_engine

    srv = ThreadedServer(build_engine(EngineConfig(model="smollm2-135m", max_model_len=512, max_num_seqs=2,
                                                   max_num_batched_tokens=256)))
    with openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0, timeout=300) as c:
        yield c
    srv.close()


def calls(message):
    return [(t.function.name, t.function.arguments) for t in message.tool_calls or ()]


@pytest.mark.slow
@pytest.mark.parametrize("tool_choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"])
def test_real_model_tool_calls_validate_and_stream_the_same(client, tool_choice):
    kw = dict(model="smollm2-135m", messages=MSGS, tools=TOOLS, tool_choice=tool_choice, max_tokens=80, temperature=0)
    resp = client.chat.completions.create(**kw)
    ch = resp.choices[0]
    got = calls(ch.message)
    assert got and ch.message.content == ""
    for name, args in got:
        jsonschema.validate(json.loads(args), SCHEMAS[name])
    if tool_choice == "required":
        assert ch.finish_reason == "tool_calls"
    else:
        assert ch.finish_reason == "stop" and [n for n, _ in got] == ["get_weather"]
    fragments = 0
    with client.chat.completions.stream(**kw) as stream:
        for event in stream:
            fragments += event.type == "tool_calls.function.arguments.delta"
        final = stream.get_final_completion()
    assert calls(final.choices[0].message) == got and final.choices[0].finish_reason == ch.finish_reason
    assert fragments > len(got)  # arguments streamed in pieces, not in one chunk per call
