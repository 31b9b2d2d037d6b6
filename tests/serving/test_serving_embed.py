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


def test_http_embeddings_openai_client_matches_offline_and_metrics():
    """POST /v1/embeddings through the official openai client: a list input comes back in order,
    equal to the offline engine, with unit norms and usage = prompt tokens; base64 decodes to the
    same floats; bad items are 400 naming input with every block free (all or nothing); /metrics
    on the HTTP port counts the requests. A generate server refuses /v1/embeddings naming model."""
    import base64

    import httpx
    import openai

    texts = ["first", "second prompt " * 3, "third"]

    async def main():
        async with running_server(make_engine(), http_port=0) as c:
            base = f"http://127.0.0.1:{c.server.http_port}"
            async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=30) as oc:
                r = await oc.embeddings.create(model="fake-embed", input=texts)
                b64 = await oc.embeddings.create(model="fake-embed", input=[[5, 6, 7]], encoding_format="base64")
                with pytest.raises(openai.BadRequestError) as ei:
                    await oc.embeddings.create(model="fake-embed", input=[[5], [10_000], [6]])
                assert ei.value.body["param"] == "input" and "10000" in ei.value.body["message"]
                with pytest.raises(openai.BadRequestError) as ei:
                    await oc.embeddings.create(model="fake-embed", input="x", dimensions=8)
                assert ei.value.body["param"] == "dimensions"
            async with httpx.AsyncClient() as h:
                raw = await h.post(base + "/v1/embeddings", json={"input": [5, 6, 7], "encoding_format": "base64"})
                metrics = (await h.get(base + "/metrics")).text
                # found by tests/serving/test_http_fuzz.py: generation on an embed server named the
                # engine's `task` as the param (no such request field); now `model`, as the mirror case
                wrong = [await h.post(base + path, json=body) for path, body in (
                    ("/v1/completions", {"prompt": "hi"}),
                    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": True}))]
            await c.wait_blocks_free()
            assert not c.server.door.active
            return r, b64, raw.json(), metrics, wrong

    r, b64, raw, metrics, wrong = run(main())
    for resp, path in zip(wrong, ("/v1/completions", "/v1/chat/completions")):
        err = resp.json()["error"]
        assert resp.status_code == 400 and err["param"] == "model", resp.text
        assert err["message"] == (f"model='fake-embed' is invalid for {path}: this server's task is 'embed' "
                                  "(start it with --task generate)")
    assert [d.index for d in r.data] == [0, 1, 2]
    for d, t in zip(r.data, texts):
        np.testing.assert_allclose(d.embedding, offline(t, PoolingParams()), rtol=1e-6)
        assert abs(np.linalg.norm(d.embedding) - 1.0) < 1e-5 and len(d.embedding) == FAKE_HIDDEN_SIZE
    want = offline({"prompt_token_ids": [5, 6, 7]}, PoolingParams())
    # asked for base64 explicitly, the client hands the string back (unasked, as for `r`, it
    # requests base64 itself and decodes it)
    np.testing.assert_allclose(np.frombuffer(base64.b64decode(b64.data[0].embedding), dtype="<f4"), want, rtol=1e-6)
    raw_vec = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(raw_vec, want, rtol=1e-6)
    tok = FakeTokenizer()
    assert r.usage.prompt_tokens == sum(len(tok.encode(t)) for t in texts) == r.usage.total_tokens
    assert "jaxllm:num_requests_running" in metrics  # the HTTP door serves the server's registry

    async def generate_server():
        async with running_server(make_engine("generate"), http_port=0) as c:
            async with httpx.AsyncClient() as h:
                return await h.post(f"http://127.0.0.1:{c.server.http_port}/v1/embeddings", json={"input": "hi"})

    resp = run(generate_server())
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "model"
    assert "--task embed" in resp.json()["error"]["message"]
