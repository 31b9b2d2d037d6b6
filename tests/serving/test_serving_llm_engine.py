"""The real ``LLMEngine`` (host scheduler, KV cache manager, output processor) behind the
server, with the fake runner/tokenizer of tests/fakes: the drop-in check for the service."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from jaxllm.config import EngineConfig
from jaxllm.engine.engine import LLMEngine
from jaxllm.sampling_params import SamplingParams
from serving_helpers import collect, request, run, running_server
from tests.fakes.fake_runner import FakeRunner
from tests.fakes.fake_tokenizer import FakeIncrementalDetokenizer, FakeTokenizer


def make_engine() -> LLMEngine:
    tok = FakeTokenizer()
    config = EngineConfig(model="fake-llm", block_size=4, max_model_len=128,
                          max_num_batched_tokens=64, max_num_seqs=8)
    runner = FakeRunner(256, 4, vocab_size=tok.vocab_size, eos_token_ids=tok.eos_token_ids)
    return LLMEngine(config, runner, tok, detokenizer_factory=FakeIncrementalDetokenizer)


def offline(prompts: list[str], params: SamplingParams) -> dict[str, object]:
    eng = make_engine()
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, params)
    finals = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                finals[out.request_id] = out
    return finals


def test_llm_engine_behind_the_server():
    prompts = [f"request {i}: tell me about {'abc' * (i % 4)}" for i in range(16)]
    want = offline(prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))

    async def main():
        async with running_server(make_engine(), max_queued_requests=100) as c:
            async def keep(i):
                return collect(await c.generate(prompt=prompts[i], temperature=0.0, max_tokens=12,
                                                ignore_eos=True))

            async def cancel(i):
                call = c.stub.Generate(request(prompt=f"cancel me {i}", max_tokens=100,
                                               ignore_eos=True))
                await call.read()
                call.cancel()

            results = await asyncio.gather(*(keep(i) for i in range(16)),
                                           *(cancel(i) for i in range(8)))
            for i, res in enumerate(results[:16]):
                w = want[str(i)].outputs[0]
                assert res["tokens"][0] == w.token_ids and res["texts"][0] == w.text
                assert res["usage"].completion_tokens == 12
            info = await c.wait_blocks_free()
            assert info.total_kv_blocks == 256 and info.model == "fake-llm"
            # n > 1 and the engine's own validation messages
            res = collect(await c.generate(prompt="two samples", n=2, max_tokens=5, ignore_eos=True,
                                           temperature=1.0, seed=7))
            assert set(res["texts"]) == {0, 1}
            for kw, part in ((dict(prompt="z" * 200), "max_model_len=128"),
                             (dict(prompt=None, token_ids=[3, 500]), "500")):
                with pytest.raises(grpc.aio.AioRpcError) as ei:
                    await c.generate(**kw)
                assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and part in ei.value.details()
            await c.wait_blocks_free()
    run(main())
