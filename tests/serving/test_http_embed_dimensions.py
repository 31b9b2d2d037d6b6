"""/v1/embeddings ``dimensions`` (vLLM's Matryoshka truncation) on the real LLMEngine around the fake
runner in embed mode (tests/fakes): a Matryoshka engine returns the first d values of the pooled
vector, normalised after the cut (the reference: the whole unnormalised vector, cut and normalised
here in numpy); a value outside the model's ``matryoshka_dimensions``, past the embedding size, or
on a model that is not Matryoshka is a 400 naming ``dimensions``, the allowed values in the line."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from jaxllm.config import EngineConfig
from jaxllm.engine.engine import LLMEngine
from jaxllm.pooling_params import PoolingParams
from serving_helpers import run, running_server
from test_serving_embed import make_engine
from tests.fakes.fake_runner import FAKE_HIDDEN_SIZE, FakeRunner
from tests.fakes.fake_tokenizer import FakeIncrementalDetokenizer, FakeTokenizer

TEXTS = ["matryoshka doll", "a second, longer text to embed"]


def matryoshka_engine(dims: list[int] | None) -> LLMEngine:
    tok = FakeTokenizer()
    config = EngineConfig(model="fake-embed", block_size=4, max_model_len=64, max_num_batched_tokens=16,
                          max_num_seqs=4, task="embed", is_matryoshka=True, matryoshka_dimensions=dims)
    runner = FakeRunner(64, 4, vocab_size=tok.vocab_size, eos_token_ids=tok.eos_token_ids, task="embed")
    return LLMEngine(config, runner, tok, detokenizer_factory=FakeIncrementalDetokenizer)


def offline(engine: LLMEngine, prompt, params: PoolingParams) -> np.ndarray:
    engine.add_request("x", prompt, params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            return np.asarray(out.outputs.embedding, np.float64)


def cut(v: np.ndarray, d: int, normalize: bool = True) -> np.ndarray:
    v = v[:d]
    return v / np.linalg.norm(v) if normalize else v


def test_engine_cuts_then_normalises():
    e = matryoshka_engine([2, 4])
    whole = offline(e, TEXTS[0], PoolingParams(normalize=False))  # [4]
    assert whole.shape == (FAKE_HIDDEN_SIZE,) and abs(np.linalg.norm(whole[:2]) - 1) > 1e-3
    np.testing.assert_allclose(offline(e, TEXTS[0], PoolingParams(dimensions=2)), cut(whole, 2), rtol=1e-6)
    np.testing.assert_allclose(offline(e, TEXTS[0], PoolingParams(dimensions=2, normalize=False)),
                               cut(whole, 2, normalize=False), rtol=1e-6)
    # MEAN pools the whole vector first, then cuts
    mean = offline(e, TEXTS[1], PoolingParams(pooling_type="MEAN", normalize=False))
    np.testing.assert_allclose(offline(e, TEXTS[1], PoolingParams(pooling_type="MEAN", dimensions=2)),
                               cut(mean, 2), rtol=1e-6)
    for d, msg in [(3, "dimensions=3 is invalid: must be one of the model's matryoshka_dimensions [2, 4]"),
                   (0, "dimensions=0 is invalid: must be an integer >= 1")]:
        with pytest.raises(ValueError, match=msg.replace("[", r"\[").replace("]", r"\]")):
            e.add_request("bad", "hi", PoolingParams(dimensions=d))
    with pytest.raises(ValueError, match="dimensions=5 is invalid: must be <= the embedding size 4"):
        matryoshka_engine(None).add_request("bad", "hi", PoolingParams(dimensions=5))
    with pytest.raises(ValueError, match=r"dimensions=2 is invalid: this model is not a Matryoshka model .* \(4 dimensions\)"):
        make_engine().add_request("bad", "hi", PoolingParams(dimensions=2))


def test_http_dimensions():
    async def serve(engine, bodies):
        async with running_server(engine, http_port=0) as c:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{c.server.http_port}", timeout=30) as h:
                got = [await h.post("/v1/embeddings", json=b) for b in bodies]
            await c.wait_blocks_free()
            return got

    ok, two, bad, over = run(serve(matryoshka_engine(None), [
        {"input": TEXTS, "normalize": False}, {"input": TEXTS, "dimensions": 2},
        {"input": TEXTS, "dimensions": 0}, {"input": "x", "dimensions": 9}]))
    assert two.status_code == 200, two.text
    for whole, got in zip(ok.json()["data"], two.json()["data"]):
        np.testing.assert_allclose(got["embedding"], cut(np.asarray(whole["embedding"], np.float64), 2), rtol=1e-6)
    assert two.json()["usage"] == ok.json()["usage"]
    for resp, msg in [(bad, "dimensions=0 is invalid: must be an integer >= 1"),
                      (over, "dimensions=9 is invalid: must be <= the embedding size 4")]:
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "dimensions", resp.text
        assert resp.json()["error"]["message"] == msg

    (listed,) = run(serve(matryoshka_engine([2, 4]), [{"input": "x", "dimensions": 3}]))
    assert listed.status_code == 400 and listed.json()["error"]["param"] == "dimensions"
    assert listed.json()["error"]["message"] == ("dimensions=3 is invalid: must be one of the model's "
                                                 "matryoshka_dimensions [2, 4]")
    (plain,) = run(serve(make_engine(), [{"input": "x", "dimensions": 4}]))
    assert plain.status_code == 400 and plain.json()["error"]["param"] == "dimensions"
    assert plain.json()["error"]["message"].startswith("dimensions=4 is invalid: this model is not a Matryoshka model")
