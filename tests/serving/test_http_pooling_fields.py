"""vLLM's pooling-body extras (serving/openai_pooling_fields.py) on /v1/embeddings, /score, /rerank and
/tokenize of an embedding server: the real LLMEngine around the fake runner in embed mode (tests/fakes),
under the priority policy. References: the same server's float answer decoded from the base64 bytes with
numpy (bfloat16 against ``ml_dtypes``' own rounding), the same request without the field (ignored
fields; the older ``normalize`` name), the priorities the engine's ``add_request`` received, the
fake tokenizer's BOS. The cross-encoder's ``use_activation`` / ``add_special_tokens``:
tests/serving/test_http_classify.py."""

from __future__ import annotations

import base64
import sys

import httpx
import ml_dtypes
import numpy as np

from jaxllm.config import EngineConfig
from jaxllm.engine.engine import LLMEngine
from serving_helpers import run, running_server
from tests.fakes.fake_runner import FakeRunner
from tests.fakes.fake_tokenizer import FakeIncrementalDetokenizer, FakeTokenizer

TEXT = "the capital of france"


def make_engine(add_bos: bool = False) -> LLMEngine:
    tok = FakeTokenizer(add_bos=add_bos)
    config = EngineConfig(model="fake-embed", block_size=4, max_model_len=64, max_num_batched_tokens=16,
                          max_num_seqs=4, task="embed", scheduling_policy="priority")
    runner = FakeRunner(64, 4, vocab_size=tok.vocab_size, eos_token_ids=tok.eos_token_ids, task="embed")
    return LLMEngine(config, runner, tok, detokenizer_factory=FakeIncrementalDetokenizer)


def serve(calls, add_bos: bool = False):
    engine = make_engine(add_bos)
    seen: list[int] = []
    add = engine.add_request

    def recording_add(request_id, prompt, params=None, *args, **kw):
        seen.append(kw.get("priority", args[2] if len(args) > 2 else 0))
        return add(request_id, prompt, params, *args, **kw)

    engine.add_request = recording_add

    async def go():
        async with running_server(engine, http_port=0) as c:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{c.server.http_port}", timeout=30) as h:
                got = await calls(h)
            await c.wait_blocks_free()
            return got

    return run(go()), seen, engine


def test_base64_embed_dtype_and_endianness_decode_to_the_float_answer():
    combos = [(d, e) for d in ("float32", "float16", "bfloat16") for e in ("little", "big", "native")]

    async def calls(h):
        flt = (await h.post("/v1/embeddings", json={"input": TEXT})).json()["data"][0]["embedding"]
        got = {}
        for d, e in combos:
            r = await h.post("/v1/embeddings", json={"input": TEXT, "encoding_format": "base64", "embed_dtype": d,
                                                    "endianness": e})
            assert r.status_code == 200, r.text
            got[d, e] = base64.b64decode(r.json()["data"][0]["embedding"])
        default = (await h.post("/v1/embeddings", json={"input": TEXT, "encoding_format": "base64"})).json()
        return flt, got, base64.b64decode(default["data"][0]["embedding"])

    (flt, got, default), _, _ = serve(calls)
    x = np.asarray(flt, np.float32)
    native = "<" if sys.byteorder == "little" else ">"
    for (d, e), raw in got.items():
        order = {"little": "<", "big": ">", "native": native}[e]
        if d == "bfloat16":  # the float32's upper half, rounded to nearest even (ml_dtypes' conversion)
            bits = np.frombuffer(raw, order + "u2")
            np.testing.assert_array_equal(bits, x.astype(ml_dtypes.bfloat16).view(np.uint16))
            np.testing.assert_allclose((bits.astype(np.uint32) << 16).view(np.float32), x, rtol=2 ** -8)
        else:
            dec = np.frombuffer(raw, order + ("f4" if d == "float32" else "f2"))
            np.testing.assert_array_equal(dec, x.astype(dec.dtype))
        assert len(raw) == x.size * (4 if d == "float32" else 2)
    assert got["float32", "big"] != got["float32", "little"] and default == got["float32", "little"]


def test_pooling_extras_honoured_ignored_and_refused():
    async def calls(h):
        async def emb(**kw):
            return await h.post("/v1/embeddings", json={"input": TEXT, **kw})

        plain = (await emb()).json()["data"]
        raw_old = (await emb(normalize=False)).json()["data"]
        raw_new = (await emb(use_activation=False)).json()["data"]
        ignored = await emb(mm_processor_kwargs={"k": 1}, cache_salt="tenant", truncation_side="left",
                            padding="do_not_pad", truncate_prompt_tokens=-1, user="u", priority=0)
        prio = await emb(priority=7)
        score = await h.post("/score", json={"text_1": TEXT, "text_2": ["a b", "c d"], "priority": 3,
                                             "use_activation": False, "cache_salt": "s"})
        score_plain = await h.post("/score", json={"text_1": TEXT, "text_2": ["a b", "c d"]})
        rerank = await h.post("/rerank", json={"query": TEXT, "documents": ["a b"], "priority": 2,
                                               "mm_processor_kwargs": {}})
        tokenize = await h.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}],
                                                  "mm_processor_kwargs": {"x": 1}})
        refused = {}
        for field, value, extra in (("truncation_side", "right", {}), ("padding", "max_length", {}),
                                    ("embed_dtype", "fp8_e4m3", {"encoding_format": "base64"}),
                                    ("encoding_format", "bytes", {}), ("cache_salt", "", {}),
                                    ("use_activation", True, {"normalize": False})):
            refused[field] = await emb(**{field: value}, **extra)
        refused["score truncation_side"] = await h.post("/score", json={"text_1": "a", "text_2": "b",
                                                                        "truncation_side": "right"})
        return plain, raw_old, raw_new, ignored, prio, score, score_plain, rerank, tokenize, refused

    (plain, raw_old, raw_new, ignored, prio, score, score_plain, rerank, tokenize, refused), seen, engine = \
        serve(calls)
    assert raw_new == raw_old and raw_new != plain  # use_activation is vLLM's newer name of normalize
    assert abs(np.linalg.norm(plain[0]["embedding"]) - 1) < 1e-6
    assert ignored.status_code == 200 and ignored.json()["data"] == plain, ignored.text
    assert prio.status_code == 200 and score.status_code == 200 and rerank.status_code == 200
    assert [d["score"] for d in score.json()["data"]] == [d["score"] for d in score_plain.json()["data"]]
    assert tokenize.status_code == 200 and tokenize.json()["count"] > 0
    # the engine took each request's priority: 7 (one input), 3 x 3 (score: the text and two others), 2 x 2
    assert 7 in seen and seen.count(3) == 3 and seen.count(2) == 2, seen
    for field, r in refused.items():
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == field.split()[-1] and field.split()[-1] in err["message"], \
            (field, r.text)


def test_add_special_tokens_false_leaves_out_the_bos():
    tok = FakeTokenizer()

    async def calls(h):
        with_bos = (await h.post("/v1/embeddings", json={"input": TEXT})).json()
        without = (await h.post("/v1/embeddings", json={"input": TEXT, "add_special_tokens": False})).json()
        ids = (await h.post("/v1/embeddings", json={"input": tok.encode(TEXT, add_special_tokens=False)})).json()
        return with_bos, without, ids

    (with_bos, without, ids), _, _ = serve(calls, add_bos=True)
    assert with_bos["usage"]["prompt_tokens"] == len(TEXT) + 1 and without["usage"]["prompt_tokens"] == len(TEXT)
    assert without["data"] == ids["data"] and without["data"] != with_bos["data"]
