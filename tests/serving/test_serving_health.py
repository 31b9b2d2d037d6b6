"""grpc.health.v1 transitions: NOT_SERVING until ready; injected raise / hang / stall flip it
within the stated timeout; in-flight requests get INTERNAL with the cause on a raise."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2

from serving.config import GENERATION_SERVICE
from serving_helpers import NOT_SERVING, SERVING, collect, request, run, running_server
from tests.fakes.fake_engine import FakeEngine


async def read_all(call) -> list:
    out = []
    while (r := await call.read()) is not grpc.aio.EOF:
        out.append(r)
    return out


def test_not_serving_until_built_and_warm_then_serving():
    gate = threading.Event()
    warmed = []

    def factory():
        gate.wait(10)
        return FakeEngine()

    async def main():
        async with running_server(engine_factory=factory, wait=False) as c:
            c.server.async_engine._warmup = lambda eng: warmed.append(eng)
            watch = c.health.Watch(health_pb2.HealthCheckRequest(service=GENERATION_SERVICE))
            first = await watch.read()
            assert first.status == NOT_SERVING
            assert await c.health_status() == NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await c.generate(prompt="early")
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE and "starting" in ei.value.details()
            await asyncio.sleep(0.3)
            assert await c.health_status() == NOT_SERVING  # still loading
            gate.set()
            second = await asyncio.wait_for(watch.read(), 5)
            assert second.status == SERVING
            watch.cancel()
            assert warmed, "warm-up ran before SERVING"
            assert await c.health_status("") == SERVING
            assert c.server.monitor.probe_successes >= 1
            assert collect(await c.generate(prompt="now", max_tokens=2))["texts"][0] == "no"
    run(main())


def test_step_raises_in_flight_internal_not_serving_exit_1():
    async def main():
        eng = FakeEngine(step_delay=0.01)
        async with running_server(eng, engine_death_grace=1.0) as c:
            calls = [c.stub.Generate(request(prompt=f"doomed {i}", max_tokens=200)) for i in range(3)]
            for call in calls:
                await call.read()
            t0 = time.monotonic()
            eng.inject_raise()
            for call in calls:
                with pytest.raises(grpc.aio.AioRpcError) as ei:
                    await read_all(call)
                assert ei.value.code() == grpc.StatusCode.INTERNAL
                assert "RuntimeError: injected fault" in ei.value.details()
            took = await c.wait_status(NOT_SERVING, 2.0)
            assert time.monotonic() - t0 < 2.0, took  # one monitor tick; slack for loaded CI
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await c.generate(prompt="after death")
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "injected fault" in ei.value.details()
            code = await asyncio.wait_for(c.server.wait(), 5)
            assert code == 1
    run(main())


def test_step_hangs_watchdog_not_serving_then_recovers():
    async def main():
        eng = FakeEngine(step_delay=0.005)
        wd = 0.6
        async with running_server(eng, watchdog_timeout=wd, health_probe_interval=0.2) as c:
            call = c.stub.Generate(request(prompt="patient", max_tokens=30))
            await call.read()
            eng.inject_hang()
            t0 = time.monotonic()
            await c.wait_status(NOT_SERVING, wd + 1.5)
            elapsed = time.monotonic() - t0
            tick = c.server.monitor.tick
            # within the stated timeout (watchdog + one monitor tick; slack for a loaded CI box)
            assert wd * 0.8 <= elapsed <= wd + tick + 1.0, elapsed
            assert "wedged" in c.server.monitor.reason
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await c.generate(prompt="new")
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE and "wedged" in ei.value.details()
            eng.release_hang()
            await c.wait_status(SERVING, 3.0)
            rest = await read_all(call)
            assert rest[-1].finished
            await c.wait_blocks_free()
    run(main())


def test_loop_alive_but_no_progress_fails_probe():
    async def main():
        eng = FakeEngine()
        wd = 0.5
        async with running_server(eng, watchdog_timeout=wd, health_probe_interval=0.1) as c:
            eng.stall()
            await c.wait_status(NOT_SERVING, wd + 2.0)
            assert "synthetic request" in c.server.monitor.reason
            eng.stall(False)
            await c.wait_status(SERVING, 3.0)
    run(main())


def test_busy_engine_stays_serving_while_probe_queues():
    async def main():
        eng = FakeEngine(step_delay=0.01)
        eng.config.max_num_seqs = 1  # the probe waits behind a long request
        wd = 0.8
        async with running_server(eng, watchdog_timeout=wd, health_probe_interval=0.1) as c:
            call = c.stub.Generate(request(prompt="long one", max_tokens=250))
            await call.read()
            t0 = time.monotonic()
            while time.monotonic() - t0 < 2.5 * wd:
                assert await c.health_status() == SERVING, c.server.monitor.reason
                await asyncio.sleep(0.05)
            assert c.server.monitor.probe_failures >= 1  # the probe did time out in the queue
            assert (await read_all(call))[-1].finished
    run(main())


def test_engine_build_failure_not_serving_exit_1():
    def factory():
        raise OSError("checkpoint not found")

    async def main():
        async with running_server(engine_factory=factory, wait=False, engine_death_grace=0.3) as c:
            code = await asyncio.wait_for(c.server.wait(), 5)
            assert code == 1 and "checkpoint not found" in c.server.monitor.reason
    run(main())


def test_drain_waits_for_a_request_still_being_admitted():
    async def main():
        eng = FakeEngine(step_delay=0.02)
        async with running_server(eng, shutdown_timeout=5.0) as c:
            eng.add_delay = 0.3  # the request sits in add_request when the drain starts
            # runs ~1.5 s: longer than the grpc stop grace, so only a drain that counts it helps
            task = asyncio.ensure_future(c.generate(prompt="late bloomer", max_tokens=75))
            await asyncio.sleep(0.1)
            await c.server.drain("test")
            res = collect(await task)
            assert res["finish"][0] == 2 and len(res["tokens"][0]) == 75
            assert await c.server.wait() == 0
    run(main())
