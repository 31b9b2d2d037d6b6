"""Overload: a burst of 4x --max-queued-requests concurrent requests. The excess is refused at the
door with RESOURCE_EXHAUSTED (never queued in the engine), every accepted request completes with
the output it has without the server, health stays SERVING throughout, and nothing leaks."""

from __future__ import annotations

import asyncio

import grpc

from serving_helpers import SERVING, collect, offline, run, running_server
from tests.fakes.fake_engine import FakeEngine

QUEUE = 6


def test_burst_of_4x_the_queue():
    async def main():
        eng = FakeEngine(step_delay=0.01)
        eng.config.max_num_seqs = 3
        async with running_server(eng, max_queued_requests=QUEUE, health_probe_interval=60) as c:
            async def one(i):
                try:
                    res = collect(await c.generate(prompt=f"burst {i}", max_tokens=12 + i % 5,
                                                   request_id=f"b{i}", timeout=60))
                    return "ok", i, res
                except grpc.aio.AioRpcError as e:
                    return e.code(), i, e.details()

            health = []

            async def watch():  # health while the burst runs
                while True:
                    health.append(await c.health_status())
                    await asyncio.sleep(0.01)

            watcher = asyncio.create_task(watch())
            results = await asyncio.gather(*(one(i) for i in range(4 * QUEUE)))
            watcher.cancel()
            ok = [r for r in results if r[0] == "ok"]
            refused = [r for r in results if r[0] == grpc.StatusCode.RESOURCE_EXHAUSTED]
            assert len(ok) + len(refused) == 4 * QUEUE, [r[:2] for r in results]
            # at least the queue + the running slots are served; at least the rest is refused
            assert len(ok) >= QUEUE and len(refused) >= QUEUE, (len(ok), len(refused))
            for _, i, res in ok:
                want = offline(f"burst {i}", max_tokens=12 + i % 5)[0]
                assert res["texts"][0] == want.text and res["tokens"][0] == want.token_ids
            for _, i, details in refused:
                assert f"--max-queued-requests={QUEUE}" in details
            assert not set(eng.added) & {f"b{i}" for _, i, _ in refused}  # refused at the door
            assert health and set(health) == {SERVING}
            assert await c.health_status() == SERVING
            await c.wait_blocks_free()
            assert not c.server.door.active and c.server.async_engine.num_active == 0
    run(main())
