"""Client request ids on the HTTP door, vLLM's rule: the ``X-Request-Id`` header, else the body's
``request_id``, names the answer (``cmpl-<id>``, ``chatcmpl-<id>``, ``resp_<id>``, ``embd-<id>``),
the header comes back on the response, a bad value is a one-line 400, and one id sent twice at once
runs as two distinct engine requests (each aborted alone when its client leaves). With
``--enable-request-id-headers`` every answer carries ``X-Request-Id``, the server's id when the
client sent none (and that id names the answer).

The server: the real host engine over the fake runner (slowed, so streams are still running while
the test looks at the engine's in-flight ids)."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from http_helpers import SlowRunner, ThreadedServer, make_llm_engine

CHAT = [{"role": "user", "content": "Capital of France?"}]


@pytest.fixture(scope="module")
def srv():
    s = ThreadedServer(make_llm_engine(max_model_len=512, num_blocks=1024, runner_cls=SlowRunner),
                       max_request_id_len=32)
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(srv):
    with openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def test_header_names_the_answer_and_comes_back(client, srv):
    raw = client.chat.completions.with_raw_response.create(
        model="fake-llm", messages=CHAT, max_tokens=4, extra_headers={"X-Request-Id": "trace-42"})
    assert raw.headers["x-request-id"] == "trace-42"
    assert raw.parse().id == "chatcmpl-trace-42"
    raw = client.completions.with_raw_response.create(
        model="fake-llm", prompt="Once upon", max_tokens=4, extra_headers={"X-Request-Id": "trace-43"})
    assert raw.headers["x-request-id"] == "trace-43"
    assert raw.parse().id == "cmpl-trace-43"
    raw = client.responses.with_raw_response.create(
        model="fake-llm", input="Capital of France?", max_output_tokens=4, extra_headers={"X-Request-Id": "t-44"})
    assert raw.headers["x-request-id"] == "t-44" and raw.parse().id == "resp_t-44"
    srv.wait_idle()


def test_body_request_id_and_header_precedence(client, srv):
    r = client.chat.completions.create(model="fake-llm", messages=CHAT, max_tokens=3,
                                       extra_body={"request_id": "from-body"})
    assert r.id == "chatcmpl-from-body"
    r = client.completions.create(model="fake-llm", prompt="abc", max_tokens=3, extra_body={"request_id": "b2"})
    assert r.id == "cmpl-b2"
    # vLLM: the header wins over the body
    raw = httpx.post(srv.base_url + "/v1/completions", headers={"X-Request-Id": "hdr"},
                     json={"prompt": "abc", "max_tokens": 3, "request_id": "body"}, timeout=30)
    assert raw.status_code == 200 and raw.json()["id"] == "cmpl-hdr" and raw.headers["x-request-id"] == "hdr"
    # none set: a fresh id each time, and no header sent back
    a = httpx.post(srv.base_url + "/v1/completions", json={"prompt": "abc", "max_tokens": 2}, timeout=30)
    b = httpx.post(srv.base_url + "/v1/completions", json={"prompt": "abc", "max_tokens": 2}, timeout=30)
    assert a.json()["id"] != b.json()["id"] and a.json()["id"].startswith("cmpl-")
    assert "x-request-id" not in a.headers
    srv.wait_idle()


def test_streamed_chunks_carry_the_client_id(client, srv):
    chunks = list(client.chat.completions.create(model="fake-llm", messages=CHAT, max_tokens=5, stream=True,
                                                 extra_headers={"X-Request-Id": "stream-1"}))
    assert chunks and {c.id for c in chunks} == {"chatcmpl-stream-1"}
    with httpx.stream("POST", srv.base_url + "/v1/completions", headers={"X-Request-Id": "stream-2"},
                      json={"prompt": "abc", "max_tokens": 4, "stream": True}, timeout=30) as r:
        assert r.headers["x-request-id"] == "stream-2"
        ids = {json.loads(line[6:])["id"] for line in r.iter_lines() if line.startswith("data: {")}
    assert ids == {"cmpl-stream-2"}
    srv.wait_idle()


@pytest.mark.parametrize("headers,body,needle", [
    ({"X-Request-Id": "x" * 33}, {}, "X-Request-Id of length 33 is invalid: must be at most 32 characters"),
    ({}, {"request_id": "y" * 40}, "request_id of length 40 is invalid: must be at most 32 characters"),
    ({}, {"request_id": "has space"}, "request_id='has space' is invalid: ' ' is not a visible ASCII"),
    ({}, {"request_id": "new\nline"}, "request_id='new\\nline' is invalid: '\\n' is not a visible ASCII"),
    ({}, {"request_id": "caf\u00e9"}, "is not a visible ASCII character"),
    ({"X-Request-Id": ""}, {}, "X-Request-Id='' is invalid: it is empty"),
    ({}, {"request_id": 7}, "request_id"),
])
def test_bad_ids_are_one_line_400s(srv, headers, body, needle):
    for path, extra in (("/v1/completions", {"prompt": "abc"}), ("/v1/chat/completions", {"messages": CHAT})):
        r = httpx.post(srv.base_url + path, headers=headers, json={**extra, **body, "max_tokens": 2}, timeout=30)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert needle in err["message"] and "\n" not in err["message"]
        assert err["param"] == ("X-Request-Id" if headers else "request_id")
    assert not srv.server.door.active  # refused before admission


def test_one_id_twice_in_flight_runs_two_engine_requests(srv):
    """Two streams with one client id: both admitted, distinct engine ids, both shown the client's
    id; the first client hanging up aborts only its own request."""
    body = {"prompt": "same id", "max_tokens": 300, "ignore_eos": True, "stream": True, "temperature": 0,
            "stream_options": {"include_usage": True}}
    hdr = {"X-Request-Id": "dup"}
    with httpx.Client(base_url=srv.base_url, timeout=30) as c:
        with c.stream("POST", "/v1/completions", headers=hdr, json=body) as first:
            lines1 = first.iter_lines()
            assert next(x for x in lines1 if x.startswith("data: {"))
            with c.stream("POST", "/v1/completions", headers=hdr, json=body) as second:
                assert second.status_code == 200
                lines2 = second.iter_lines()
                assert json.loads(next(x for x in lines2 if x.startswith("data: {"))[6:])["id"] == "cmpl-dup"
                live = [rid for rid in srv.server.door.active]
                assert len(live) == 2 and len(set(live)) == 2
                assert all(rid.startswith("cmpl-dup-") for rid in live)
                first.close()  # hang up: only the first one's engine request is aborted
                deadline = time.monotonic() + 10
                while len(srv.server.door.active) != 1 and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert len(srv.server.door.active) == 1
                rest = [json.loads(x[6:]) for x in lines2 if x.startswith("data: {")]
    assert {ch["id"] for ch in rest} == {"cmpl-dup"}
    assert rest[-2]["choices"][0]["finish_reason"] == "length"
    assert rest[-1]["usage"]["completion_tokens"] == 300  # the second stream ran to its end
    srv.wait_idle()


def test_same_id_sequentially_and_beam_search(client, srv):
    for _ in range(2):  # a retry with the same id after the first finished
        assert client.completions.create(model="fake-llm", prompt="abc", max_tokens=2,
                                         extra_headers={"X-Request-Id": "retry"}).id == "cmpl-retry"
    r = client.completions.create(model="fake-llm", prompt="abc", max_tokens=3, n=2,
                                  extra_headers={"X-Request-Id": "beam-7"}, extra_body={"use_beam_search": True})
    assert r.id == "cmpl-beam-7" and len(r.choices) == 2
    srv.wait_idle()


@pytest.fixture(scope="module")
def id_headers_srv():
    s = ThreadedServer(make_llm_engine(), enable_request_id_headers=True)
    yield s
    s.close()


@pytest.fixture(scope="module")
def embed_srv():
    s = ThreadedServer(make_llm_engine(task="embed"), enable_request_id_headers=True, max_request_id_len=32)
    yield s
    s.close()


def test_enable_request_id_headers_every_answer_carries_one(id_headers_srv):
    """--enable-request-id-headers: an answer to a client that sent no id carries X-Request-Id, the
    id that names it (cmpl-<it>, every streamed chunk's too), fresh per request; the client's header
    or body request_id when sent; /health, /v1/models and errors (404, 400) carry one too."""
    srv = id_headers_srv
    with openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0) as oc:
        raw = oc.completions.with_raw_response.create(model="fake-llm", prompt="abc", max_tokens=2)
        gen = raw.headers["x-request-id"]
        assert raw.parse().id == f"cmpl-{gen}" and len(gen) == 32 and int(gen, 16) >= 0
        raw = oc.chat.completions.with_raw_response.create(model="fake-llm", messages=CHAT, max_tokens=2,
                                                           extra_body={"request_id": "body-9"})
        assert raw.headers["x-request-id"] == "body-9" and raw.parse().id == "chatcmpl-body-9"
        raw = oc.chat.completions.with_raw_response.create(model="fake-llm", messages=CHAT, max_tokens=2,
                                                           extra_headers={"X-Request-Id": "hdr-9"},
                                                           extra_body={"request_id": "body-9"})
        assert raw.headers["x-request-id"] == "hdr-9" and raw.parse().id == "chatcmpl-hdr-9"
    with httpx.stream("POST", srv.base_url + "/v1/chat/completions", timeout=30,
                      json={"messages": CHAT, "max_tokens": 3, "stream": True}) as r:
        sid = r.headers["x-request-id"]
        ids = {json.loads(line[6:])["id"] for line in r.iter_lines() if line.startswith("data: {")}
    assert ids == {f"chatcmpl-{sid}"} and sid != gen
    shown = []
    for method, path, body, status in (("GET", "/health", None, 200), ("GET", "/v1/models", None, 200),
                                       ("GET", "/v1/nothing", None, 404),
                                       ("POST", "/v1/completions", {"prompt": "abc", "max_tokens": -1}, 400)):
        r = httpx.request(method, srv.base_url + path, json=body, timeout=30)
        assert r.status_code == status, r.text
        shown.append(r.headers["x-request-id"])
        assert len(shown[-1]) == 32
    assert len(set(shown + [gen, sid])) == 6  # fresh each time
    srv.wait_idle()


def test_flag_off_no_header_without_a_client_id(srv):
    """The default (flag off): an answer to a client that sent no X-Request-Id has no such header,
    errors and /health included; the body's request_id names the answer without one."""
    for method, path, body in (("GET", "/health", None), ("GET", "/v1/nothing", None),
                               ("POST", "/v1/completions", {"prompt": "abc", "max_tokens": 2, "request_id": "b"})):
        r = httpx.request(method, srv.base_url + path, json=body, timeout=30)
        assert "x-request-id" not in r.headers, path
    assert r.json()["id"] == "cmpl-b"
    srv.wait_idle()


def test_embeddings_take_the_client_id(embed_srv):
    """/v1/embeddings names its answer embd-<id> like the other endpoints: the X-Request-Id header,
    else the body's request_id (vLLM's embeddings field), else the server's (the header it sends
    back under --enable-request-id-headers); a bad id is the same one-line 400; one id sent twice
    runs as two distinct engine requests (both answered with it)."""
    srv = embed_srv
    with openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0) as oc:
        raw = oc.embeddings.with_raw_response.create(model="fake-llm", input=["a b", "c"],
                                                     extra_headers={"X-Request-Id": "emb-1"})
        assert raw.headers["x-request-id"] == "emb-1" and raw.http_response.json()["id"] == "embd-emb-1"
        assert len(raw.parse().data) == 2
        raw = oc.embeddings.with_raw_response.create(model="fake-llm", input="a b", extra_body={"request_id": "emb-2"})
        assert raw.headers["x-request-id"] == "emb-2" and raw.http_response.json()["id"] == "embd-emb-2"
        raw = oc.embeddings.with_raw_response.create(model="fake-llm", input="a b")
        answer = raw.http_response.json()
        assert answer["id"] == f"embd-{raw.headers['x-request-id']}" and answer["object"] == "list"
        assert isinstance(answer["created"], int)
        with pytest.raises(openai.BadRequestError) as ei:
            oc.embeddings.create(model="fake-llm", input="a", extra_body={"request_id": "z" * 33})
        assert ei.value.body["param"] == "request_id"
        assert ei.value.body["message"] == "request_id of length 33 is invalid: must be at most 32 characters " \
                                           "(--max-request-id-len)"
    seen = []
    door_embed = srv.server.door.embed_many

    async def recording(prefix, prompts, params, priority=0):
        seen.append(prefix)
        return await door_embed(prefix, prompts, params, priority)

    srv.server.door.embed_many = recording
    try:
        for _ in range(2):
            r = httpx.post(srv.base_url + "/v1/embeddings", json={"input": "x y", "request_id": "same"}, timeout=30)
            assert r.status_code == 200 and r.json()["id"] == "embd-same"
    finally:
        srv.server.door.embed_many = door_embed
    assert len(seen) == 2 and seen[0] != seen[1] and all(p.startswith("embd-same-") for p in seen)
    srv.wait_idle()


def test_request_id_flags_reach_the_server_config():
    from serving.__main__ import build_parser, server_config

    cfg = server_config(build_parser().parse_args([]))
    assert (cfg.enable_request_id_headers, cfg.max_request_id_len) == (False, 256)
    cfg = server_config(build_parser().parse_args(["--enable-request-id-headers", "--max-request-id-len", "64"]))
    assert (cfg.enable_request_id_headers, cfg.max_request_id_len) == (True, 64)
    with pytest.raises(ValueError, match="max_request_id_len=0 is invalid: must be a positive integer"):
        server_config(build_parser().parse_args(["--max-request-id-len", "0"]))
