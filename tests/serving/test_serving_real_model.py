"""The real SmolLM2-135M engine behind the server (slow: one model load + warm-up).

Runs in ``make test`` (deselect with ``-m "not slow"``). Checks greedy
equality with the offline ``LLM`` on the same engine (text and chat), concurrent streams,
cancellation freeing every KV block, and that steady-state serving compiles nothing after warm-up.
"""

from __future__ import annotations

import asyncio

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
        async with running_server(real_engine, watchdog_timeout=60, health_probe_interval=5) as c:
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
    run(main(), timeout=600)
    if traces is not None:
        assert runner.num_traces == traces, "serving compiled a new shape after warm-up"


@pytest.mark.slow
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
            await c.wait_blocks_free(timeout=60)
    run(main(), timeout=600)
    if traces is not None:
        assert runner.num_traces == traces, "HTTP serving compiled a new shape after warm-up"
