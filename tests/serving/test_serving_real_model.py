"""The real SmolLM2-135M engine behind the server (slow: one model load + warm-up).

Runs in ``make test`` (deselect with ``-m "not slow"``). Checks greedy
equality with the offline ``LLM`` on the same engine (text and chat), concurrent streams,
cancellation freeing every KV block, and that steady-state serving compiles nothing after warm-up.
"""

from __future__ import annotations

import asyncio
import time
from urllib.request import urlopen

import pytest

from serving_helpers import collect, request, run, running_server

PROMPTS = ["The three primary colors are", "Once upon a time", "def add(a, b):",
           "The capital of Japan is"]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def real_engine():
    from jaxllm.config import EngineConfig
    from jaxllm.engine.factory import build_engine
    return build_engine(EngineConfig(model="smollm2-135m", max_model_len=256, max_num_seqs=4,
                                     max_num_batched_tokens=64))


@pytest.mark.slow
def test_real_model_greedy_matches_offline(real_engine):
    from jaxllm import LLM, SamplingParams

    llm = LLM("smollm2-135m", engine=real_engine)
    greedy = SamplingParams(temperature=0.0, max_tokens=16)
    offline = [o.outputs[0] for o in llm.generate(PROMPTS, greedy, use_tqdm=False)]
    chat_offline = llm.chat(CHAT, greedy, use_tqdm=False)[0].outputs[0]
    runner = getattr(real_engine, "runner", None)
    traces = getattr(runner, "num_traces", None)

    async def main():
        async with running_server(real_engine, watchdog_timeout=60, health_probe_interval=5,
                                  metrics_port=0) as c:
            async def one(p):
                return collect(await c.generate(prompt=p, temperature=0.0, max_tokens=16,
                                                timeout=300))

            async def cancel(p):
                call = c.stub.Generate(request(prompt=p, max_tokens=100), timeout=300)
                await call.read()
                call.cancel()

            results = await asyncio.gather(*(one(p) for p in PROMPTS * 2),
                                           *(cancel(p) for p in PROMPTS[:2]))
            for res, want in zip(results[:8], offline * 2):
                assert res["texts"][0] == want.text and res["tokens"][0] == want.token_ids
            chat = collect(await c.generate(prompt=None, chat=CHAT, temperature=0.0,
                                            max_tokens=16, timeout=300))
            assert chat["texts"][0] == chat_offline.text
            info = await c.wait_blocks_free(timeout=60)
            assert info.model == "smollm2-135m" and info.vocab_size == 49152
            assert list(info.token_buckets) and list(info.request_buckets)
            text = (await asyncio.to_thread(urlopen, f"http://127.0.0.1:{c.server.metrics.port}/metrics")).read().decode()
            assert 'jaxllm:xla_compiles_since_warmup{model_name="smollm2-135m"} 0.0' in text
            assert 'jaxllm:request_success_total{finished_reason="abort",model_name="smollm2-135m"} 2.0' in text
            if runner is not None:  # every bucket's step + prompt-logprobs pass + the block copy, all at warm-up
                assert runner.compile_count == real_engine.compiles_at_warmup == runner.warmup_compile_count
    run(main(), timeout=600)
    if traces is not None:
        assert runner.num_traces == traces, "serving compiled a new shape after warm-up"


@pytest.mark.slow
def test_real_model_fuzz(real_engine):
    """The proto fuzz (test_serving_fuzz.py) against SmolLM2 with a small budget
    (JAXLLM_FUZZ_REAL_EXAMPLES, default 12): documented statuses only, INVALID_ARGUMENT names
    a field, nothing compiled after warm-up, every block free after, still serving."""
    import grpc
    from hypothesis import given

    from proto_fuzz import fuzz_settings, generate_requests, sync_channel, threaded_server
    from serving.proto.jaxllm.v1 import generation_pb2_grpc as pb_grpc
    from test_serving_fuzz import check_error, check_stream

    runner = getattr(real_engine, "runner", None)
    traces = getattr(runner, "num_traces", None)
    vocab = real_engine.vocab_size
    # small caps keep each accepted request short on CPU; larger asks are INVALID_ARGUMENT
    with threaded_server(engine=real_engine, max_tokens_cap=3, max_n=2, watchdog_timeout=60,
                         health_probe_interval=5) as (ctx, call), sync_channel(ctx.port) as ch:
        stub = pb_grpc.GenerationStub(ch)

        @fuzz_settings(12, env="JAXLLM_FUZZ_REAL_EXAMPLES")
        @given(req=generate_requests(vocab))
        def fuzz(req):
            t0 = time.monotonic()
            try:
                responses = list(stub.Generate(req, timeout=120))
            except grpc.RpcError as e:
                check_error(e, f"Generate({req})")
            else:
                check_stream(req, responses)
            finally:
                took.append(time.monotonic() - t0)

        took: list[float] = []
        fuzz()
        print(f"real-model fuzz: {len(took)} requests, {sum(took):.1f}s, slowest {max(took):.1f}s")
        info = call(ctx.wait_blocks_free(timeout=60))
        assert info.free_kv_blocks == info.total_kv_blocks
        assert call(ctx.health_status()) == 1  # SERVING
    if traces is not None:
        assert runner.num_traces == traces, "a fuzzed request compiled a new shape after warm-up"


def test_real_model_http_openai_client_matches_offline(real_engine):
    """The OpenAI HTTP door over the same engine: greedy completions and chat through the
    official async client equal the offline LLM, usage counts its tokens, nothing compiles."""
    import openai

    from jaxllm import LLM, SamplingParams

    llm = LLM("smollm2-135m", engine=real_engine)
    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    offline = [o for o in llm.generate(PROMPTS[:2], greedy, use_tqdm=False)]
    chat_offline = llm.chat(CHAT, greedy, use_tqdm=False)[0]
    runner = getattr(real_engine, "runner", None)
    traces = getattr(runner, "num_traces", None)

    async def main():
        async with running_server(real_engine, http_port=0, watchdog_timeout=60, health_probe_interval=5) as c:
            base = f"http://127.0.0.1:{c.server.http_port}/v1"
            async with openai.AsyncOpenAI(base_url=base, api_key="unused", max_retries=0, timeout=300) as oc:
                comp = await oc.completions.create(model="smollm2-135m", prompt=PROMPTS[:2], max_tokens=8,
                                                   temperature=0)
                for choice, want in zip(comp.choices, offline):
                    assert choice.text == want.outputs[0].text
                assert comp.usage.completion_tokens == sum(len(w.outputs[0].token_ids) for w in offline)
                assert comp.usage.prompt_tokens == sum(len(w.prompt_token_ids) for w in offline)
                stream = await oc.chat.completions.create(model="smollm2-135m", messages=CHAT, max_tokens=8,
                                                          temperature=0, stream=True,
                                                          stream_options={"include_usage": True})
                chunks = [ch async for ch in stream]
                text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
                assert text == chat_offline.outputs[0].text
                assert chunks[-1].usage.prompt_tokens == len(chat_offline.prompt_token_ids)
                assert chunks[-1].usage.completion_tokens == len(chat_offline.outputs[0].token_ids)
                # structured outputs: OpenAI's response_format and vLLM's structured_outputs field
                schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                           "rank": {"type": "integer", "minimum": 1}},
                          "required": ["city", "rank"], "additionalProperties": False}
                js = await oc.chat.completions.create(
                    model="smollm2-135m", messages=CHAT, max_tokens=40, temperature=1.0, seed=3,
                    response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}})
                import json as _json

                import jsonschema
                jsonschema.validate(_json.loads(js.choices[0].message.content), schema)
                pick = await oc.completions.create(model="smollm2-135m", prompt=PROMPTS[0], max_tokens=8,
                                                   temperature=1.0, seed=5,
                                                   extra_body={"structured_outputs": {"choice": ["red", "blue"]}})
                assert pick.choices[0].text in ("red", "blue")
                with pytest.raises(openai.BadRequestError) as ei:
                    await oc.completions.create(model="smollm2-135m", prompt="x", max_tokens=2,
                                                extra_body={"structured_outputs": {"regex": "(a"}})
                assert ei.value.body["param"] == "structured_outputs"
            await c.wait_blocks_free(timeout=60)
    run(main(), timeout=600)
    if traces is not None:
        assert runner.num_traces == traces, "HTTP serving compiled a new shape after warm-up"
