"""/v1/responses with the real SmolLM2-135M behind the HTTP API (slow: one model load + warm-up).

References: the same conversation through /v1/chat/completions at temperature 0 (text and token
counts), ``jsonschema`` for a named call's arguments, and the openai client's accumulation of the
streamed response (``responses.stream``) against the non-streamed one; the streamed text must
arrive in more than one delta (the model writes it token by token).
"""

from __future__ import annotations

import json

import jsonschema
import pytest

from test_http_tools_real import WEATHER, client  # noqa: F401  (the module's SmolLM2 server)


@pytest.mark.slow
def test_real_model_text_equals_chat_and_the_stream_adds_up(client):  # noqa: F811
    chat = client.chat.completions.create(model="smollm2-135m", max_tokens=24, temperature=0,
                                          messages=[{"role": "system", "content": "Answer briefly."},
                                                    {"role": "user", "content": "What is the capital of France?"}])
    kw = dict(model="smollm2-135m", instructions="Answer briefly.", input="What is the capital of France?",
              max_output_tokens=24, temperature=0)
    resp = client.responses.create(**kw)
    assert resp.output_text == chat.choices[0].message.content and resp.output_text
    assert (resp.usage.input_tokens, resp.usage.output_tokens) == (chat.usage.prompt_tokens, chat.usage.completion_tokens)
    deltas = []
    with client.responses.stream(**kw) as stream:
        for ev in stream:
            if ev.type == "response.output_text.delta":
                deltas.append(ev.delta)
        final = stream.get_final_response()
    assert final.output_text == resp.output_text == "".join(deltas) and len(deltas) > 1
    assert final.status == resp.status


@pytest.mark.slow
def test_real_model_named_function_call_validates(client):  # noqa: F811
    tools = [{"type": "function", "name": "get_weather", "description": "Weather in a city", "parameters": WEATHER,
              "strict": True}]
    resp = client.responses.create(model="smollm2-135m", input="What is the weather like in Paris today?",
                                   tools=tools, tool_choice={"type": "function", "name": "get_weather"},
                                   max_output_tokens=80, temperature=0)
    [call] = [i for i in resp.output if i.type == "function_call"]
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    with client.responses.stream(model="smollm2-135m", input="What is the weather like in Paris today?",
                                 tools=tools, tool_choice={"type": "function", "name": "get_weather"},
                                 max_output_tokens=80, temperature=0) as stream:
        final = stream.get_final_response()
    assert [(i.name, i.arguments) for i in final.output if i.type == "function_call"] == [(call.name, call.arguments)]


@pytest.mark.slow
def test_real_model_logprobs_equal_chat(client):  # noqa: F811
    """include=["message.output_text.logprobs"]: the output_text part's logprobs are the chat
    endpoint's for the same greedy request (tokens and bytes exact; logprobs to float noise, the
    second request's prefill reading the first one's cached prefix), and the stream's deltas carry them."""
    msgs = [{"role": "user", "content": "Name three colors."}]
    chat = client.chat.completions.create(model="smollm2-135m", messages=msgs, max_tokens=12, temperature=0,
                                          logprobs=True, top_logprobs=2)
    kw = dict(model="smollm2-135m", input="Name three colors.", max_output_tokens=12, temperature=0,
              include=["message.output_text.logprobs"], top_logprobs=2)
    resp = client.responses.create(**kw)
    got, want = resp.output[0].content[0].logprobs, chat.choices[0].logprobs.content
    assert [(e.token, e.bytes) for e in got] == [(e.token, e.bytes) for e in want] and len(got) == 12
    assert [e.logprob for e in got] == pytest.approx([e.logprob for e in want], abs=1e-4)
    assert [[t.token for t in e.top_logprobs] for e in got] == [[t.token for t in e.top_logprobs] for e in want]
    streamed = [lp for ev in client.responses.create(stream=True, **kw) if ev.type == "response.output_text.delta"
                for lp in ev.logprobs]
    assert [lp.token for lp in streamed] == [e.token for e in got]
