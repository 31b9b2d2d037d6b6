"""Sleep mode over the doors: ``POST /sleep``, ``POST /wake_up``, ``GET /is_sleeping`` (vLLM's), behind the
API key, over the real host engine (scheduler, KV cache manager) and a fake runner that forgets its KV
contents when it sleeps and fails any step it is asked to run asleep. Requests while asleep: 503 on
HTTP, UNAVAILABLE on gRPC, naming the sleep; health stays SERVING (vLLM's /health is 200 then). The
device side (bytes freed, outputs and compiles after wake-up) is tests/engine/test_sleep.py."""

from __future__ import annotations

import asyncio

import grpc
import httpx
import pytest

from http_helpers import SlowRunner, ThreadedServer
from jaxllm.config import EngineConfig
from jaxllm.engine.engine import LLMEngine
from serving.proto.jaxllm.v1 import generation_pb2_grpc as pb_grpc
from serving_helpers import request
from tests.fakes.fake_tokenizer import FakeIncrementalDetokenizer, FakeTokenizer

KEY = "sk-sleep"
AUTH = {"Authorization": f"Bearer {KEY}"}
BODY = {"prompt": "Hello there, sleepy server", "max_tokens": 4, "temperature": 0}


class SleepyRunner(SlowRunner):
    """Sleeps like the real runner's contract: the KV contents are gone after it, and no step may run
    until every tag is awake (a step asleep raises: the engine would die, the test would see it)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.asleep: set[str] = set()
        self.calls: list[tuple] = []

    def sleep(self, level: int) -> int:
        self.calls.append(("sleep", level))
        self.asleep = {"weights", "kv_cache"}
        self.kv.clear()
        return 0

    def wake_up(self, tags) -> None:
        self.calls.append(("wake_up", tuple(tags)))
        self.asleep -= set(tags)

    def dispatch(self, out):
        if self.asleep and out.seqs:
            raise AssertionError(f"a step ran while {sorted(self.asleep)} sleep")
        return super().dispatch(out)


def make_engine(enable_sleep_mode: bool = True, runner_cls=SleepyRunner) -> LLMEngine:
    tok = FakeTokenizer()
    config = EngineConfig(model="fake-llm", block_size=4, max_model_len=4096, max_num_batched_tokens=64,
                          max_num_seqs=8, enable_sleep_mode=enable_sleep_mode)
    runner = runner_cls(2048, 4, vocab_size=tok.vocab_size, eos_token_ids=tok.eos_token_ids)
    return LLMEngine(config, runner, tok, detokenizer_factory=FakeIncrementalDetokenizer)


@pytest.fixture(scope="module")
def srv():
    s = ThreadedServer(make_engine(), api_key=KEY)
    yield s
    s.close()


async def _grpc_code(port: int) -> grpc.StatusCode | None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        try:
            async for _ in pb_grpc.GenerationStub(ch).Generate(request("hi", max_tokens=2), timeout=10,
                                                               metadata=(("authorization", f"Bearer {KEY}"),)):
                pass
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details()
    return None


def test_sleep_refuses_requests_until_wake_up(srv):
    runner = srv.engine.runner
    with httpx.Client(base_url=srv.base_url, headers=AUTH, timeout=30) as h:
        awake = h.post("/v1/completions", json=BODY)
        assert awake.status_code == 200, awake.text
        assert h.get("/is_sleeping").json() == {"is_sleeping": False}
        assert h.post("/sleep", params={"level": 1}).status_code == 200
        assert h.get("/is_sleeping").json() == {"is_sleeping": True}
        assert runner.calls[-1] == ("sleep", 1)
        r = h.post("/v1/completions", json=BODY)
        assert r.status_code == 503 and "sleeping" in r.json()["error"]["message"], r.text
        code, details = srv.call(_grpc_code(srv.server.port))
        assert code == grpc.StatusCode.UNAVAILABLE and "sleeping" in details
        health = h.get("/health")  # vLLM's /health: 200 while asleep (the engine is alive)
        assert (health.status_code, health.json()) == (200, {"status": "SERVING", "sleeping": True})
        assert h.get("/v1/models").status_code == 200  # no weights needed
        s = srv.wait_idle()
        assert s.num_free_blocks == s.num_blocks  # the refusals held no block
        assert h.post("/wake_up", params={"tags": "weights"}).status_code == 200
        assert h.get("/is_sleeping").json() == {"is_sleeping": True}  # the KV cache still sleeps
        assert h.post("/v1/completions", json=BODY).status_code == 503
        assert h.post("/wake_up").status_code == 200
        assert runner.calls[-2:] == [("wake_up", ("weights",)), ("wake_up", ("kv_cache",))]
        assert h.get("/is_sleeping").json() == {"is_sleeping": False}
        again = h.post("/v1/completions", json=BODY)  # recomputed from scratch: the fake KV was cleared
        assert again.status_code == 200 and again.json()["choices"][0]["text"] == awake.json()["choices"][0]["text"]
        assert h.get("/health").json() == {"status": "SERVING"}


def test_sleep_aborts_a_streaming_request(srv):
    body = {**BODY, "max_tokens": 4000, "ignore_eos": True, "stream": True}  # 3 ms steps: runs for seconds
    with httpx.Client(base_url=srv.base_url, headers=AUTH, timeout=30) as h:
        srv.wait_idle()
        with h.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            next(line for line in lines if line)
            assert h.post("/sleep", params={"level": 2}).status_code == 200
            rest = "\n".join(lines)  # the stream ends (with an error event) instead of hanging
        assert "sleep" in rest, rest
        assert srv.engine.runner.calls[-1] == ("sleep", 2)
        s = srv.wait_idle()
        assert s.num_free_blocks == s.num_blocks
        assert h.post("/wake_up").status_code == 200
        assert h.post("/v1/completions", json=BODY).status_code == 200


def test_bad_level_mode_tags_and_auth(srv):
    with httpx.Client(base_url=srv.base_url, timeout=30) as h:
        assert h.post("/sleep").status_code == 401  # behind the key, as /reset_prefix_cache
        assert h.get("/is_sleeping").status_code == 401
        for params, needle in (({"level": 3}, "level=3 is invalid"), ({"level": "x"}, "level='x' is invalid"),
                               ({"mode": "wait"}, "mode='wait' is invalid")):
            r = h.post("/sleep", params=params, headers=AUTH)
            assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
        r = h.post("/wake_up", params={"tags": "cache"}, headers=AUTH)
        assert r.status_code == 400 and "unknown tag 'cache'" in r.json()["error"]["message"], r.text
        assert h.get("/is_sleeping", headers=AUTH).json() == {"is_sleeping": False}


def test_without_the_flag_the_endpoints_say_so():
    s = ThreadedServer(make_engine(enable_sleep_mode=False))
    try:
        with httpx.Client(base_url=s.base_url, timeout=30) as h:
            for method, path in (("POST", "/sleep"), ("POST", "/wake_up"), ("GET", "/is_sleeping")):
                r = h.request(method, path)
                assert r.status_code == 404 and "--enable-sleep-mode" in r.json()["error"]["message"], r.text
            assert h.post("/v1/completions", json=BODY).status_code == 200
    finally:
        s.close()
