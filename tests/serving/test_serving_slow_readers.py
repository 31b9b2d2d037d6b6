"""Clients that stop reading their stream (raw grpc channels that never call read()): the engine
loop and the other streams go on, the stuck stream's buffer stays one output, and after
--stream-timeout seconds of not reading it is aborted with its KV blocks freed."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from serving.proto.jaxllm.v1 import generation_pb2_grpc as pb_grpc
from serving_helpers import SERVING, collect, offline, request, run, running_server
from tests.fakes.fake_engine import FakeEngine, FakeEngineConfig

NO_BDP = [("grpc.http2.bdp_probe", 0)]  # the client keeps gRPC's initial 64 KiB window


def test_stuck_readers_time_out_without_stalling_others():
    async def main():
        eng = FakeEngine(FakeEngineConfig(max_model_len=1_000_000, num_blocks=1_000_000),
                         step_delay=0.001)
        async with running_server(eng, stream_timeout=0.5) as c:
            channels = [grpc.aio.insecure_channel(c.target, options=NO_BDP) for _ in range(3)]
            # ~3 KB per step (16 samples x 20 logprobs): the 64 KiB window fills in ~20 steps;
            # max_tokens keeps them running long after the stream timeout
            stuck = [pb_grpc.GenerationStub(ch).Generate(
                request(prompt=f"stuck {i} " * 4, request_id=f"stuck-{i}", n=16, logprobs=20,
                        max_tokens=900_000)) for i, ch in enumerate(channels)]
            t0 = time.monotonic()
            while not all(f"stuck-{i}" in c.server.door.active for i in range(3)):
                await asyncio.sleep(0.01)
            steps0 = c.server.async_engine.num_steps
            # other streams run while those sit: same outputs as without a server
            for i in range(4):
                res = collect(await c.generate(prompt=f"normal {i}", max_tokens=40))
                assert res["texts"][0] == offline(f"normal {i}", max_tokens=40)[0].text
            ae = c.server.async_engine
            for i in range(3):  # one buffered output per stuck stream however many steps ran
                s = ae._streams.get(f"stuck-{i}")
                assert s is None or len(s._pending) <= 1
            # the stuck streams get aborted: requests gone from the engine, blocks back
            info = await c.wait_blocks_free(timeout=10)
            assert time.monotonic() - t0 >= 0.5  # not before the timeout
            # the engine thread frees the blocks first; the loop drops the streams when its posted
            # abort outputs run (a loaded box showed the gap: blocks free, one stream still listed)
            deadline = time.monotonic() + 5
            while (c.server.door.active or ae.num_active) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert not c.server.door.active and ae.num_active == 0
            assert sorted(r for r in eng.aborted if r.startswith("stuck")) == [
                "stuck-0", "stuck-1", "stuck-2"]
            assert ae.num_steps > steps0 and await c.health_status() == SERVING
            assert info.free_kv_blocks == info.total_kv_blocks
            # a client that reads again gets what was sent, then the status
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                async for r in stuck[0]:
                    assert r.request_id == "stuck-0"
            assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "--stream-timeout=0.5s" in ei.value.details()
            for ch in channels:
                await ch.close()
    run(main())


def test_slow_reader_under_the_timeout_gets_everything():
    async def main():
        eng = FakeEngine(step_delay=0.001)
        async with running_server(eng, stream_timeout=5.0) as c:
            call = c.stub.Generate(request(prompt="slow but steady", max_tokens=60))
            got = []
            async for r in call:
                got.append(r)
                await asyncio.sleep(0.02)  # many engine steps per read: outputs coalesce
            res = collect(got)
            assert res["texts"][0] == offline("slow but steady", max_tokens=60)[0].text
            assert res["usage"].completion_tokens == 60
            await c.wait_blocks_free()
    run(main())


def test_stream_timeout_flag_is_validated():
    from serving.__main__ import build_parser, server_config
    from serving.config import ServerConfig

    assert server_config(build_parser().parse_args(["--stream-timeout", "2.5"])).stream_timeout == 2.5
    assert ServerConfig(stream_timeout=0).validate().stream_timeout == 0  # 0 = never
    for bad in (-1, float("nan")):
        with pytest.raises(ValueError, match=r"stream_timeout=.* is invalid: must be >= 0"):
            ServerConfig(stream_timeout=bad).validate()
