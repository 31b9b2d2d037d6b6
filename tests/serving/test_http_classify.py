"""vLLM's /classify and the cross-encoder /score, /rerank and gRPC Score on a loopback server around
one tiny real engine: a random Qwen3ForSequenceClassification with num_labels 1 and a word-level
tokenizer whose pair template is ``<bos> a <sep> b <sep>`` (tests/models/hf_tiny.py). References are
HF transformers' logits of the same token ids (the tokenizer's own single and pair encodings):
/classify's probs are their sigmoid (raw with ``activation: false``), /score and gRPC Score the
sigmoid of the pair's logit, /rerank the same scores sorted. Misuse is a 400 naming the field."""

from __future__ import annotations

import grpc
import httpx
import numpy as np
import pytest

from serving.proto.jaxllm.v1 import generation_pb2 as pb
from serving_helpers import run, running_server
from test_serving_embed import make_engine as fake_embed_engine
from tests.models.hf_tiny import hf_classifier_logits, make_tiny_hf_classifier

QUERY = "w9 w17 w30"
DOCS = ["w40 w41", "w99 w5 w7 w200 w11", "w30 w9", "w250"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from jaxllm.llm import LLM

    path = make_tiny_hf_classifier("qwen3", str(tmp_path_factory.mktemp("http_cls")), num_labels=1, tokenizer=True)
    llm = LLM(path, max_num_batched_tokens=32, max_num_seqs=4, max_model_len=64, kv_cache_memory_bytes=1 << 20)
    return path, llm.engine


def sigmoid(x):
    return 1 / (1 + np.exp(-np.asarray(x, np.float64)))


async def _serve(engine, calls):
    async with running_server(engine, http_port=0) as c:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{c.server.http_port}", timeout=60) as h:
            got = await calls(h, c)
        await c.wait_blocks_free()
        return got


def test_classify_score_rerank_and_grpc_score_equal_hf(model):
    path, engine = model

    async def calls(h, c):
        cls = await h.post("/classify", json={"input": [QUERY, *DOCS[:2]], "request_id": "c1"})
        raw = await h.post("/v1/classify", json={"input": [[1, 9, 17]], "activation": False})
        score = await h.post("/v1/score", json={"text_1": QUERY, "text_2": DOCS})
        rerank = await h.post("/rerank", json={"query": QUERY, "documents": DOCS, "top_n": 3})
        grpc_score = await c.stub.Score(pb.ScoreRequest(text_1=[QUERY], text_2=DOCS), timeout=30)
        return cls, raw, score, rerank, grpc_score

    cls, raw, score, rerank, grpc_score = run(_serve(engine, calls), timeout=120)
    tok = engine.tokenizer.hf
    singles = [tok(t)["input_ids"] for t in [QUERY, *DOCS[:2]]]
    pairs = [tok(QUERY, d)["input_ids"] for d in DOCS]
    ref = [l[0] for l in hf_classifier_logits(path, singles + [[1, 9, 17]] + pairs)]
    want_cls, want_raw, want_pairs = sigmoid(ref[:3]), ref[3], sigmoid(ref[4:])
    assert np.ptp(want_pairs) > 0.01  # distinct: the rerank order below is meaningful

    r = cls.json()
    assert cls.status_code == 200 and r["id"] == "classify-c1" and r["object"] == "list", r
    assert [d["index"] for d in r["data"]] == [0, 1, 2]
    assert all(d["label"] == "label_a" and d["num_classes"] == 1 for d in r["data"])
    np.testing.assert_allclose([d["probs"][0] for d in r["data"]], want_cls, atol=1e-5, rtol=0)
    assert r["usage"] == {"prompt_tokens": sum(map(len, singles)), "total_tokens": sum(map(len, singles)),
                          "completion_tokens": 0, "prompt_tokens_details": None}
    np.testing.assert_allclose(raw.json()["data"][0]["probs"], [want_raw], atol=1e-4, rtol=0)

    s = score.json()
    assert score.status_code == 200 and s["id"].startswith("score-"), s
    np.testing.assert_allclose([d["score"] for d in s["data"]], want_pairs, atol=1e-5, rtol=0)
    assert s["usage"]["prompt_tokens"] == sum(map(len, pairs))
    np.testing.assert_allclose(grpc_score.scores, want_pairs, atol=1e-5, rtol=0)
    assert grpc_score.prompt_tokens == sum(map(len, pairs))

    order = [int(i) for i in np.argsort(-want_pairs, kind="stable")[:3]]
    res = rerank.json()["results"]
    assert [x["index"] for x in res] == order and [x["document"]["text"] for x in res] == [DOCS[i] for i in order]
    np.testing.assert_allclose([x["relevance_score"] for x in res], want_pairs[order], atol=1e-5, rtol=0)


def test_grpc_classify_is_sigmoid_of_hf_and_equals_http_classify(model):
    """One label: gRPC Classify's probs are the sigmoid of HF's logit (raw with activation=false) and equal
    HTTP /classify's on the same server (the 3-label softmax case: tests/serving/test_grpc_classify.py)."""
    path, engine = model

    async def calls(h, c):
        got = await c.stub.Classify(pb.ClassifyRequest(texts=DOCS[:2], request_id="g"), timeout=30)
        raw = await c.stub.Classify(pb.ClassifyRequest(text=QUERY, activation=False), timeout=30)
        http = await h.post("/classify", json={"input": DOCS[:2]})
        return got, raw, http.json()

    got, raw, http = run(_serve(engine, calls), timeout=60)
    tok = engine.tokenizer.hf
    ids = [tok(t)["input_ids"] for t in [*DOCS[:2], QUERY]]
    ref = [l[0] for l in hf_classifier_logits(path, ids)]
    assert got.request_id == "g" and [r.index for r in got.results] == [0, 1]
    np.testing.assert_allclose([r.probs[0] for r in got.results], sigmoid(ref[:2]), atol=1e-5, rtol=0)
    assert all((r.label_index, r.label) == (0, "label_a") for r in got.results)
    assert [r.prompt_tokens for r in got.results] == [len(i) for i in ids[:2]]
    assert got.prompt_tokens == sum(len(i) for i in ids[:2])
    np.testing.assert_allclose(raw.results[0].probs, [ref[2]], atol=1e-4, rtol=0)
    np.testing.assert_allclose([d["probs"] for d in http["data"]], [list(r.probs) for r in got.results],
                               atol=1e-6, rtol=0)
    assert [d["label"] for d in http["data"]] == [r.label for r in got.results]


TEMPLATE = ("{% for m in messages %}w1 {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w2{% endif %}"
            "{{ extra | default('') }}")


def test_classify_messages_equal_the_rendered_conversation_as_input(model):
    """vLLM's ClassificationChatRequest: the conversation through the chat template (--chat-template here),
    one input. Reference: the rendering written out, tokenized without special tokens (the template's
    text is the prompt, vLLM's add_special_tokens=false), sent as token ids (whose probs the test above
    checks against HF)."""
    _, engine = model
    msgs = [{"role": "user", "content": "w9 w17"}, {"role": "assistant", "content": "w30"}]
    texts = ["w1 w9 w17 w1 w30 ", "w1 w9 w17 w1 w30 w2", "w1 w9 w17 w1 w30 w44"]
    bodies = [{"messages": msgs}, {"messages": msgs, "add_generation_prompt": True},
              {"messages": msgs, "chat_template_kwargs": {"extra": "w44"}, "activation": False}]
    tok = engine.tokenizer.hf
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]

    async def calls(h, c):
        got = [await h.post("/classify", json=b) for b in bodies]
        plain = [await h.post("/classify", json={"input": [i], **({"activation": False} if "activation" in b else {})})
                 for b, i in zip(bodies, ids)]
        return got, plain

    async def serve():
        async with running_server(engine, http_port=0, chat_template=TEMPLATE) as c:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{c.server.http_port}", timeout=60) as h:
                got = await calls(h, c)
            await c.wait_blocks_free()
            return got

    got, plain = run(serve(), timeout=120)
    assert len({tuple(i) for i in ids}) == 3
    for b, r, p, i in zip(bodies, got, plain, ids):
        assert r.status_code == 200 and p.status_code == 200, (b, r.text, p.text)
        assert r.json()["data"] == p.json()["data"] and r.json()["usage"]["prompt_tokens"] == len(i), b


def test_grpc_score_template_kwargs_without_a_template_name_the_proto_field(model):
    """HTTP's refusal (chat_template_kwargs without --chat-template) over gRPC names chat_template_kwargs_json."""
    _, engine = model

    async def main():
        async with running_server(engine) as c:
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await c.stub.Score(pb.ScoreRequest(text_1=[QUERY], text_2=DOCS[:1],
                                                   chat_template_kwargs_json='{"instruction": "w5"}'), timeout=30)
            return ei.value

    err = run(main(), timeout=60)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("chat_template_kwargs_json is invalid without a score template"), err.details()


def test_misuse_is_400_naming_the_field(model):
    _, engine = model

    async def calls(h, c):
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await c.stub.Embed(pb.EmbedRequest(text="w5"), timeout=10)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert ei.value.details().startswith("task='classify' is invalid for Embed")
        return [await h.post(p, json=b) for p, b in (
            ("/classify", {"input": []}),
            ("/classify", {"input": "w5", "activation": "yes"}),
            ("/v1/classify", {"input": [[1, 99999]]}),
            ("/v1/embeddings", {"input": "w5"}),
            ("/v1/score", {"text_1": ["w5", "w6"], "text_2": ["w7", "w8", "w9"]}))]

    got = run(_serve(engine, calls), timeout=60)
    params = [r.json()["error"]["param"] for r in got]
    assert [r.status_code for r in got] == [400] * 5, [r.text for r in got]
    assert params == ["input", "activation", "input", "model", "text_2"], params
    assert "this server's task is 'classify'" in got[3].json()["error"]["message"]


def test_classify_on_an_embedding_server_is_400_naming_model():
    async def calls(h, c):
        return await h.post("/classify", json={"input": "a"})

    resp = run(_serve(fake_embed_engine(), calls))
    err = resp.json()["error"]
    assert resp.status_code == 400 and err["param"] == "model"
    assert err["message"].startswith("model='fake-embed' is invalid for /classify: this server's task is 'embed'")


def test_score_on_a_multi_label_classifier_is_refused_naming_model():
    from serving.frontdoor import FrontDoorError
    from serving.openai_score import check_task

    class Info:  # a classify server's ModelInfo around a 3-label classifier
        name = "cls3"
        engine = type("E", (), {"task": "classify", "runner": type("R", (), {"model_config": type(
            "C", (), {"num_labels": 3, "labels": ("a", "b", "c")})})})

    with pytest.raises(FrontDoorError) as ei:
        check_task(Info, "/v1/score")
    assert str(ei.value) == ("model='cls3': num_labels=3 is invalid for /v1/score: a cross-encoder has exactly 1 "
                             "label (this classifier's labels: ['a', 'b', 'c']; classify it instead)")


def test_vllm_pooling_extras_on_the_cross_encoder(model):
    """vLLM's ``use_activation`` (the newer name of ``activation``): /classify's raw logits, and /score's
    and /rerank's raw pair logits, against HF's; ``add_special_tokens=false`` classifies the text without
    its BOS (HF's logits of the tokenizer's encoding without specials); the older and the newer name at
    different values are a 400 naming ``use_activation``."""
    path, engine = model

    async def calls(h, c):
        cls = await h.post("/classify", json={"input": DOCS[:2], "use_activation": False, "priority": 0})
        bare = await h.post("/classify", json={"input": DOCS[0], "add_special_tokens": False})
        score = await h.post("/score", json={"text_1": QUERY, "text_2": DOCS[:2], "use_activation": False})
        rerank = await h.post("/rerank", json={"query": QUERY, "documents": DOCS[:2], "use_activation": False,
                                               "cache_salt": "ignored", "mm_processor_kwargs": {}})
        both = await h.post("/classify", json={"input": "w5", "activation": True, "use_activation": False})
        return cls, bare, score, rerank, both

    cls, bare, score, rerank, both = run(_serve(engine, calls), timeout=60)
    tok = engine.tokenizer.hf
    singles = [tok(t)["input_ids"] for t in DOCS[:2]]
    no_bos = tok(DOCS[0], add_special_tokens=False)["input_ids"]
    pairs = [tok(QUERY, d)["input_ids"] for d in DOCS[:2]]
    assert len(no_bos) < len(singles[0])
    ref = [l[0] for l in hf_classifier_logits(path, singles + [no_bos] + pairs)]
    np.testing.assert_allclose([d["probs"][0] for d in cls.json()["data"]], ref[:2], atol=1e-4, rtol=0)
    np.testing.assert_allclose(bare.json()["data"][0]["probs"], sigmoid([ref[2]]), atol=1e-5, rtol=0)
    assert bare.json()["usage"]["prompt_tokens"] == len(no_bos)
    np.testing.assert_allclose([d["score"] for d in score.json()["data"]], ref[3:], atol=1e-4, rtol=0)
    res = sorted(rerank.json()["results"], key=lambda x: x["index"])
    np.testing.assert_allclose([x["relevance_score"] for x in res], ref[3:], atol=1e-4, rtol=0)
    assert both.status_code == 400 and both.json()["error"]["param"] == "use_activation", both.text
