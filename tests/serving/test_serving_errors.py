"""Error contract: a table of bad requests -> status code + message; the server keeps serving;
queue flood -> RESOURCE_EXHAUSTED at once; message size cap."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from serving.proto.jaxllm.v1 import generation_pb2 as pb
from serving_helpers import collect, request, run, running_server
from tests.fakes.fake_engine import FakeEngine

INVALID = grpc.StatusCode.INVALID_ARGUMENT
CAPS = dict(max_n=4, max_tokens_cap=64, max_logprobs=5, max_stop_strings=3)

# (id, request kwargs, code, substrings the message must contain)
BAD = [
    ("no-prompt", dict(prompt=None), INVALID, ["prompt", "text, chat or token_ids"]),
    ("empty-text", dict(prompt=""), INVALID, ["text=''", "non-empty"]),
    ("n-zero", dict(n=0), INVALID, ["n=0", ">= 1"]),
    ("n-negative", dict(n=-3), INVALID, ["n=-3"]),
    ("n-over-cap", dict(n=5), INVALID, ["n=5", "--max-n=4"]),
    ("temperature-neg", dict(temperature=-0.5), INVALID, ["temperature=-0.5", ">= 0"]),
    ("temperature-nan", dict(temperature=float("nan")), INVALID, ["temperature=nan"]),
    ("top-p-zero", dict(top_p=0.0), INVALID, ["top_p=0.0", "(0, 1]"]),
    ("top-p-big", dict(top_p=1.5), INVALID, ["top_p=1.5"]),
    ("top-k", dict(top_k=-2), INVALID, ["top_k=-2"]),
    ("min-p", dict(min_p=1.5), INVALID, ["min_p=1.5", "[0, 1]"]),
    ("presence", dict(presence_penalty=2.5), INVALID, ["presence_penalty=2.5", "[-2, 2]"]),
    ("frequency", dict(frequency_penalty=-3.0), INVALID, ["frequency_penalty=-3.0"]),
    ("repetition", dict(repetition_penalty=0.0), INVALID, ["repetition_penalty=0.0", "> 0"]),
    ("max-tokens-zero", dict(max_tokens=0), INVALID, ["max_tokens=0", ">= 1"]),
    ("max-tokens-cap", dict(max_tokens=65), INVALID, ["max_tokens=65", "--max-tokens-cap=64"]),
    ("min-tokens-neg", dict(min_tokens=-1), INVALID, ["min_tokens=-1"]),
    ("min-gt-max", dict(min_tokens=9, max_tokens=8), INVALID, ["min_tokens=9", "max_tokens=8"]),
    ("logprobs-neg", dict(logprobs=-1), INVALID, ["logprobs=-1"]),
    ("logprobs-cap", dict(logprobs=6), INVALID, ["logprobs=6", "--max-logprobs=5"]),
    ("logprobs-engine", dict(logprobs=21), INVALID, ["logprobs=21", "[0, 20]"]),
    ("prompt-logprobs-cap", dict(prompt_logprobs=6), INVALID, ["prompt_logprobs=6"]),
    ("stop-empty", dict(stop=[""]), INVALID, ["stop=", "non-empty"]),
    ("stop-too-many", dict(stop=["a", "b", "c", "d"]), INVALID, ["4 strings", "--max-stop-strings=3"]),
    ("stop-token-neg", dict(stop_token_ids=[-1]), INVALID, ["stop_token_ids", "-1"]),
    ("stop-token-vocab", dict(stop_token_ids=[258]), INVALID, ["stop_token_ids", "258", "[0, 258)"]),
    ("allowed-vocab", dict(allowed_token_ids=[5, 258]), INVALID, ["allowed_token_ids=[5, 258]", "[0, 258)"]),
    ("logit-bias-range", dict(logit_bias={5: 200.0}), INVALID, ["logit_bias[5]=200.0", "[-100, 100]"]),
    ("logit-bias-vocab", dict(logit_bias={300: 1.0}), INVALID, ["logit_bias={300: 1.0}", "[0, 258)"]),
    ("truncate-zero", dict(truncate_prompt_tokens=0), INVALID, ["truncate_prompt_tokens=0", ">= 1"]),
    ("token-ids-empty", dict(prompt=None, token_ids=[]), INVALID, ["token_ids=[]", "at least 1 token"]),
    ("token-id-vocab", dict(prompt=None, token_ids=[5, 258]), INVALID, ["258", "[0, 258)"]),
    ("token-id-neg", dict(prompt=None, token_ids=[-7]), INVALID, ["-7"]),
    ("prompt-too-long", dict(prompt="y" * 300), INVALID, ["prompt length=300", "max_model_len=256"]),
    ("chat-empty", dict(prompt=None, chat=[]), INVALID, ["chat.messages=[]", "at least one"]),
    ("chat-no-role", dict(prompt=None, chat=[{"role": "", "content": "x"}]), INVALID,
     ["chat.messages[0].role", "non-empty"]),
    ("chat-bad-role", dict(prompt=None, chat=[{"role": "wizard", "content": "x"}]), INVALID,
     ["role='wizard'"]),
    ("request-id-long", dict(request_id="r" * 300), INVALID, ["request_id", "300", "256"]),
    ("request-id-reserved", dict(request_id="__health-probe-x"), INVALID, ["reserved"]),
]


def test_bad_request_table():
    assert len(BAD) >= 25

    async def main():
        async with running_server(**CAPS) as c:
            for name, kw, code, parts in BAD:
                with pytest.raises(grpc.aio.AioRpcError) as ei:
                    await c.generate(**kw)
                err = ei.value
                assert err.code() == code, (name, err.code(), err.details())
                for part in parts:
                    assert part in err.details(), (name, part, err.details())
                # the server serves normally after each
                res = collect(await c.generate(prompt="ok", max_tokens=3))
                assert res["texts"][0] == "oko", name
            await c.wait_blocks_free()
            # Detokenize / Tokenize bad input
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await c.stub.Detokenize(pb.DetokenizeRequest(token_ids=[1, 999]))
            assert ei.value.code() == INVALID and "999" in ei.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await c.stub.Tokenize(pb.TokenizeRequest())
            assert ei.value.code() == INVALID
    run(main())


def test_duplicate_request_id_and_message_size():
    async def main():
        async with running_server(FakeEngine(step_delay=0.01), max_message_bytes=4096) as c:
            call = c.stub.Generate(request(prompt="long", max_tokens=100, request_id="dup"))
            await call.read()
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await c.generate(prompt="again", request_id="dup")
            assert ei.value.code() == grpc.StatusCode.ALREADY_EXISTS and "dup" in ei.value.details()
            call.cancel()
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await c.generate(prompt="z" * 10_000)
            assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert collect(await c.generate(prompt="fine", max_tokens=2))["texts"][0] == "fi"
            await c.wait_blocks_free()
    run(main())


def test_queue_flood_gets_resource_exhausted_at_once():
    async def main():
        eng = FakeEngine(step_delay=0.02)
        eng.config.max_num_seqs = 2
        # no periodic probe during the flood: it would take one of the 4 waiting slots
        async with running_server(eng, max_queued_requests=4, health_probe_interval=60) as c:
            async def one(i):
                rid = f"flood-{i}"
                try:
                    res = collect(await c.generate(prompt=f"flood {i}", max_tokens=20, request_id=rid))
                    return "ok", res["finish"][0], rid
                except grpc.aio.AioRpcError as e:
                    return e.code(), e.details(), rid

            results = await asyncio.gather(*(one(i) for i in range(40)))
            ok = [r for r in results if r[0] == "ok"]
            rejected = [r for r in results if r[0] == grpc.StatusCode.RESOURCE_EXHAUSTED]
            assert len(ok) + len(rejected) == 40, results
            assert len(ok) >= 4 and len(rejected) >= 20
            assert all(r[1] == pb.FINISH_REASON_LENGTH for r in ok)
            assert all("--max-queued-requests=4" in r[1] for r in rejected)
            # Rejected at the door, not queued: no rejected request ever reached the engine, and
            # every accepted one did (no wall-clock comparison: it flaked on a loaded machine).
            added = set(eng.added)
            assert not added & {r[2] for r in rejected}, "a rejected request was queued in the engine"
            assert {r[2] for r in ok} <= added
            await c.wait_blocks_free()
            # once drained, requests are accepted again
            assert collect(await c.generate(prompt="after", max_tokens=2))["texts"][0] == "af"
    run(main())


def test_new_sampling_fields_reach_sampling_params():
    from serving.config import ServerConfig
    from serving.convert import sampling_params_from_proto

    msg = pb.SamplingParams(logit_bias={5: -1.5, 7: 100.0}, allowed_token_ids=[5, 6], truncate_prompt_tokens=3,
                            detokenize=False)
    p = sampling_params_from_proto(msg, ServerConfig(), vocab_size=258, max_model_len=256)
    assert p.logit_bias == {5: -1.5, 7: 100.0} and p.allowed_token_ids == [5, 6] and p.truncate_prompt_tokens == 3
    assert p.detokenize is False
    unset = sampling_params_from_proto(pb.SamplingParams(), ServerConfig(), vocab_size=258, max_model_len=256)
    assert unset.logit_bias is None and unset.allowed_token_ids is None and unset.truncate_prompt_tokens is None
    assert unset.detokenize is True
