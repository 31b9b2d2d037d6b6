"""vLLM's /score and /rerank on the HTTP door of an embedding server (the real LLMEngine around the
fake runner in embed mode, tests/fakes): every score equals the cosine, computed here in numpy, of
the two texts' /v1/embeddings vectors; rerank orders, cuts (top_n) and drops documents
(return_documents) as the reference says; bad requests are 400 naming the field, every KV block
free afterwards."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from serving_helpers import run, running_server
from test_serving_embed import make_engine
from tests.fakes.fake_tokenizer import FakeTokenizer

QUERY = "what is the capital of france"
DOCS = ["paris is the capital", "bananas are yellow", "the eiffel tower", "capital letters", "x"]


def cos(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


async def _serve(engine, calls, **cfg):
    """Run ``calls(h, base)`` against a loopback HTTP server (``cfg``: ServerConfig fields); every block
    free afterwards."""
    async with running_server(engine, http_port=0, **cfg) as c:
        base = f"http://127.0.0.1:{c.server.http_port}"
        async with httpx.AsyncClient(base_url=base, timeout=30) as h:
            got = await calls(h)
        await c.wait_blocks_free()
        assert not c.server.door.active
        return got


def test_score_and_rerank_equal_numpy_cosine_of_the_embeddings():
    pairs_1 = ["first text", "second one here"]
    pairs_2 = ["a reply", "another reply entirely"]

    async def calls(h):
        emb = (await h.post("/v1/embeddings", json={"input": [QUERY, *DOCS, *pairs_1, *pairs_2]})).json()
        one = await h.post("/score", json={"text_1": QUERY, "text_2": DOCS[0]})
        one_n = await h.post("/v1/score", json={"text_1": [QUERY], "text_2": DOCS, "request_id": "mine"})
        n_n = await h.post("/v1/score", json={"text_1": pairs_1, "text_2": pairs_2}, headers={"X-Request-Id": "hdr"})
        reranks = [await h.post(p, json={"query": QUERY, "documents": DOCS}) for p in
                   ("/rerank", "/v1/rerank", "/v2/rerank")]
        top = await h.post("/v1/rerank", json={"query": QUERY, "documents": DOCS, "top_n": 2,
                                               "return_documents": False, "request_id": "r1"})
        return emb, one, one_n, n_n, reranks, top

    emb, one, one_n, n_n, reranks, top = run(_serve(make_engine(), calls))
    vec = {t: d["embedding"] for t, d in zip([QUERY, *DOCS, *pairs_1, *pairs_2], emb["data"])}
    want = [cos(vec[QUERY], vec[d]) for d in DOCS]
    assert len({round(w, 9) for w in want}) == len(DOCS)  # distinct: the order below is meaningful
    tok = FakeTokenizer()
    ntok = {t: len(tok.encode(t)) for t in vec}

    r = one.json()
    assert one.status_code == 200 and r["object"] == "list" and r["id"].startswith("score-"), r
    assert [d["index"] for d in r["data"]] == [0] and r["data"][0]["object"] == "score"
    assert r["data"][0]["score"] == pytest.approx(want[0], rel=1e-9, abs=1e-12)
    assert r["usage"] == {"prompt_tokens": ntok[QUERY] + ntok[DOCS[0]], "total_tokens": ntok[QUERY] + ntok[DOCS[0]],
                          "completion_tokens": 0}

    r = one_n.json()
    assert r["id"] == "score-mine" and [d["index"] for d in r["data"]] == list(range(len(DOCS)))
    np.testing.assert_allclose([d["score"] for d in r["data"]], want, rtol=1e-9, atol=1e-12)
    assert r["usage"]["prompt_tokens"] == ntok[QUERY] + sum(ntok[d] for d in DOCS)  # the query embedded once

    r = n_n.json()
    assert r["id"] == "score-hdr" and n_n.headers["x-request-id"] == "hdr"
    np.testing.assert_allclose([d["score"] for d in r["data"]],
                               [cos(vec[a], vec[b]) for a, b in zip(pairs_1, pairs_2)], rtol=1e-9, atol=1e-12)

    order = sorted(range(len(DOCS)), key=lambda i: -want[i])
    for resp in reranks:
        r = resp.json()
        assert resp.status_code == 200 and r["id"].startswith("rerank-") and set(r) == {"id", "model", "usage", "results"}
        assert [x["index"] for x in r["results"]] == order
        assert [x["document"] for x in r["results"]] == [{"text": DOCS[i]} for i in order]
        np.testing.assert_allclose([x["relevance_score"] for x in r["results"]], [want[i] for i in order],
                                   rtol=1e-9, atol=1e-12)
        assert r["usage"] == {"prompt_tokens": ntok[QUERY] + sum(ntok[d] for d in DOCS),
                              "total_tokens": ntok[QUERY] + sum(ntok[d] for d in DOCS)}
        assert r["model"] == "fake-embed"
    r = top.json()
    assert r["id"] == "rerank-r1" and [x["index"] for x in r["results"]] == order[:2]
    assert all(set(x) == {"index", "relevance_score"} for x in r["results"])  # return_documents=false


def test_an_embedding_server_ignores_the_score_template():
    """vLLM's rule: --chat-template is a cross-encoder's score template; an embedding server embeds each
    text alone, so the template (here one that cannot render) and chat_template_kwargs change nothing and
    fail nothing: the scores are the cosines of the texts' embeddings."""
    docs = DOCS[:3]

    async def calls(h):
        emb = (await h.post("/v1/embeddings", json={"input": [QUERY, *docs]})).json()
        score = await h.post("/v1/score", json={"text_1": QUERY, "text_2": docs})
        rerank = await h.post("/rerank", json={"query": QUERY, "documents": docs,
                                               "chat_template_kwargs": {"instruction": "x"}})
        return emb, score, rerank

    emb, score, rerank = run(_serve(make_engine(), calls, chat_template="{{ messages | no_such_filter }}"))
    vec = [d["embedding"] for d in emb["data"]]
    want = [cos(vec[0], v) for v in vec[1:]]
    assert score.status_code == 200 and rerank.status_code == 200, (score.text, rerank.text)
    np.testing.assert_allclose([d["score"] for d in score.json()["data"]], want, rtol=1e-9, atol=1e-12)
    got = {x["index"]: x["relevance_score"] for x in rerank.json()["results"]}
    np.testing.assert_allclose([got[i] for i in range(len(docs))], want, rtol=1e-9, atol=1e-12)


BAD = [
    ("/v1/score", {"text_1": ["a", "b"], "text_2": ["c", "d", "e"]}, "text_2",
     "text_1 has 2 items and text_2 has 3, which is invalid: the lengths must be 1:1, 1:N or N:N"),
    ("/v1/score", {"text_1": [], "text_2": "c"}, "text_1", "text_1=[] is invalid: must hold at least one text"),
    ("/v1/score", {"text_1": "a", "text_2": []}, "text_2", "text_2=[] is invalid: must hold at least one text"),
    ("/v1/score", {"text_1": "a", "text_2": ["c", ""]}, "text_2", "text_2[1]='' is invalid: the text must be non-empty"),
    ("/v1/score", {"text_1": "a", "text_2": "b", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens",
     "truncate_prompt_tokens=0 is invalid: must be an integer >= 1"),
    ("/v1/score", {"text_1": "a", "text_2": ["b", "a" * 70]}, "prompt",
     "prompt length=70 tokens is invalid: must be <= max_model_len=64"),
    ("/v1/score", {"text_1": "a"}, "text_2", "text_2 is required: a score body holds one pair (text_1 + text_2, "
     "data_1 + data_2, queries + items, queries + documents); got only text_1"),
    ("/v1/score", {"queries": "q", "text_2": "b"}, "text_1", "text_1 is required"),
    ("/score", {"queries": "q"}, "documents", "documents is required"),
    ("/score", {"data_1": ["a", "b"], "data_2": ["c", "d", "e"]}, "data_2",
     "data_1 has 2 items and data_2 has 3, which is invalid"),
    ("/v1/score", {"queries": [], "items": "c"}, "queries", "queries=[] is invalid"),
    ("/v1/score", {"text_1": "a", "text_2": "b", "query": "x"}, "query", None),  # rerank's name: unknown here
    ("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": -1}, "top_n",
     "top_n=-1 is invalid: must be >= 0 (0: every document)"),
    ("/v2/rerank", {"query": "q", "documents": []}, "documents", "documents=[] is invalid: must hold at least one text"),
    ("/rerank", {"query": "", "documents": ["a"]}, "query", "query='' is invalid: the text must be non-empty"),
    ("/rerank", {"query": "q", "documents": "a"}, "documents", None),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "request_id": "bad id"}, "request_id", "request_id='bad id' is invalid"),
    ("/v1/score", {"text_1": "a", "text_2": "b", "model": "other"}, "model", "model='other' does not exist"),
]


def test_vllms_other_pair_names_score_as_text_1_and_text_2_in_vllms_precedence():
    """vLLM's ScoreRequest is a union of four bodies (queries + documents, queries + items, data_1 + data_2,
    text_1 + text_2), the first whole pair read. Reference: the text_1/text_2 body of the same pair (its
    scores are the numpy cosine: the test above)."""
    a, b = [QUERY], DOCS[:3]
    x, y = ["an unrelated query"], ["zzz", "yyy", "www"]
    bodies = [{"data_1": a, "data_2": b}, {"queries": a, "documents": b}, {"queries": a, "items": b},
              {"queries": a, "documents": b, "text_1": x, "text_2": y},  # queries + documents first
              {"queries": a, "items": b, "data_1": x, "data_2": y},  # then queries + items
              {"data_1": a, "data_2": b, "text_1": x, "text_2": y},  # then data_1 + data_2
              {"queries": a, "documents": b, "items": y}]

    async def calls(h):
        ref = (await h.post("/score", json={"text_1": a, "text_2": b})).json()
        other = (await h.post("/score", json={"text_1": x, "text_2": y})).json()
        return ref, other, [await h.post("/v1/score", json=body) for body in bodies]

    ref, other, got = run(_serve(make_engine(), calls))
    want = [d["score"] for d in ref["data"]]
    assert want != [d["score"] for d in other["data"]]  # the losing pair would answer otherwise
    for body, resp in zip(bodies, got):
        assert resp.status_code == 200, (body, resp.text)
        assert [d["score"] for d in resp.json()["data"]] == want, body
        assert resp.json()["usage"] == ref["usage"]


def test_bad_score_and_rerank_requests_are_400_naming_the_field():
    async def calls(h):
        got = [await h.post(path, json=body) for path, body, _, _ in BAD]
        still = await h.post("/v1/rerank", json={"query": "q", "documents": ["a", "b"]})
        return got, still

    got, still = run(_serve(make_engine(), calls))
    for resp, (path, body, param, msg) in zip(got, BAD):
        err = resp.json()["error"]
        want_status = 404 if param == "model" else 400
        assert resp.status_code == want_status and err["param"] == param, (path, body, resp.text)
        if msg is not None:
            assert msg in err["message"], (path, err["message"])
    assert still.status_code == 200 and len(still.json()["results"]) == 2


def test_a_generating_server_refuses_score_and_rerank_naming_model():
    async def calls(h):
        return [await h.post(p, json=b) for p, b in (("/score", {"text_1": "a", "text_2": "b"}),
                                                     ("/v2/rerank", {"query": "q", "documents": ["a"]}))]

    for resp, path in zip(run(_serve(make_engine("generate"), calls)), ("/score", "/v2/rerank")):
        err = resp.json()["error"]
        assert resp.status_code == 400 and err["param"] == "model", resp.text
        assert err["message"] == (f"model='fake-embed' is invalid for {path}: this server's task is 'generate' "
                                  "(scoring needs an embedding model or a cross-encoder: --task embed or classify)")
