"""Adapters behind both doors: gRPC (lora_name, ListAdapters/LoadAdapter/UnloadAdapter) and HTTP
(model picks an adapter, /v1/models, vLLM's load/unload endpoints), on the real host engine over
the fake runner and loader (no jax). The reference is the offline engine run with the same
LoRARequest: the fake "model" mixes the adapter's name into every token, so a request served
with the wrong adapter (or the base model) gives other tokens."""

from __future__ import annotations

import grpc
import httpx
import pytest

from jaxllm.lora import LoRARequest
from jaxllm.sampling_params import SamplingParams
from serving.client import build_request
from serving.proto.jaxllm.v1 import generation_pb2 as pb
from serving.proto.jaxllm.v1 import generation_pb2_grpc as pb_grpc
from tests.engine.conftest import run_all
from tests.lora.host_fakes import make_lora_engine
from tests.serving.http_helpers import ThreadedServer

PROMPT = "Once upon a time"


def offline(lora: LoRARequest | None) -> list[int]:
    e = make_lora_engine(model="fake-llm", max_loras=2, max_cpu_loras=4)
    e.add_request("x", PROMPT, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), lora_request=lora)
    return run_all(e)["x"].outputs[0].token_ids


@pytest.fixture(scope="module")
def srv():
    s = ThreadedServer(make_lora_engine(model="fake-llm", max_loras=2, max_cpu_loras=4),
                       lora_modules=(("a1", "/adapters/a1"), ("a2", "/adapters/a2")))
    yield s
    s.close()


def grpc_call(srv, method: str, req, timeout=10):
    async def go():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.server.port}") as ch:
            stub = pb_grpc.GenerationStub(ch)
            call = getattr(stub, method)(req, timeout=timeout)
            if method == "Generate":
                return [r async for r in call]
            return await call
    return srv.call(go())


def grpc_tokens(srv, lora_name: str) -> list[int]:
    resps = grpc_call(srv, "Generate", build_request(PROMPT, temperature=0.0, max_tokens=8, ignore_eos=True,
                                                     lora_name=lora_name))
    return [t for r in resps for d in r.outputs for t in d.token_ids]


def grpc_error(srv, method, req) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        grpc_call(srv, method, req)
    return ei.value


def test_grpc_adapters(srv):
    a1, a2 = LoRARequest("a1", 1, "/adapters/a1"), LoRARequest("a2", 2, "/adapters/a2")
    listed = grpc_call(srv, "ListAdapters", pb.ListAdaptersRequest())
    assert listed.base_model == "fake-llm"
    assert [(a.name, a.id, a.path) for a in listed.adapters] == [("a1", 1, "/adapters/a1"), ("a2", 2, "/adapters/a2")]
    want = {"": offline(None), "a1": offline(a1), "a2": offline(a2)}
    assert len({tuple(v) for v in want.values()}) == 3
    for name, toks in want.items():
        assert grpc_tokens(srv, name) == toks, name
    err = grpc_error(srv, "Generate", build_request(PROMPT, lora_name="nope"))
    assert err.code() == grpc.StatusCode.NOT_FOUND and "lora_name='nope' does not exist" in err.details()
    # dynamic loading: a new name gets the next id and serves at once; the base name is taken
    a3 = grpc_call(srv, "LoadAdapter", pb.LoadAdapterRequest(name="a3", path="/adapters/a3"))
    assert (a3.name, a3.id) == ("a3", 3)
    assert grpc_tokens(srv, "a3") == offline(LoRARequest("a3", 3, "/adapters/a3"))
    for name, code in (("a3", grpc.StatusCode.ALREADY_EXISTS), ("fake-llm", grpc.StatusCode.ALREADY_EXISTS)):
        assert grpc_error(srv, "LoadAdapter", pb.LoadAdapterRequest(name=name, path="/x")).code() == code
    err = grpc_error(srv, "LoadAdapter", pb.LoadAdapterRequest(name="broken", path="bad:/adapters/broken"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "\n" not in err.details()
    assert "/adapters/broken/adapter_model.safetensors" in err.details()
    assert grpc_call(srv, "UnloadAdapter", pb.UnloadAdapterRequest(name="a3")).id == 3
    assert grpc_error(srv, "Generate", build_request(PROMPT, lora_name="a3")).code() == grpc.StatusCode.NOT_FOUND
    assert grpc_error(srv, "UnloadAdapter", pb.UnloadAdapterRequest(name="a3")).code() == grpc.StatusCode.NOT_FOUND
    assert [a.name for a in grpc_call(srv, "ListAdapters", pb.ListAdaptersRequest()).adapters] == ["a1", "a2"]
    # the Python client's adapter calls (sync, from this thread)
    from serving.client import GenerationClient
    with GenerationClient(f"127.0.0.1:{srv.server.port}", timeout=10) as c:
        assert c.load_adapter("c1", "/adapters/c1").id == 5  # ids are never reused: the failed load took 4
        done = c.complete(PROMPT, temperature=0.0, max_tokens=8, ignore_eos=True, lora_name="c1")
        assert done.token_ids[0] == offline(LoRARequest("c1", 5, "/adapters/c1"))
        assert [a.name for a in c.list_adapters().adapters] == ["a1", "a2", "c1"]
        assert c.unload_adapter("c1").name == "c1"
    srv.wait_idle()


def test_http_adapters(srv):
    with httpx.Client(base_url=srv.base_url, timeout=10) as c:
        data = c.get("/v1/models").json()["data"]
        assert [(m["id"], m["parent"], m["root"]) for m in data][:3] == [
            ("fake-llm", None, "fake-llm"), ("a1", "fake-llm", "/adapters/a1"), ("a2", "fake-llm", "/adapters/a2")]

        def complete(model):
            r = c.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 8,
                                                "temperature": 0, "ignore_eos": True, "logprobs": 0})
            return r
        for model, lora in (("fake-llm", None), ("a1", LoRARequest("a1", 1, "/adapters/a1"))):
            r = complete(model)
            assert r.status_code == 200 and r.json()["model"] == model
            want = offline(lora)
            from tests.fakes.fake_tokenizer import FakeTokenizer
            assert r.json()["choices"][0]["text"] == FakeTokenizer().decode(want)
        r = complete("nope")
        assert r.status_code == 404 and "model='nope' does not exist" in r.json()["error"]["message"]
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "h1", "lora_path": "/adapters/h1"})
        assert r.status_code == 200 and r.text.startswith("Success")
        assert "h1" in [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert complete("h1").status_code == 200
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "h2", "lora_path": "bad:/x"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "lora_request"
        r = c.post("/v1/embeddings", json={"model": "a1", "input": "hi"})
        assert r.status_code == 400 and "adapters serve generation only" in r.json()["error"]["message"]
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "h1"}).status_code == 200
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "h1"}).status_code == 404
        assert complete("h1").status_code == 404
    srv.wait_idle()


def test_adapters_refused_without_enable_lora():
    from tests.serving.http_helpers import make_llm_engine

    s = ThreadedServer(make_llm_engine())
    try:
        err = grpc_error(s, "LoadAdapter", pb.LoadAdapterRequest(name="a", path="/adapters/a"))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("enable_lora=False")
        assert grpc_error(s, "Generate", build_request(PROMPT, lora_name="a")).code() == grpc.StatusCode.NOT_FOUND
        assert list(grpc_call(s, "ListAdapters", pb.ListAdaptersRequest()).adapters) == []
        assert grpc_tokens(s, "")  # the base model still serves
    finally:
        s.close()


def test_more_adapters_in_use_than_max_cpu_loras_wait_their_turn():
    import time

    eng = make_lora_engine(model="fake-llm", max_loras=1, max_cpu_loras=1, async_scheduling=False)
    fast = eng.runner.execute
    eng.runner.execute = lambda out: (time.sleep(0.02), fast(out))[1]  # a1's 30 tokens take ~0.6 s
    s = ThreadedServer(eng, lora_modules=(("a1", "/adapters/a1"), ("a2", "/adapters/a2")))

    async def go():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{s.server.port}") as ch:
            stub = pb_grpc.GenerationStub(ch)
            busy = stub.Generate(build_request(PROMPT, max_tokens=30, ignore_eos=True, lora_name="a1"), timeout=10)
            await busy.read()  # a1 is pinned by a running request and holds the one slot now
            second = [r async for r in stub.Generate(build_request(PROMPT, temperature=0.0, max_tokens=8,
                                                                   ignore_eos=True, lora_name="a2"), timeout=10)]
            rest = []
            while (r := await busy.read()) != grpc.aio.EOF:
                rest.append(r)
            return [t for r in second for d in r.outputs for t in d.token_ids], rest
    try:
        tokens, rest = s.call(go())
        assert tokens == offline(LoRARequest("a2", 2, "/adapters/a2")) and rest[-1].outputs[0].finish_reason
        s.wait_idle()
        assert eng.lora.num_pinned() == 0 and len(eng.lora._cache) == 1  # back to max_cpu_loras
    finally:
        s.close()


def test_bad_lora_module_fails_the_start_with_one_line():
    import asyncio

    from serving.config import ServerConfig
    from serving.server import ServingServer

    async def go():
        cfg = ServerConfig(port=0, engine_death_grace=0.0,
                           lora_modules=(("ok", "/adapters/ok"), ("bad", "bad:/adapters/bad")))
        server = ServingServer(cfg, engine=make_lora_engine(model="fake-llm", max_loras=1, max_cpu_loras=2),
                               idle_tick=0.02)
        await server.start()
        return await asyncio.wait_for(server.wait(), 10), server.start_error
    code, err = asyncio.run(go())
    assert code == 1 and "\n" not in str(err)
    assert str(err).startswith("--lora-modules bad=bad:/adapters/bad is invalid: lora_request='bad' is invalid")
