"""Bad HTTP requests get the documented status and an OpenAI error object (never a 500), and
the engine keeps serving; queue limit -> 429; SIGTERM drain -> 503 for new work while the
stream in flight completes (``python -m serving --http-port 0`` as a real process)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from http_helpers import ThreadedServer, make_llm_engine
from tests.fakes.fake_engine import FakeEngine

KEY = "sk-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BODY = 4096
ROOT = Path(__file__).resolve().parents[2]

C, CH = "/v1/completions", "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]

# (name, method, path, body (dict = JSON, bytes = raw), headers, status, param, words in the message)
CASES = [
    ("bad json", "POST", C, b'{"prompt": "x",', None, 400, None, ["not valid JSON"]),
    ("body is a list", "POST", C, b'["x"]', None, 400, None, ["JSON object"]),
    ("missing prompt", "POST", C, {"max_tokens": 3}, None, 400, "prompt", ["prompt is required"]),
    ("prompt wrong type", "POST", C, {"prompt": 5}, None, 400, "prompt", ["prompt=5"]),
    ("empty prompt", "POST", C, {"prompt": ""}, None, 400, "prompt", ["prompt=''", "non-empty"]),
    ("empty prompt list", "POST", C, {"prompt": []}, None, 400, "prompt", ["prompt=[]"]),
    ("token id out of range", "POST", C, {"prompt": [3, 999]}, None, 400, "prompt", ["999", "[0, 131)"]),
    ("temperature string", "POST", C, {"prompt": "x", "temperature": "hot"}, None, 400, "temperature",
     ["temperature='hot'"]),
    ("temperature negative", "POST", C, {"prompt": "x", "temperature": -1}, None, 400, "temperature",
     ["temperature=-1", ">= 0"]),
    ("top_p zero", "POST", C, {"prompt": "x", "top_p": 0}, None, 400, "top_p", ["top_p=0"]),
    ("n zero", "POST", C, {"prompt": "x", "n": 0}, None, 400, "n", ["n=0"]),
    ("n above cap", "POST", C, {"prompt": "x", "n": 5}, None, 400, "n", ["n=5", "--max-n=4"]),
    ("max_tokens zero", "POST", C, {"prompt": "x", "max_tokens": 0}, None, 400, "max_tokens", ["max_tokens=0"]),
    ("max_tokens above max_model_len", "POST", C, {"prompt": "x", "max_tokens": 1000}, None, 400,
     "max_tokens", ["max_tokens=1000", "max_model_len=128"]),
    ("max_tokens a string", "POST", C, {"prompt": "x", "max_tokens": "5"}, None, 400, "max_tokens",
     ["max_tokens='5'"]),
    ("seed a float", "POST", C, {"prompt": "x", "seed": 1.5}, None, 400, "seed", ["seed=1.5"]),
    ("stream not a bool", "POST", C, {"prompt": "x", "stream": "yes"}, None, 400, "stream", ["stream='yes'"]),
    ("logprobs above cap", "POST", C, {"prompt": "x", "logprobs": 21}, None, 400, "logprobs", ["logprobs=21"]),
    ("min_tokens above max_tokens", "POST", C, {"prompt": "x", "max_tokens": 2, "min_tokens": 5}, None, 400,
     "min_tokens", ["min_tokens=5"]),
    ("too many stop strings", "POST", C, {"prompt": "x", "stop": ["a", "b", "c"]}, None, 400, "stop",
     ["--max-stop-strings=2"]),
    ("logit_bias key not an id", "POST", C, {"prompt": "x", "logit_bias": {"abc": 1}}, None, 400,
     "logit_bias", ["'abc'"]),
    ("unknown field", "POST", C, {"prompt": "x", "max_tokenz": 3}, None, 400, "max_tokenz",
     ["max_tokenz is not a supported field"]),
    ("echo scoring with min_tokens", "POST", C, {"prompt": "x", "echo": True, "max_tokens": 0, "min_tokens": 1},
     None, 400, "min_tokens", ["min_tokens=1", "max_tokens=0"]),
    ("prompt_logprobs above cap", "POST", C, {"prompt": "x", "prompt_logprobs": 21}, None, 400,
     "prompt_logprobs", ["prompt_logprobs=21"]),
    ("suffix", "POST", C, {"prompt": "x", "suffix": "y"}, None, 400, "suffix", ["suffix"]),
    ("best_of above n", "POST", C, {"prompt": "x", "best_of": 3}, None, 400, "best_of", ["best_of=3"]),
    ("prompt too long", "POST", C, {"prompt": "y" * 200}, None, 400, "prompt", ["200", "max_model_len=128"]),
    ("unknown model", "POST", C, {"model": "gpt-4", "prompt": "x"}, None, 404, "model", ["model='gpt-4'",
                                                                                          "fake-llm"]),
    ("oversized body", "POST", C, {"prompt": "z" * (MAX_BODY + 10)}, None, 413, None,
     [f"--max-message-bytes={MAX_BODY}"]),
    ("missing key", "POST", C, {"prompt": "x"}, {}, 401, None, ["Authorization: Bearer"]),
    ("wrong key", "POST", C, {"prompt": "x"}, {"Authorization": "Bearer nope"}, 401, None, ["invalid API key"]),
    ("models without key", "GET", "/v1/models", None, {}, 401, None, ["API key"]),
    ("chat: no messages", "POST", CH, {"messages": []}, None, 400, "messages", ["messages=[]"]),
    ("chat: message without role", "POST", CH, {"messages": [{"content": "x"}]}, None, 400,
     "messages.0.role", ["messages.0.role is required"]),
    ("chat: content a number", "POST", CH, {"messages": [{"role": "user", "content": 3}]}, None, 400,
     "messages", ["messages.0.content"]),
    ("chat: image part", "POST", CH, {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}]}, None, 400,
     "messages", ["messages.0.content=", "content[1].type='image_url' is not supported: only text parts"]),
    ("chat: top_logprobs without logprobs", "POST", CH, {"messages": MSG, "top_logprobs": 2}, None, 400,
     "top_logprobs", ["top_logprobs=2", "logprobs=true"]),
    ("chat: top_logprobs above cap", "POST", CH, {"messages": MSG, "logprobs": True, "top_logprobs": 50},
     None, 400, "top_logprobs", ["top_logprobs=50", "[0, 20]"]),
    ("chat: tool without its function", "POST", CH, {"messages": MSG, "tools": [{"type": "function"}]}, None, 400,
     "tools.0.function", ["tools.0.function is required"]),
    ("detokenize: id out of range", "POST", "/detokenize", {"tokens": [500]}, None, 400, "tokens", ["500"]),
    ("tokenize: neither prompt nor messages", "POST", "/tokenize", {}, None, 400, "prompt", ["exactly one"]),
    ("wrong method", "GET", C, None, None, 405, None, ["GET /v1/completions"]),
    ("no such path", "POST", "/v1/nothing", {}, None, 404, None, ["no such endpoint"]),
    # found by tests/serving/test_http_fuzz.py: a body that is not UTF-8 was FastAPI's bare "There was
    # an error parsing the body", a trailing slash an undocumented 307 redirect
    ("body not UTF-8", "POST", C, b"\x00\xff\xfe", None, 400, None, ["not valid JSON", "UTF-8"]),
    ("unknown field with a newline", "POST", C, {"prompt": "x", "a\nb": 1}, None, 400, "a\nb",
     ["'a\\nb' is not a supported field"]),
    ("trailing slash", "POST", C + "/", {"prompt": "x"}, None, 404, None, ["no such endpoint"]),
]


@pytest.fixture(scope="module")
def srv():
    s = ThreadedServer(make_llm_engine(), api_key=KEY, max_message_bytes=MAX_BODY, max_n=4,
                       max_stop_strings=2, max_queued_requests=2)
    yield s
    s.close()


@pytest.fixture(scope="module")
def http(srv):
    with httpx.Client(base_url=srv.base_url, headers=AUTH, timeout=10) as h:
        yield h


def _send(http, method, path, body, headers):
    kw = {}
    if isinstance(body, bytes):
        kw["content"] = body
        kw["headers"] = {"Content-Type": "application/json"}
    elif body is not None:
        kw["json"] = body
    if headers is not None:
        kw["headers"] = {**kw.get("headers", {}), **headers}
        with httpx.Client(base_url=http.base_url, timeout=10) as bare:  # no default key
            return bare.request(method, path, **kw)
    return http.request(method, path, **kw)


def test_bad_requests_table(srv, http):
    assert len(CASES) >= 25
    for name, method, path, body, headers, status, param, words in CASES:
        r = _send(http, method, path, body, headers)
        assert r.status_code == status, (name, r.status_code, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, (name, err)
        assert isinstance(err["message"], str) and "\n" not in err["message"], (name, err)
        assert "Traceback" not in r.text
        for w in words:
            assert w in err["message"], (name, w, err["message"])
        if param is not None:
            assert err["param"] == param, (name, err)
        assert err["type"] == {400: "invalid_request_error", 401: "authentication_error",
                               404: "not_found_error", 405: "invalid_request_error",
                               413: "invalid_request_error"}[status], (name, err)
    # the engine keeps serving, nothing left behind
    ok = http.post(C, json={"prompt": "still here", "max_tokens": 3, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
    assert http.get("/health").status_code == 200
    srv.wait_idle()


def test_queue_limit_is_429_served_model_name_and_health_needs_no_key():
    eng = FakeEngine()
    # the health monitor's synthetic request is a waiting request too: with a queue of 1, a probe
    # queued at the wrong moment refused this test's own requests (429 under load). Only the
    # first probe (before SERVING) runs here, so the queue holds exactly what the test sends.
    srv = ThreadedServer(eng, api_key=KEY, max_queued_requests=1, served_model_name="team/model-a",
                         health_probe_interval=3600.0)
    assert srv.server.monitor.probe_successes == 1
    try:
        with httpx.Client(base_url=srv.base_url, headers=AUTH, timeout=10) as h:
            assert httpx.get(srv.base_url + "/health").status_code == 200  # no key needed
            assert [(m["id"], m["root"]) for m in h.get("/v1/models").json()["data"]] == [("team/model-a", "fake")]
            assert h.post(C, json={"model": "fake", "prompt": "a"}).status_code == 404  # --model is not its id
            assert h.post(C, json={"model": "team/model-a", "prompt": "a", "max_tokens": 1}).status_code == 200
            eng.stall(True)  # steps run but admit nothing: requests stay waiting
            done: list = []
            t = threading.Thread(target=lambda: done.append(h.post(C, json={"prompt": "a", "max_tokens": 2})))
            t.start()
            deadline = time.monotonic() + 5
            while srv.stats().num_waiting < 1:
                assert time.monotonic() < deadline, "the first request never queued"
                time.sleep(0.01)
            r = h.post(C, json={"prompt": "b", "max_tokens": 2})
            assert r.status_code == 429, r.text
            err = r.json()["error"]
            assert err["type"] == "rate_limit_error" and "--max-queued-requests=1" in err["message"]
            eng.stall(False)
            t.join(10)
            assert done[0].status_code == 200
        srv.wait_idle()
        assert srv.server.monitor.probe_successes + srv.server.monitor.probe_failures == 1
    finally:
        srv.close()


def test_process_sigterm_drains_http_with_503():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving", "--model", "fake:step_delay=0.02", "--port", "0", "--http-port", "0",
         "--health-probe-interval", "0.2", "--shutdown-timeout", "20", "--log-level", "warning"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = [proc.stdout.readline(), proc.stdout.readline()]
        assert lines[0].startswith("serving: listening grpc=127.0.0.1:"), lines
        assert lines[1].startswith("serving: listening http=127.0.0.1:"), lines
        base = "http://" + lines[1].strip().split("=", 1)[1]
        deadline = time.monotonic() + 20
        while httpx.get(base + "/health").status_code != 200:
            assert time.monotonic() < deadline, "never SERVING"
            time.sleep(0.05)
        with httpx.Client(base_url=base, timeout=30) as h:
            with h.stream("POST", C, json={"prompt": "drain me", "max_tokens": 60, "stream": True}) as r:
                it = r.iter_lines()
                first = next(line for line in it if line)
                proc.send_signal(signal.SIGTERM)
                deadline = time.monotonic() + 10
                while (hr := h.get("/health")).status_code != 503:
                    assert time.monotonic() < deadline, "health did not turn 503"
                    time.sleep(0.02)
                assert hr.json()["status"] == "NOT_SERVING"
                refused = h.post(C, json={"prompt": "late", "max_tokens": 2})
                assert refused.status_code == 503 and "draining" in refused.json()["error"]["message"]
                rest = [line for line in it if line]
            text = "".join(json.loads(x[6:])["choices"][0]["text"] for x in [first] + rest[:-1] if json.loads(x[6:])["choices"])
            assert rest[-1] == "data: [DONE]" and len(text) == 60  # the stream in flight completed
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_engine_death_is_500_and_an_error_event_in_a_stream():
    eng = FakeEngine(step_delay=0.01)
    srv = ThreadedServer(eng, engine_death_grace=30.0)
    try:
        with httpx.Client(base_url=srv.base_url, timeout=10) as h:
            with h.stream("POST", C, json={"prompt": "doomed", "max_tokens": 200, "stream": True}) as r:
                it = (line for line in r.iter_lines() if line)
                assert "error" not in json.loads(next(it)[6:])
                eng.inject_raise()
                rest = list(it)
            assert rest[-1] == "data: [DONE]"
            err = json.loads(rest[-2][6:])["error"]
            assert err["type"] == "internal_server_error" and "injected fault" in err["message"]
            r = h.post(C, json={"prompt": "after death", "max_tokens": 2})
            assert r.status_code == 503 and "engine is not running" in r.json()["error"]["message"]
            assert h.get("/health").status_code == 503
    finally:
        srv.close()
