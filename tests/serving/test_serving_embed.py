"""gRPC Embed on a loopback server around the real LLMEngine with the fake runner in embed mode
(tests/fakes): vectors equal the offline engine's, errors are INVALID_ARGUMENT naming the field,
and every KV block is free afterwards."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from jaxllm.config import EngineConfig
from jaxllm.engine.engine import LLMEngine
from jaxllm.pooling_params import PoolingParams
from serving.proto.jaxllm.v1 import generation_pb2 as pb
from serving_helpers import request, run, running_server
from tests.fakes.fake_runner import FAKE_HIDDEN_SIZE, FakeRunner
from tests.fakes.fake_tokenizer import FakeIncrementalDetokenizer, FakeTokenizer


def make_engine(task: str = "embed") -> LLMEngine:
    tok = FakeTokenizer()
    config = EngineConfig(model="fake-embed", block_size=4, max_model_len=64, max_num_batched_tokens=16,
                          max_num_seqs=4, task=task)
    runner = FakeRunner(64, 4, vocab_size=tok.vocab_size, eos_token_ids=tok.eos_token_ids, task=task)
    return LLMEngine(config, runner, tok, detokenizer_factory=FakeIncrementalDetokenizer)


def offline(prompt, params: PoolingParams) -> list[float]:
    e = make_engine()
    e.add_request("x", prompt, params)
    while e.has_unfinished_requests():
        for out in e.step():
            return out.outputs.embedding


def embed_req(text=None, token_ids=None, **kw) -> pb.EmbedRequest:
    req = pb.EmbedRequest(**kw)
    if token_ids is not None:
        req.token_ids.ids.extend(token_ids)
    elif text is not None:
        req.text = text
    return req


def test_embed_rpc_matches_offline_and_frees_blocks():
    texts = [f"embed me {i} " + "xyz" * i for i in range(12)]  # up to ~45 tokens: chunked (budget 16)

    async def main():
        async with running_server(make_engine(), max_queued_requests=100) as c:
            info = await c.stats()
            assert info.task == "embed" and list(info.request_buckets) == []  # no decode step compiled
            got = await asyncio.gather(*(c.stub.Embed(embed_req(t, pooling_type="MEAN" if i % 2 else "LAST"),
                                                      timeout=10) for i, t in enumerate(texts)))
            ids = await c.stub.Embed(embed_req(token_ids=[5, 6, 7], request_id="mine", normalize=False), timeout=10)
            await c.wait_blocks_free()
            return got, ids

    got, ids = run(main())
    tok = FakeTokenizer()
    for i, (t, r) in enumerate(zip(texts, got)):
        assert r.prompt_tokens == len(tok.encode(t)) and len(r.embedding) == FAKE_HIDDEN_SIZE
        want = offline(t, PoolingParams(pooling_type="MEAN" if i % 2 else "LAST"))
        np.testing.assert_allclose(r.embedding, want, rtol=1e-6)  # float32 on the wire
        assert abs(np.linalg.norm(r.embedding) - 1) < 1e-5
    assert ids.request_id == "mine" and ids.prompt_tokens == 3
    np.testing.assert_allclose(ids.embedding, offline([5, 6, 7], PoolingParams(normalize=False)), rtol=1e-6)


BAD = [
    (embed_req(), "prompt is invalid: set one of text or token_ids"),
    (embed_req(""), "text='' is invalid"),
    (embed_req(token_ids=[]), "token_ids=[] is invalid: must contain at least 1 token"),
    (embed_req(token_ids=[5, 10_000]), "token_ids contains 10000, which is invalid"),
    (embed_req("a" * 70), "prompt length=70 tokens is invalid: must be <= max_model_len=64"),
    (embed_req("hi", pooling_type="CLS"), "pooling_type='CLS' is invalid"),
    (embed_req("hi", truncate_prompt_tokens=0), "truncate_prompt_tokens=0 is invalid"),
    (embed_req("hi", request_id="x" * 300), "request_id of length 300 is invalid"),
]


@pytest.mark.parametrize("req,msg", BAD, ids=[m.split(" ")[0] for _, m in BAD])
def test_embed_bad_input_is_invalid_argument(req, msg):
    async def main():
        async with running_server(make_engine()) as c:
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await c.stub.Embed(req, timeout=5)
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, ei.value.details()
            assert msg in ei.value.details(), ei.value.details()
            # a generation request on an embed server: the engine names task
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                [r async for r in c.stub.Generate(request("hi", max_tokens=2), timeout=5)]
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "task='embed' is invalid for SamplingParams" in ei.value.details()
            assert (await c.stub.Embed(embed_req("still serving"), timeout=5)).prompt_tokens > 0
            await c.wait_blocks_free()
            assert c.server.monitor.probe_ok and c.server.monitor.probe_failures == 0  # embedding probes

    run(main())


def test_embed_on_a_generate_server_names_task():
    async def main():
        async with running_server(make_engine(task="generate")) as c:
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await c.stub.Embed(embed_req("hi"), timeout=5)
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "task='generate' is invalid for PoolingParams" in ei.value.details()
            assert (await c.stats()).task == "generate"
            await c.wait_blocks_free()

    run(main())


def test_embed_needs_the_api_key():
    async def main():
        async with running_server(make_engine(), api_key="sekret") as c:
            for md in (None, (("authorization", "Bearer wrong"),)):
                with pytest.raises(grpc.aio.AioRpcError) as ei:
                    await c.stub.Embed(embed_req("hi"), metadata=md, timeout=5)
                assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
            r = await c.stub.Embed(embed_req("hi"), metadata=(("authorization", "Bearer sekret"),), timeout=5)
            assert r.prompt_tokens == 2

    run(main())


def test_embed_many_is_ordered_and_all_or_nothing():
    """serving.embed.embed_many (what an HTTP /v1/embeddings handler calls with OpenAI's input list)."""
    from serving.embed import embed_many

    texts = ["first", "second prompt " * 3, "third"]

    async def main():
        async with running_server(make_engine()) as c:
            ae = c.server.async_engine
            outs = await embed_many(ae, "req", texts, PoolingParams(pooling_type="MEAN"))
            with pytest.raises(ValueError, match="prompt_token_ids\\[0\\]=10000 is invalid"):
                await embed_many(ae, "bad", ["ok " * 20, {"prompt_token_ids": [10_000]}, "ok"])
            await c.wait_blocks_free()
            return outs

    outs = run(main())
    assert [o.request_id for o in outs] == ["req-0", "req-1", "req-2"]
    for o, t in zip(outs, texts):
        np.testing.assert_allclose(o.outputs.embedding, offline(t, PoolingParams(pooling_type="MEAN")), rtol=1e-6)
