"""Fuzz the OpenAI-compatible HTTP API (tests/serving/http_fuzz.py) on a real loopback server:
the real LLMEngine (scheduler, KV blocks, output processor) over the fake runner and tokenizer,
one generating server with an API key and one embedding server.

Property: every response's status is documented (200, 400, 401, 404, 405, 413, 429, 503; never
500), a wrong or missing key is 401 exactly, every non-200 body is an OpenAI error object with a
one-line message, a 400's ``param`` is a request field the message names, 200 bodies have the
shape their endpoint promises (one choice per prompt x n, SSE ``data:`` lines of JSON ending
``data: [DONE]``); afterwards every KV block is free, nothing is left in the front door's
``active`` map or the async engine, and the server still answers a greedy request correctly.
Budget: JAXLLM_HTTP_FUZZ_EXAMPLES (default 200 generate-server + 60 embed-server examples,
fixed seed), given per path by GEN_PLAN / EMBED_PLAN, each path fuzzed on its own examples and
checked to have been answered both ways (e.g. 200 and 400); a longer run:
``JAXLLM_HTTP_FUZZ_EXAMPLES=3000 pytest -s tests/serving/test_http_fuzz.py``.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re

import httpx
import pytest
from hypothesis import given

from http_fuzz import FIELDS, NO_KEY_PATHS, POST_BODIES, STATUSES, http_requests
from http_helpers import ThreadedServer, make_llm_engine
from jaxllm.config import EngineConfig
from jaxllm.engine.engine import LLMEngine
from proto_fuzz import fuzz_settings
from tests.fakes.fake_runner import FAKE_HIDDEN_SIZE, FakeRunner
from tests.fakes.fake_tokenizer import FakeIncrementalDetokenizer, FakeTokenizer

KEY = "sk-fuzz"
MAX_BODY = 16384
VOCAB = FakeTokenizer().vocab_size
ENV = "JAXLLM_HTTP_FUZZ_EXAMPLES"
# path -> (its examples at the default budget, the statuses it must have been answered with at least
# once). Each path is fuzzed on its own examples, so a path added here neither changes another
# path's draws nor dilutes its mix of answers (both sides of the contract are checked path by path).
GEN_PLAN = {"/v1/completions": (44, {200, 400}), "/v1/chat/completions": (44, {200, 400}),
            "/tokenize": (30, {200, 400}), "/detokenize": (22, {200, 400}), "/v1/embeddings": (12, {400}),
            "/v1/models": (12, {200}), "/health": (11, {200}), "/metrics": (11, {200}), "/ping": (11, {200}),
            "/version": (11, {200}), "/v1/responses": (44, {200, 400}), "/v1/score": (6, {400})}
EMBED_PLAN = {"/v1/embeddings": (20, {200, 400}), "/v1/completions": (8, {400}), "/tokenize": (30, {200, 400}),
              "/v1/models": (5, {200}), "/health": (5, {200}), "/ping": (5, {200}), "/version": (5, {200}),
              "/v1/score": (16, {200, 400}), "/v1/rerank": (16, {200, 400})}
_LEAD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # a field name (text_1: digits after the first)


def make_embed_engine() -> LLMEngine:
    tok = FakeTokenizer()
    config = EngineConfig(model="fake-embed", block_size=4, max_model_len=64, max_num_batched_tokens=16,
                          max_num_seqs=4, task="embed")
    runner = FakeRunner(64, 4, vocab_size=tok.vocab_size, eos_token_ids=tok.eos_token_ids, task="embed")
    return LLMEngine(config, runner, tok, detokenizer_factory=FakeIncrementalDetokenizer)


def _server(engine):
    return ThreadedServer(engine, api_key=KEY, max_message_bytes=MAX_BODY, max_n=4, max_queued_requests=64)


@pytest.fixture(scope="module")
def gen_server():
    s = _server(make_llm_engine())
    yield s
    s.close()


@pytest.fixture(scope="module")
def embed_server():
    s = _server(make_embed_engine())
    yield s
    s.close()


# ----- the property ---------------------------------------------------------------------------
def _body(req: dict):
    try:
        return json.loads(req["content"])
    except ValueError:
        return None


def check_error(r: httpx.Response, req: dict) -> None:
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    msg = err["message"]
    assert isinstance(msg, str) and msg and "\n" not in msg and "Traceback" not in msg, err
    if r.status_code == 400 and err["param"] == "X-Request-Id":  # the header (serving/request_ids.py)
        sent = req["headers"].get("X-Request-Id")
        assert sent is not None and msg.startswith("X-Request-Id") and not re.fullmatch(r"[!-~]{1,256}", sent), err
        return
    if r.status_code == 400 and err["param"] is not None:
        body = _body(req)
        if isinstance(body, dict) and err["param"] in body and err["param"] not in FIELDS:
            assert msg.startswith((f"{err['param']} is not", f"{err['param']!r} is not")), err  # unknown field
            return
        root = _LEAD.match(err["param"])
        assert root and root.group(0) in FIELDS, f"param names no request field: {err}"
        assert root.group(0) in msg, f"message does not name {err['param']!r}: {msg!r}"
    elif r.status_code == 400:  # no field at fault: the body as a whole
        assert msg.startswith(("request body", "response_format and structured_outputs")) or \
            _LEAD.match(msg).group(0) in FIELDS, f"400 names no field: {msg!r}"


def check_sse(text: str, req: dict, n_choices: int) -> None:
    events = text.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]", text[-200:]
    finished: dict[int, int] = {}
    errored = False
    for ev in events[:-2]:
        assert ev.startswith("data: ") and "\n" not in ev, ev
        obj = json.loads(ev[len("data: "):])
        assert not errored, "an event after the error event"
        if "error" in obj:
            assert set(obj["error"]) == {"message", "type", "param", "code"}, obj
            errored = True
            continue
        for c in obj["choices"]:
            assert 0 <= c["index"] < n_choices, (c, n_choices)
            if c["finish_reason"] is not None:
                finished[c["index"]] = finished.get(c["index"], 0) + 1
    if not errored:
        assert finished == {i: 1 for i in range(n_choices)}, (finished, n_choices)


def n_prompts(path: str, body: dict) -> int:
    if path == "/v1/chat/completions":
        return 1
    if path != "/v1/completions" and body.get("input") is None:  # vLLM's chat-shaped body: one conversation
        return 1
    p = body["prompt"] if path == "/v1/completions" else body["input"]
    if isinstance(p, str) or all(isinstance(x, int) for x in p):
        return 1
    return len(p)


def check_response_ok(r: httpx.Response, body: dict) -> None:
    """/v1/responses: one response body, or events numbered from 0 ending response.completed (or
    one error event) whose completed body's usage adds up."""
    if not body.get("stream"):
        out = r.json()
        assert out["object"] == "response" and out["status"] in ("completed", "incomplete"), out
    else:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [e for e in r.text.split("\n\n") if e]
        objs = []
        for k, ev in enumerate(events):
            kind, data = ev.split("\n")
            obj = json.loads(data[len("data: "):])
            assert kind == f"event: {obj['type']}" and obj["sequence_number"] == k, ev
            objs.append(obj)
        assert objs[0]["type"] == "response.created" and objs[-1]["type"] in ("response.completed", "error"), objs[-1]
        out = objs[-1].get("response")
        if out is None:
            return
    u = out["usage"]
    assert u["total_tokens"] == u["input_tokens"] + u["output_tokens"], u


def check_ok(r: httpx.Response, req: dict) -> None:
    path, body = req["path"], _body(req)
    if path in ("/v1/completions", "/v1/chat/completions"):
        n = n_prompts(path, body) * body.get("n", 1)
        bad = {k: v for k, v in body.items() if isinstance(v, float) and not math.isfinite(v)}
        bad.update({f"logit_bias[{k}]": v for k, v in (body.get("logit_bias") or {}).items()
                    if isinstance(v, float) and not math.isfinite(v)})
        assert not bad, f"accepted non-finite sampling values {bad}"
        if body.get("stream"):
            assert r.headers["content-type"].startswith("text/event-stream")
            check_sse(r.text, req, n)
        else:
            out = r.json()
            assert sorted(c["index"] for c in out["choices"]) == list(range(n)), out
            assert all(c["finish_reason"] in ("stop", "length") for c in out["choices"]), out
            u = out["usage"]
            assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    elif path == "/v1/responses":
        check_response_ok(r, body)
    elif path == "/tokenize":
        out = r.json()
        assert out["count"] == len(out["tokens"]) and all(0 <= t < VOCAB for t in out["tokens"])
        if body.get("prompt") is not None:  # an independent reference: the tokenizer itself
            assert out["tokens"] == FakeTokenizer().encode(body["prompt"],
                                                           add_special_tokens=body.get("add_special_tokens", True))
    elif path == "/detokenize":
        assert r.json()["prompt"] == FakeTokenizer().decode(body["tokens"], skip_special_tokens=True)
    elif path == "/v1/embeddings":
        data = r.json()["data"]
        assert [d["index"] for d in data] == list(range(n_prompts(path, body)))
        for d in data:
            vec = d["embedding"]
            size = len(base64.b64decode(vec)) // 4 if isinstance(vec, str) else len(vec)
            assert size == FAKE_HIDDEN_SIZE
    elif path == "/v1/score":  # one score per second text of the pair vLLM reads first, each a cosine
        pairs = [("queries", "documents"), ("queries", "items"), ("data_1", "data_2"), ("text_1", "text_2")]
        t2 = next(body[b] for a, b in pairs if body.get(a) is not None and body.get(b) is not None)
        data = r.json()["data"]
        assert [d["index"] for d in data] == list(range(1 if isinstance(t2, str) else len(t2)))
        assert all(-1 - 1e-9 <= d["score"] <= 1 + 1e-9 for d in data), data
    elif path == "/v1/rerank":  # best first, at most top_n, documents as sent unless dropped
        res, docs, top = r.json()["results"], body["documents"], body.get("top_n", 0)
        assert len(res) == (min(top, len(docs)) if top > 0 else len(docs)), res
        assert [x["relevance_score"] for x in res] == sorted((x["relevance_score"] for x in res), reverse=True)
        assert all(("document" in x) == body.get("return_documents", True) for x in res), res
        assert all(x["document"]["text"] == docs[x["index"]] for x in res if "document" in x), res
    elif path in ("/health", "/ping"):
        assert r.json() == {"status": "SERVING"}
    elif path == "/version":
        from importlib.metadata import version

        assert r.json() == {"version": version("jaxllm")}  # the installed package's
    elif path == "/metrics":
        assert "jaxllm" in r.text
    elif path == "/v1/models":
        assert len(r.json()["data"]) == 1


def check_response(r: httpx.Response, req: dict, paths: list[str]) -> None:
    what = f"{req['method']} {req['path']} {req['headers']} {req['content'][:300]!r} -> {r.status_code} {r.text[:300]}"
    assert r.status_code in STATUSES, what
    scheme, _, token = req["headers"].get("Authorization", "").partition(" ")
    authed = scheme.lower() == "bearer" and token == KEY  # RFC 7235: the scheme in any case (vLLM's)
    if not authed and req["path"] not in NO_KEY_PATHS:
        assert r.status_code == 401, what
    else:
        assert r.status_code != 401, what
    if "X-Request-Id" in req["headers"]:  # echoed on every answer, refusals included
        assert r.headers.get("x-request-id") == req["headers"]["X-Request-Id"], what
    if r.status_code == 413:
        assert len(req["content"]) > MAX_BODY, what
    if r.status_code == 405:
        assert req["path"] in paths and req["method"] != ("POST" if req["path"] in POST_BODIES else "GET"), what
    if r.status_code == 200:
        check_ok(r, req)
    elif not (req["path"] in ("/health", "/ping") and r.status_code == 503):
        try:
            check_error(r, req)
        except (AssertionError, ValueError, KeyError) as e:
            raise AssertionError(f"{what}: {e}") from None


def still_serving(srv: ThreadedServer, http: httpx.Client, generates: bool) -> None:
    srv.wait_idle()
    assert not srv.server.door.active and srv.server.async_engine.num_active == 0
    assert http.get("/health").json() == {"status": "SERVING"}
    if generates:  # greedy output equals the offline engine's
        r = http.post("/v1/completions", json={"prompt": "still here", "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200, r.text
        eng = make_llm_engine()
        from jaxllm.sampling_params import SamplingParams
        eng.add_request("ref", "still here", SamplingParams(max_tokens=5, temperature=0))
        final = None
        while eng.has_unfinished_requests():
            for out in eng.step():
                final = out
        assert r.json()["choices"][0]["text"] == final.outputs[0].text
    else:
        r = http.post("/v1/embeddings", json={"input": "still here"})
        assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == FAKE_HIDDEN_SIZE
    srv.wait_idle()


def _fuzz(srv: ThreadedServer, plan: dict, generates: bool) -> dict[str, dict[int, int]]:
    """Fuzz each path of ``plan`` on its examples (JAXLLM_HTTP_FUZZ_EXAMPLES, when set, is the
    total, shared in the plan's proportions); the statuses seen, counted per path."""
    paths = list(plan)
    default = sum(share for share, _ in plan.values())
    total = int(os.environ.get(ENV, default))
    seen: dict[str, dict[int, int]] = {}
    with httpx.Client(base_url=srv.base_url, timeout=30) as http:
        for path, (share, _) in plan.items():

            @fuzz_settings(max(1, round(total * share / default)), env=None)
            @given(req=http_requests(VOCAB, KEY, [path], MAX_BODY, served=srv.engine.config.model))
            def fuzz(req):
                r = http.request(req["method"], req["path"], headers=req["headers"], content=req["content"])
                by_path = seen.setdefault(req["path"], {})  # now and then another path (an unknown one)
                by_path[r.status_code] = by_path.get(r.status_code, 0) + 1
                check_response(r, req, paths)

            fuzz()
        print(f"http fuzz statuses ({'generate' if generates else 'embed'}):",
              {p: dict(sorted(c.items())) for p, c in seen.items()})
        still_serving(srv, httpx.Client(base_url=srv.base_url, timeout=30, headers={"Authorization": f"Bearer {KEY}"}),
                      generates)
    return seen


def check_coverage(seen: dict[str, dict[int, int]], plan: dict) -> None:
    """Both sides of the contract were exercised, path by path: each path was answered with each
    status its plan names at least once, and a key-gated path was refused for its key (401)."""
    missing = {p: sorted(want - set(seen.get(p, {}))) for p, (_, want) in plan.items() if want - set(seen.get(p, {}))}
    assert not missing, (missing, seen)
    assert any(c.get(401, 0) for p, c in seen.items() if p not in NO_KEY_PATHS), seen


def test_http_fuzz_generate_server(gen_server):
    check_coverage(_fuzz(gen_server, GEN_PLAN, generates=True), GEN_PLAN)


def test_http_fuzz_embed_server(embed_server):
    check_coverage(_fuzz(embed_server, EMBED_PLAN, generates=False), EMBED_PLAN)
