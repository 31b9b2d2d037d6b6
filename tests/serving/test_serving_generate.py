"""Generate / Tokenize / Detokenize / GetModelInfo over a real loopback gRPC server."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from serving.health import PROBE_PREFIX
from serving.proto.jaxllm.v1 import generation_pb2 as pb
from serving_helpers import collect, offline, request, run, running_server
from tests.fakes.fake_engine import EOS, FakeEngine


def test_stream_fields_and_deltas():
    async def main():
        async with running_server() as c:
            res = collect(await c.generate(prompt="Hello, world", max_tokens=20, n=2, logprobs=3,
                                           prompt_logprobs=1))
            want = offline("Hello, world", max_tokens=20, n=2, logprobs=3)
            for o in want:
                assert res["texts"][o.index] == o.text
                assert res["tokens"][o.index] == o.token_ids
                assert res["finish"][o.index] == pb.FINISH_REASON_LENGTH
                lps = res["logprobs"][o.index]
                assert [lp.token_id for lp in lps] == o.token_ids
                assert all(len(lp.top_logprobs) == 4 for lp in lps)  # sampled + top-3
            assert res["texts"][0] != res["texts"][1]
            assert res["prompt_token_ids"] == [ord(ch) for ch in "Hello, world"]
            assert res["usage"].prompt_tokens == 12 and res["usage"].completion_tokens == 40
            # a stop string: deltas still concatenate to the (cut) final text
            res = collect(await c.generate(prompt="abcdefgh", max_tokens=40, stop=["fgh", "zz"]))
            assert res["texts"][0] == "abcde" and res["finish"][0] == pb.FINISH_REASON_STOP
            # stop token id
            rs = await c.generate(prompt="abcdefgh", max_tokens=40, stop_token_ids=[ord("d")])
            last = [d for r in rs for d in r.outputs if d.finish_reason][0]
            assert last.stop_token_id == ord("d")
            # EOS in the prompt echo -> stop; ignore_eos -> length
            res = collect(await c.generate(token_ids=[65, 66, EOS], max_tokens=10))
            assert res["tokens"][0] == [65, 66, EOS] and res["finish"][0] == pb.FINISH_REASON_STOP
            res = collect(await c.generate(token_ids=[65, 66, EOS], max_tokens=5, ignore_eos=True))
            assert len(res["tokens"][0]) == 5
            # chat prompt via the tokenizer's template
            res = collect(await c.generate(prompt=None, chat=[{"role": "user", "content": "hi"}],
                                           max_tokens=8))
            assert res["texts"][0] == "<user>hi"
            # prefix cache: the same long prompt again reports cached tokens
            long = "x" * 33
            first = collect(await c.generate(prompt=long, max_tokens=2))["usage"]
            again = collect(await c.generate(prompt=long, max_tokens=2))["usage"]
            assert first.cached_tokens == 0 and again.cached_tokens == 32
            # client request id is echoed
            rs = await c.generate(prompt="abc", request_id="my-id-1", max_tokens=3)
            assert {r.request_id for r in rs} == {"my-id-1"}
            await c.wait_blocks_free()
    run(main())


def test_32_concurrent_streams_match_offline():
    async def one(c, i):
        prompt = f"prompt number {i}: " + "abc" * (i % 5)
        rs = await c.generate(prompt=prompt, max_tokens=24, temperature=0.0)
        res = collect(rs)
        want = offline(prompt, max_tokens=24, temperature=0.0)[0]
        assert res["texts"][0] == want.text and res["tokens"][0] == want.token_ids
        return len(rs)

    async def main():
        async with running_server(FakeEngine(step_delay=0.002)) as c:
            counts = await asyncio.gather(*(one(c, i) for i in range(32)))
            assert sum(counts) > 32  # really streamed, not one message each
            await c.wait_blocks_free()
    run(main())


def test_64_concurrent_half_cancelled_frees_all_blocks():
    async def main():
        eng = FakeEngine(step_delay=0.005)
        async with running_server(eng, max_queued_requests=1000) as c:
            cancelled_ids, done = [], []

            async def keep(i):
                rs = await c.generate(prompt=f"keep {i}", max_tokens=30, request_id=f"keep-{i}")
                done.append(collect(rs)["finish"][0])

            async def cancel(i):
                call = c.stub.Generate(request(prompt=f"cancel {i}", max_tokens=200,
                                               request_id=f"cancel-{i}"))
                n = 0
                async for _ in call:
                    n += 1
                    if n == 3:
                        call.cancel()
                        break
                cancelled_ids.append(f"cancel-{i}")
                assert call.cancelled() or (await call.code()) == grpc.StatusCode.CANCELLED

            await asyncio.gather(*(keep(i) for i in range(32)), *(cancel(i) for i in range(32)))
            assert done == [pb.FINISH_REASON_LENGTH] * 32
            assert len(cancelled_ids) == 32
            await c.wait_blocks_free()
            await asyncio.sleep(0.1)
            assert set(cancelled_ids) <= set(eng.aborted)
            assert not c.server.door.active
            live = [r for r in c.server.async_engine._streams if not r.startswith(PROBE_PREFIX)]
            assert not live  # (a health probe may be in flight)
            assert len(eng.thread_ids) == 1  # every engine call on the one engine thread
    run(main())


def test_deadline_and_disconnect_abort_the_request():
    async def main():
        eng = FakeEngine(step_delay=0.01)
        async with running_server(eng) as c:
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await c.generate(prompt="slow", max_tokens=200, request_id="dl", timeout=0.3)
            assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # a client that just goes away (channel closed mid-stream)
            ch = grpc.aio.insecure_channel(c.target)
            from serving.proto.jaxllm.v1 import generation_pb2_grpc as pb_grpc
            call = pb_grpc.GenerationStub(ch).Generate(request(prompt="gone", max_tokens=200,
                                                               request_id="gone"))
            await call.read()
            await ch.close()
            info = await c.wait_blocks_free()
            assert info.num_running == 0
            assert {"dl", "gone"} <= set(eng.aborted)
            # aborting unknown / finished ids is a no-op
            c.server.async_engine.abort("never-existed")
            c.server.async_engine.abort("dl")
            res = collect(await c.generate(prompt="still fine", max_tokens=4))
            assert res["texts"][0] == "stil"
    run(main())


def test_tokenize_detokenize_model_info():
    async def main():
        async with running_server(max_n=4) as c:
            t = await c.stub.Tokenize(pb.TokenizeRequest(text="abc"))
            assert list(t.token_ids) == [97, 98, 99] and t.count == 3 and t.max_model_len == 256
            t = await c.stub.Tokenize(pb.TokenizeRequest(chat=pb.ChatMessages(
                messages=[pb.ChatMessage(role="user", content="x")])))
            assert list(t.token_ids) == [ord(ch) for ch in "<user>x\n<assistant>"]
            d = await c.stub.Detokenize(pb.DetokenizeRequest(token_ids=[104, 105, EOS]))
            assert d.text == "hi"
            d = await c.stub.Detokenize(pb.DetokenizeRequest(token_ids=[104, EOS],
                                                             skip_special_tokens=False))
            assert d.text == "h<eos>"
            info = await c.stats()
            assert (info.model, info.max_model_len, info.vocab_size, info.block_size) == \
                ("fake", 256, 258, 4)
            assert info.total_kv_blocks == 2048 and info.free_kv_blocks == 2048
            assert list(info.token_buckets) == [8, 16, 32, 64] and info.limits.max_n == 4
            assert list(info.eos_token_ids) == [EOS] and info.dtype == "float32"
    run(main())
