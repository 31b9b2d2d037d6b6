"""gRPC Classify (vLLM's classify, HTTP /classify's code) on a loopback server around one tiny real engine:
a random LlamaForSequenceClassification with 3 labels and a word-level tokenizer (tests/models/hf_tiny.py),
serving gRPC and HTTP at once. References are HF transformers' logits of the same token ids: Classify's
probs are their softmax (the raw logits with ``activation=false``), its label the argmax's ``id2label`` name
from the checkpoint's config.json, and the same inputs through HTTP /classify answer the same. Bad input is
INVALID_ARGUMENT naming the field, value and limit, and the engine keeps serving with every KV block free.
The one-label (sigmoid) case: tests/serving/test_http_classify.py."""

from __future__ import annotations

import asyncio
import json
import os

import grpc
import httpx
import numpy as np
import pytest

from serving.client import AsyncGenerationClient, GenerationClient
from serving.proto.jaxllm.v1 import generation_pb2 as pb
from serving_helpers import run, running_server
from test_serving_embed import make_engine as fake_engine
from tests.models.hf_tiny import hf_classifier_logits, make_tiny_hf_classifier

TEXTS = ["w9 w17 w30", "w12 w13 w14 w15 w16 w17", "w40 w41"]
IDS = [[1, 9, 17], [5, 6, 7, 8, 9]]
LONG = " ".join(f"w{5 + i}" for i in range(70))  # 71 tokens with <bos>: over max_model_len=64


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from jaxllm.llm import LLM

    path = make_tiny_hf_classifier("llama", str(tmp_path_factory.mktemp("grpc_cls")), num_labels=3, tokenizer=True)
    llm = LLM(path, max_num_batched_tokens=32, max_num_seqs=4, max_model_len=64, kv_cache_memory_bytes=1 << 20)
    return path, llm.engine


def softmax(x):
    e = np.exp(np.asarray(x, np.float64) - np.max(x))
    return e / e.sum()


def test_classify_equals_hf_softmax_and_http_classify(model):
    path, engine = model

    async def main():
        async with running_server(engine, http_port=0) as c:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{c.server.http_port}", timeout=60) as h, \
                    AsyncGenerationClient(c.target, timeout=30) as ac:
                texts = await ac.classify(TEXTS, request_id="g1")
                raw = await c.stub.Classify(pb.ClassifyRequest(token_id_lists=[pb.TokenIds(ids=i) for i in IDS],
                                                               activation=False), timeout=30)
                cut = await c.stub.Classify(pb.ClassifyRequest(text=LONG, truncate_prompt_tokens=8), timeout=30)

                def sync_client():
                    with GenerationClient(c.target, timeout=30) as sc:
                        return sc.classify(IDS[0])

                one = await asyncio.to_thread(sync_client)
                http = (await h.post("/classify", json={"input": TEXTS})).json()
                http_raw = (await h.post("/classify", json={"input": IDS, "activation": False})).json()
            await c.wait_blocks_free()
            return texts, raw, cut, one, http, http_raw

    texts, raw, cut, one, http, http_raw = run(main(), timeout=120)
    tok = engine.tokenizer.hf
    singles = [tok(t)["input_ids"] for t in TEXTS]
    long_ids = tok(LONG)["input_ids"]
    ref = hf_classifier_logits(path, singles + IDS + [long_ids[-8:]])
    with open(os.path.join(path, "config.json")) as f:
        id2label = {int(k): v for k, v in json.load(f)["id2label"].items()}
    best = [int(np.argmax(r)) for r in ref]
    assert len(set(best[:3])) > 1  # the inputs' predicted labels differ: label_index is not a constant

    assert texts.request_id == "g1" and [r.index for r in texts.results] == [0, 1, 2]
    for r, want, b, ids in zip(texts.results, ref[:3], best, singles):
        np.testing.assert_allclose(r.probs, softmax(want), atol=1e-5, rtol=0)
        assert (r.label_index, r.label, r.prompt_tokens) == (b, id2label[b], len(ids))
    assert texts.prompt_tokens == sum(map(len, singles))
    assert raw.request_id.startswith("classify-") and len(raw.results) == 2
    for r, want in zip(raw.results, ref[3:5]):
        np.testing.assert_allclose(r.probs, want, atol=1e-4, rtol=0)  # activation=false: the raw logits
    assert [r.label_index for r in raw.results] == best[3:5]
    assert cut.results[0].prompt_tokens == 8 and cut.prompt_tokens == 8  # the last 8 of 71 tokens
    np.testing.assert_allclose(cut.results[0].probs, softmax(ref[5]), atol=1e-5, rtol=0)
    np.testing.assert_allclose(one.results[0].probs, softmax(ref[3]), atol=1e-5, rtol=0)

    # HTTP /classify on the same server: the same probs, labels and usage
    assert [d["label"] for d in http["data"]] == [r.label for r in texts.results]
    np.testing.assert_allclose([d["probs"] for d in http["data"]], [list(r.probs) for r in texts.results],
                               atol=1e-6, rtol=0)
    assert http["usage"]["prompt_tokens"] == texts.prompt_tokens
    np.testing.assert_allclose([d["probs"] for d in http_raw["data"]], [list(r.probs) for r in raw.results],
                               atol=1e-6, rtol=0)


def _token_ids(ids):
    req = pb.ClassifyRequest()
    req.token_ids.SetInParent()
    req.token_ids.ids.extend(ids)
    return req


BAD = [
    (pb.ClassifyRequest(), "prompt is invalid: set exactly one of text, token_ids, texts or token_id_lists"),
    (pb.ClassifyRequest(text="w5", texts=["w6"]),
     "prompt is invalid: set exactly one of text, token_ids, texts or token_id_lists (got text and texts)"),
    (pb.ClassifyRequest(text=""), "text='' is invalid: the prompt must be non-empty"),
    (pb.ClassifyRequest(texts=["w5", ""]), "texts[1]='' is invalid: the prompt must be non-empty"),
    (_token_ids([]), "token_ids=[] is invalid: must contain at least 1 token"),
    (_token_ids([5, 256]), "token_ids contains 256, which is invalid: token ids must be in [0, 256)"),
    (pb.ClassifyRequest(token_id_lists=[pb.TokenIds(ids=[5]), pb.TokenIds(ids=[-1])]),
     "token_id_lists[1] contains -1, which is invalid: token ids must be in [0, 256)"),
    (pb.ClassifyRequest(texts=["w5", LONG]), "prompt length=71 tokens is invalid: must be <= max_model_len=64"),
    (pb.ClassifyRequest(texts=["w5"] * 5), "texts has 5 items, which is invalid: exceeds the server limit "
                                           "--max-queued-requests=4"),
    (pb.ClassifyRequest(text="w5", truncate_prompt_tokens=0),
     "truncate_prompt_tokens=0 is invalid: must be an integer >= 1"),
    (pb.ClassifyRequest(text="w5", request_id="x" * 300),
     "request_id of length 300 is invalid: must be at most 256 characters"),
]


def test_bad_input_is_invalid_argument_naming_the_field_and_serving_goes_on(model):
    _, engine = model
    key = (("authorization", "Bearer k"),)

    async def main():
        async with running_server(engine, api_key="k", max_queued_requests=4) as c:
            errors = []
            for req, _ in BAD:
                with pytest.raises(grpc.aio.AioRpcError) as ei:
                    await c.stub.Classify(req, metadata=key, timeout=30)
                errors.append((ei.value.code(), ei.value.details()))
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await c.stub.Classify(pb.ClassifyRequest(text="w5"), timeout=30)  # no key
            errors.append((ei.value.code(), None))
            good = await c.stub.Classify(pb.ClassifyRequest(texts=["w5", "w6 w7"]), metadata=key, timeout=30)
            # every block free, nothing running: the long prompt's admitted sibling was aborted
            await c.wait_blocks_free(metadata=key)
            assert not c.server.door.active
            return errors, good

    errors, good = run(main(), timeout=120)
    assert [m for _, m in errors[:-1]] == [m for _, m in BAD]
    assert all(code == grpc.StatusCode.INVALID_ARGUMENT for code, _ in errors[:-1])
    assert errors[-1][0] == grpc.StatusCode.UNAUTHENTICATED
    assert [r.prompt_tokens for r in good.results] == [2, 3] and all(len(r.probs) == 3 for r in good.results)


@pytest.mark.parametrize("task", ["embed", "generate"])
def test_classify_on_a_server_of_another_task_names_it(task):
    async def main():
        async with running_server(fake_engine(task)) as c:
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await c.stub.Classify(pb.ClassifyRequest(text="hi"), timeout=5)
            await c.wait_blocks_free()
            return ei.value

    err = run(main())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == (f"model='fake-embed' is invalid for Classify: this server's task is {task!r} "
                             "(classify needs a *ForSequenceClassification model: start it with --task classify)")
