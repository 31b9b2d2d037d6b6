"""Shared helpers for the serving tests: a real grpc.aio server on a loopback port (port 0)
around the fake engine, in the test's own event loop. grpc is never mocked."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jaxllm.sampling_params import SamplingParams
from serving.config import ServerConfig
from serving.proto.jaxllm.v1 import generation_pb2 as pb
from serving.proto.jaxllm.v1 import generation_pb2_grpc as pb_grpc
from serving.server import ServingServer
from tests.fakes.fake_engine import FakeEngine

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

FAST = dict(watchdog_timeout=1.0, health_probe_interval=0.2)


@dataclasses.dataclass
class Ctx:
    server: ServingServer
    port: int
    channel: grpc.aio.Channel
    stub: pb_grpc.GenerationStub
    health: health_pb2_grpc.HealthStub
    engine: FakeEngine | None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def health_status(self, service: str = "") -> int:
        return (await self.health.Check(health_pb2.HealthCheckRequest(service=service),
                                        timeout=2)).status

    async def wait_status(self, status: int, timeout: float) -> float:
        """Poll Check until ``status``; return the seconds it took."""
        t0 = time.monotonic()
        while (await self.health_status()) != status:
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"health did not become {status} within {timeout}s "
                                     f"({self.server.monitor.reason})")
            await asyncio.sleep(0.02)
        return time.monotonic() - t0

    async def generate(self, metadata=None, timeout=10.0, **kw) -> list[pb.GenerateResponse]:
        req = request(**kw)
        return [r async for r in self.stub.Generate(req, metadata=metadata, timeout=timeout)]

    async def stats(self, metadata=None) -> pb.ModelInfo:
        return await self.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata, timeout=5)

    async def wait_blocks_free(self, timeout: float = 5.0, metadata=None) -> pb.ModelInfo:
        """``metadata``: the API key on a server run with one."""
        t0 = time.monotonic()
        while True:
            info = await self.stats(metadata)
            if info.free_kv_blocks == info.total_kv_blocks and info.num_running == 0 \
                    and info.num_waiting == 0:
                return info
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"KV blocks not freed: {info.free_kv_blocks}/"
                                     f"{info.total_kv_blocks}, running={info.num_running}, "
                                     f"waiting={info.num_waiting}")
            await asyncio.sleep(0.02)


def request(prompt: str | None = "Hello, world", *, chat=None, token_ids=None, request_id="",
            **sampling) -> pb.GenerateRequest:
    req = pb.GenerateRequest(request_id=request_id, sampling=pb.SamplingParams(**sampling))
    if chat is not None:
        req.chat.messages.extend(pb.ChatMessage(**m) for m in chat)
    elif token_ids is not None:
        req.token_ids.ids.extend(token_ids)
    elif prompt is not None:
        req.text = prompt
    return req


@contextlib.asynccontextmanager
async def running_server(engine: FakeEngine | None = None, *, engine_factory=None,
                         wait: bool = True, channel_credentials=None, **cfg):
    if engine is None and engine_factory is None:
        engine = FakeEngine()
    cfg.setdefault("port", 0)
    for k, v in FAST.items():
        cfg.setdefault(k, v)
    server = ServingServer(ServerConfig(**cfg), engine=engine, engine_factory=engine_factory,
                           idle_tick=0.02)
    port = await server.start()
    target = f"{'localhost' if channel_credentials else '127.0.0.1'}:{port}"
    channel = (grpc.aio.secure_channel(target, channel_credentials) if channel_credentials
               else grpc.aio.insecure_channel(target))
    try:
        if wait:
            await server.wait_serving(10)
        yield Ctx(server, port, channel, pb_grpc.GenerationStub(channel),
                  health_pb2_grpc.HealthStub(channel), engine)
    finally:
        if hasattr(engine, "release_hang"):
            engine.release_hang()
        await channel.close()
        if server.exit_code is None:
            await server.stop()


def run(coro, timeout: float = 30.0):
    async def with_timeout():
        async with asyncio.timeout(timeout):
            return await coro
    return asyncio.run(with_timeout())


def collect(responses: list[pb.GenerateResponse]) -> dict:
    """Fold a response stream: per-index text/tokens/finish, usage, and invariants."""
    texts: dict[int, str] = {}
    tokens: dict[int, list[int]] = {}
    finish: dict[int, int] = {}
    logprobs: dict[int, list] = {}
    for r in responses:
        for d in r.outputs:
            texts[d.index] = texts.get(d.index, "") + d.text
            tokens.setdefault(d.index, []).extend(d.token_ids)
            logprobs.setdefault(d.index, []).extend(d.logprobs)
            if d.finish_reason:
                assert d.index not in finish, "finish_reason sent twice"
                finish[d.index] = d.finish_reason
    assert responses and responses[-1].finished, "stream did not end with finished=True"
    assert not any(r.finished for r in responses[:-1])
    return dict(texts=texts, tokens=tokens, finish=finish, logprobs=logprobs,
                usage=responses[-1].usage, prompt_token_ids=list(responses[0].prompt_token_ids))


def offline(prompt, **sampling) -> list:
    """What the same engine returns without the server: final CompletionOutputs."""
    eng = FakeEngine()
    eng.add_request("offline", prompt, SamplingParams(**sampling))
    final = None
    while eng.has_unfinished_requests():
        for out in eng.step():
            final = out
    return final.outputs
