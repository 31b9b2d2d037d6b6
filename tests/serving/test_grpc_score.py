"""gRPC Score (vLLM's score API for an embedding model) and Embed's ``dimensions`` on a loopback
server around the real LLMEngine with the fake runner in embed mode (tests/fakes): scores equal
the numpy cosine of the Embed RPC's vectors; bad input is INVALID_ARGUMENT naming the field."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from serving.proto.jaxllm.v1 import generation_pb2 as pb
from serving_helpers import run, running_server
from test_http_embed_dimensions import cut, matryoshka_engine
from test_serving_embed import embed_req, make_engine
from tests.fakes.fake_tokenizer import FakeTokenizer

QUERY = "which fruit is yellow"
DOCS = ["bananas", "the sky is blue", "lemons are yellow too"]


def cos(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_score_rpc_equals_numpy_cosine_of_embed():
    async def main():
        async with running_server(make_engine()) as c:
            vecs = {t: (await c.stub.Embed(embed_req(t), timeout=10)).embedding for t in [QUERY, *DOCS]}
            one_n = await c.stub.Score(pb.ScoreRequest(text_1=[QUERY], text_2=DOCS, request_id="s1"), timeout=10)
            n_n = await c.stub.Score(pb.ScoreRequest(text_1=DOCS, text_2=[QUERY] * 3), timeout=10)
            # an embedding server ignores the score template's variables (HTTP's rule), once they parse
            kw = await c.stub.Score(pb.ScoreRequest(text_1=[QUERY], text_2=DOCS,
                                                    chat_template_kwargs_json='{"instruction": "x"}'), timeout=10)
            assert list(kw.scores) == list(one_n.scores)
            errors = []
            for req in (pb.ScoreRequest(text_1=["a", "b"], text_2=["c", "d", "e"]),
                        pb.ScoreRequest(text_1=["a"]),
                        pb.ScoreRequest(text_1=["a"], text_2=["b"], truncate_prompt_tokens=0),
                        pb.ScoreRequest(text_1=["a"], text_2=["b"], chat_template_kwargs_json="{bad"),
                        pb.ScoreRequest(text_1=["a"], text_2=["b"], chat_template_kwargs_json="[1]")):
                with pytest.raises(grpc.aio.AioRpcError) as ei:
                    await c.stub.Score(req, timeout=5)
                errors.append((ei.value.code(), ei.value.details()))
            await c.wait_blocks_free()
            return vecs, one_n, n_n, errors

    vecs, one_n, n_n, errors = run(main())
    assert one_n.request_id == "s1"
    np.testing.assert_allclose(one_n.scores, [cos(vecs[QUERY], vecs[d]) for d in DOCS], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(n_n.scores, [cos(vecs[d], vecs[QUERY]) for d in DOCS], rtol=1e-9, atol=1e-12)
    assert n_n.request_id.startswith("score-")
    tok = FakeTokenizer()
    assert one_n.prompt_tokens == sum(len(tok.encode(t)) for t in [QUERY, *DOCS])
    assert all(code == grpc.StatusCode.INVALID_ARGUMENT for code, _ in errors)
    assert [m for _, m in errors] == [
        "text_1 has 2 items and text_2 has 3, which is invalid: the lengths must be 1:1, 1:N or N:N",
        "text_2=[] is invalid: must hold at least one text",
        "truncate_prompt_tokens=0 is invalid: must be an integer >= 1",
        "chat_template_kwargs_json is invalid: not JSON (Expecting property name enclosed in double quotes: "
        "line 1 column 2 (char 1))",
        "chat_template_kwargs_json is invalid: must be a JSON object, not list"]


def test_score_on_a_generate_server_and_embed_dimensions():
    async def generate():
        async with running_server(make_engine("generate")) as c:
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await c.stub.Score(pb.ScoreRequest(text_1=["a"], text_2=["b"]), timeout=5)
            return ei.value

    err = run(generate())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == ("model='fake-embed' is invalid for Score: this server's task is 'generate' "
                             "(scoring needs an embedding model or a cross-encoder: --task embed or classify)")

    async def matryoshka():
        async with running_server(matryoshka_engine([2, 4])) as c:
            whole = await c.stub.Embed(embed_req(QUERY, normalize=False), timeout=10)
            two = await c.stub.Embed(embed_req(QUERY, dimensions=2), timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await c.stub.Embed(embed_req(QUERY, dimensions=3), timeout=5)
            return whole, two, ei.value

    whole, two, bad = run(matryoshka())
    np.testing.assert_allclose(two.embedding, cut(np.asarray(whole.embedding, np.float64), 2), rtol=1e-6)
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad.details() == "dimensions=3 is invalid: must be one of the model's matryoshka_dimensions [2, 4]"
