"""vLLM's serve flags that were refused and are honoured now, through a running server:
several ``--served-model-name`` names, several ``--api-key`` keys, ``GET /load``
(``--enable-server-load-tracking``) and ``GET /tokenizer_info`` (``--enable-tokenizer-info-endpoint``).

Behind the server: the real host engine over a fake runner that steps only when the test opens its
gate (tests/serving/http_helpers.py), so requests are provably in flight while /load is read.
References: vLLM's rules (any name is accepted, answers and LoRA parents report the first; any key
passes, the ``Bearer`` scheme in any case), the number of requests the test holds open, and the
tokenizer's own saved tokenizer_config.json for /tokenizer_info."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from http_helpers import ThreadedServer, make_llm_engine, sse_events
from serving.client import GenerationClient
from tests.fakes.fake_runner import FakeRunner

NAMES = ("first", "second", "third")
KEYS = ("k-one", "k-two", "k-drei-ö")  # a UTF-8 key (HTTP only: gRPC metadata is ASCII): hashed as sent
TEMPLATE = "{% for m in messages %}{{ m.content }}{% endfor %}"


class GatedRunner(FakeRunner):
    """The fake runner, each step waiting for the test's gate (open unless a test closes it)."""

    gate = threading.Event()

    def dispatch(self, out):
        self.gate.wait(60)
        return super().dispatch(out)


@pytest.fixture(scope="module")
def srv():
    GatedRunner.gate.set()
    s = ThreadedServer(make_llm_engine(runner_cls=GatedRunner), served_model_name=NAMES[0],
                       served_model_aliases=NAMES[1:], api_key=KEYS, enable_server_load_tracking=True,
                       enable_tokenizer_info_endpoint=True, chat_template=TEMPLATE, health_probe_interval=30.0)
    yield s
    GatedRunner.gate.set()
    s.close()


def auth(key: str = KEYS[1], scheme: str = "Bearer") -> dict:
    return {"Authorization": f"{scheme} {key}".encode()}


def post(srv, path: str, headers=None, **body) -> httpx.Response:
    return httpx.post(srv.base_url + path, json=body, headers=auth() if headers is None else headers, timeout=60)


def load(srv) -> int:
    r = httpx.get(srv.base_url + "/load", timeout=30)  # no key: vLLM's public endpoint
    assert r.status_code == 200, r.text
    return r.json()["server_load"]


def wait_load(srv, want: int, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while (got := load(srv)) != want and time.monotonic() < deadline:
        time.sleep(0.02)
    return got


def test_every_served_name_is_listed_and_accepted_answers_report_the_first(srv):
    cards = httpx.get(srv.base_url + "/v1/models", headers=auth()).json()["data"]
    assert [(c["id"], c["root"], c["parent"]) for c in cards] == [(n, "fake-llm", None) for n in NAMES]
    for name in (*NAMES, None):
        body = {"prompt": "hi", "max_tokens": 2, "temperature": 0, **({"model": name} if name else {})}
        r = post(srv, "/v1/completions", **body)
        assert r.status_code == 200 and r.json()["model"] == NAMES[0], (name, r.text)
    r = post(srv, "/v1/chat/completions", model=NAMES[2], messages=[{"role": "user", "content": "x"}], max_tokens=1)
    assert r.status_code == 200 and r.json()["model"] == NAMES[0]
    bad = post(srv, "/v1/completions", model="fake-llm", prompt="hi", max_tokens=1)  # --model is not a name now
    assert bad.status_code == 404 and all(repr(n) in bad.json()["error"]["message"] for n in NAMES), bad.text
    with GenerationClient(f"127.0.0.1:{srv.server.port}", api_key=KEYS[0]) as c:  # gRPC: the first name
        assert c.list_adapters().base_model == NAMES[0]


def test_any_key_passes_and_no_other(srv):
    for headers, status in ((auth(KEYS[0]), 200), (auth(KEYS[1]), 200), (auth(KEYS[2]), 200),
                            (auth(KEYS[0], "bearer"), 200), (auth("k-drei-o"), 401),
                            (auth("k-three"), 401), (auth(KEYS[0][:-1]), 401), (auth(KEYS[0] + KEYS[1]), 401),
                            (auth(KEYS[0], "Basic"), 401), ({}, 401), ({"Authorization": KEYS[0]}, 401)):
        r = httpx.get(srv.base_url + "/v1/models", headers=headers)
        assert r.status_code == status, (headers, r.text)
        assert not any(k in r.text for k in KEYS)
    for key, ok in ((KEYS[0], True), (KEYS[1], True), ("k-three", False)):  # gRPC: the same key ring
        with GenerationClient(f"127.0.0.1:{srv.server.port}", api_key=key) as c:
            try:
                c.list_adapters()
                got = True
            except Exception as exc:  # grpc.RpcError UNAUTHENTICATED
                assert "UNAUTHENTICATED" in str(exc.code()), exc
                got = False
        assert got == ok, key


def test_load_counts_generation_requests_in_flight_until_answered(srv):
    assert wait_load(srv, 0) == 0
    results: dict[str, httpx.Response] = {}

    def run(name, path, **body):
        results[name] = post(srv, path, **body)

    GatedRunner.gate.clear()  # the engine steps no more: admitted requests stay in flight
    try:
        threads = [threading.Thread(target=run, args=("stream", "/v1/completions"),
                                    kwargs=dict(prompt="abc", max_tokens=3, temperature=0, stream=True)),
                   threading.Thread(target=run, args=("chat", "/v1/chat/completions"),
                                    kwargs=dict(messages=[{"role": "user", "content": "q"}], max_tokens=2))]
        for t in threads:
            t.start()
        assert wait_load(srv, 2) == 2
        # not counted: endpoints vLLM does not count; a request refused at the key check leaves it as it was
        assert post(srv, "/tokenize", prompt="abc").status_code == 200
        assert post(srv, "/v1/completions", headers=auth("wrong"), prompt="x", max_tokens=1).status_code == 401
        assert httpx.get(srv.base_url + "/v1/models", headers=auth()).status_code == 200
        assert load(srv) == 2
    finally:
        GatedRunner.gate.set()
    for t in threads:
        t.join(60)
    assert results["stream"].status_code == 200 and sse_events(results["stream"])  # whole: ends [DONE]
    assert results["chat"].status_code == 200 and results["chat"].json()["usage"]["completion_tokens"] >= 1
    assert wait_load(srv, 0) == 0
    r = post(srv, "/v1/completions", model="nope", prompt="x", max_tokens=1)  # an error answer is uncounted after
    assert r.status_code == 404 and wait_load(srv, 0) == 0


@pytest.mark.parametrize("enabled,method,path,counted", [
    (True, "POST", "/v1/completions", 1), (True, "POST", "/api/v2/rerank", 1), (True, "POST", "/tokenize", 0),
    (True, "GET", "/v1/models", 0), (False, "POST", "/v1/completions", 0)])
def test_server_load_counts_the_routes_vllm_counts_while_their_answer_runs(enabled, method, path, counted):
    import asyncio

    from serving.openai_api import route_path
    from serving.openai_server_info import ServerLoad

    seen = []

    async def app(scope, receive, send):  # the routes: records the count while "answering"
        seen.append(load_.value)

    load_ = ServerLoad(app, enabled, lambda p: route_path(p, "/api"))
    asyncio.run(load_({"type": "http", "method": method, "path": path}, None, None))
    assert (seen, load_.value) == ([counted], 0)


def test_tokenizer_info_needs_the_key_and_names_the_template(srv):
    assert httpx.get(srv.base_url + "/tokenizer_info").status_code == 401
    r = httpx.get(srv.base_url + "/tokenizer_info", headers=auth())
    assert r.status_code == 200, r.text
    assert r.json() == {"tokenizer_class": "FakeTokenizer", "chat_template": TEMPLATE}  # no HF config to show


def test_tokenizer_info_of_an_hf_tokenizer_is_its_saved_config(tmp_path):
    """An HF tokenizer as the server loads it (jaxllm.tokenizer.Tokenizer.from_dir): the answer is
    its tokenizer_config.json (special tokens as text), less file paths, plus its class name."""
    from jaxllm.tokenizer import Tokenizer
    from serving.openai_server_info import tokenizer_info
    from tests.models.hf_tiny import tiny_pair_tokenizer

    hf = tiny_pair_tokenizer(32)
    hf.model_max_length = 77
    hf.chat_template = "{{ messages[0].content }}"
    hf.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "tokenizer_config.json").read_text())
    tok = Tokenizer.from_dir(str(tmp_path))
    info = tokenizer_info(tok, None)
    assert info["tokenizer_class"] == type(tok.hf).__name__
    for field in ("bos_token", "eos_token", "pad_token", "sep_token", "unk_token", "model_max_length"):
        assert info[field] == saved[field], field
    assert info["chat_template"] == (tmp_path / "chat_template.jinja").read_text()  # its own template
    added = json.loads((tmp_path / "tokenizer.json").read_text())["added_tokens"]
    assert info["added_tokens_decoder"] == {str(t["id"]): t["content"] for t in added} and len(added) == 5
    assert not {"vocab_file", "merges_file"} & set(info)
    json.dumps(info)  # all of it is JSON
    assert tokenizer_info(tok, "{{ x }}")["chat_template"] == "{{ x }}"  # --chat-template replaces its own
