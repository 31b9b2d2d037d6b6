"""The request priority through both doors (HTTP ``priority`` body field, gRPC
``GenerateRequest.priority``) into the real LLMEngine over the fake runner: it reaches the
scheduler's Request, and an fcfs server refuses a non-zero one naming the field."""
from __future__ import annotations

import grpc
import httpx
import pytest

from http_helpers import ThreadedServer
from jaxllm.config import EngineConfig
from jaxllm.engine.engine import LLMEngine
from serving_helpers import collect, request, run, running_server
from tests.fakes.fake_runner import FakeRunner
from tests.fakes.fake_tokenizer import FakeIncrementalDetokenizer, FakeTokenizer


def make_engine(policy: str) -> tuple[LLMEngine, dict]:
    """The engine and {request id: the non-zero priority its scheduler Request got}."""
    tok = FakeTokenizer()
    config = EngineConfig(model="fake-llm", block_size=4, max_model_len=128, max_num_batched_tokens=64,
                          max_num_seqs=8, scheduling_policy=policy)
    runner = FakeRunner(256, 4, vocab_size=tok.vocab_size, eos_token_ids=tok.eos_token_ids)
    eng = LLMEngine(config, runner, tok, detokenizer_factory=FakeIncrementalDetokenizer)
    seen, add = {}, eng.scheduler.add_request

    def spy(req):
        add(req)
        if req.priority != 0:  # (the server's health probes run at 0)
            seen[req.request_id] = req.priority
    eng.scheduler.add_request = spy
    return eng, seen


def test_grpc_priority():
    async def main():
        eng, seen = make_engine("priority")
        async with running_server(eng) as c:
            req = request(prompt="urgent", max_tokens=3, ignore_eos=True, request_id="u")
            req.priority = -3
            res = collect([r async for r in c.stub.Generate(req)])
            assert len(res["tokens"][0]) == 3
            await c.wait_blocks_free()
        assert seen == {"u": -3}
        eng, seen = make_engine("fcfs")
        async with running_server(eng) as c:
            req = request(prompt="urgent", max_tokens=3)
            req.priority = 2
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                [r async for r in c.stub.Generate(req)]
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert ei.value.details().startswith("priority=2 is invalid: scheduling_policy='fcfs'")
        assert seen == {}
    run(main())


@pytest.mark.parametrize("policy", ["priority", "fcfs"])
def test_http_priority(policy):
    eng, seen = make_engine(policy)
    srv = ThreadedServer(eng)
    try:
        with httpx.Client(base_url=srv.base_url, timeout=30) as h:
            bodies = [("/v1/completions", {"prompt": "hi", "max_tokens": 2, "priority": 4}),
                      ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                "max_tokens": 2, "priority": -1})]
            for path, body in bodies:
                r = h.post(path, json=body)
                if policy == "priority":
                    assert r.status_code == 200, r.text
                else:
                    assert r.status_code == 400, r.text
                    err = r.json()["error"]
                    assert err["message"].startswith(f"priority={body['priority']} is invalid: "
                                                     f"scheduling_policy='fcfs'")
                    assert err["param"] == "priority"
            r = h.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "priority": "1"})
            assert r.status_code == 400 and "priority" in r.text  # strict: a string is not an int
            srv.wait_idle()
    finally:
        srv.close()
    assert sorted(seen.values()) == ([-1, 4] if policy == "priority" else [])


def test_client_sends_the_priority():
    from serving import client

    assert client.build_request("hi", priority=3, max_tokens=2).priority == 3
    args = client.build_parser().parse_args(["hi", "--priority", "-2"])
    assert args.priority == -2 and client.build_parser().parse_args(["hi"]).priority == 0
