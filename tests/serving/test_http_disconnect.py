"""32 streaming HTTP clients that hang up mid-stream (and 8 non-streamed ones that give up): each
request is aborted in the engine and every KV block is free again (the real host engine's block pool, over a slowed fake runner so the
streams are still running when the clients leave)."""

from __future__ import annotations

import asyncio
import json

import httpx

from http_helpers import SlowRunner, ThreadedServer, make_llm_engine


def test_32_streams_disconnecting_free_every_block():
    engine = make_llm_engine(max_model_len=512, num_blocks=1024, max_num_seqs=16, runner_cls=SlowRunner)
    srv = ThreadedServer(engine, max_queued_requests=64)
    try:
        async def one(client: httpx.AsyncClient, i: int, chat: bool) -> int:
            body = {"max_tokens": 400, "stream": True, "ignore_eos": True, "temperature": 0}
            if chat:
                path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": f"talk {i}"}]
            else:
                path, body["prompt"] = "/v1/completions", f"client {i} says"
            async with client.stream("POST", path, json=body) as r:
                assert r.status_code == 200
                seen = 0
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        assert "error" not in json.loads(line[6:])
                        seen += 1
                        if seen == 2:
                            break  # hang up mid-stream: closing the response closes the connection
                return seen

        async def main():
            limits = httpx.Limits(max_connections=64)
            async with httpx.AsyncClient(base_url=srv.base_url, timeout=30, limits=limits) as c:
                return await asyncio.gather(*(one(c, i, i % 2 == 1) for i in range(32)))

        assert asyncio.run(main()) == [2] * 32
        stats = srv.wait_idle(timeout=20)
        assert stats.num_free_blocks == stats.num_blocks == 1024
        # the engine really ran them and cut them short: fewer tokens than 32 full answers
        assert 0 < stats.num_generated_tokens < 32 * 400
        # non-streamed requests whose clients give up (read timeout closes the connection)
        before = stats.num_generated_tokens

        async def gives_up(i: int) -> str:
            async with httpx.AsyncClient(base_url=srv.base_url, timeout=httpx.Timeout(10, read=0.3)) as c:
                try:
                    await c.post("/v1/completions", json={"prompt": f"impatient {i}", "max_tokens": 400,
                                                          "ignore_eos": True})
                except httpx.ReadTimeout:
                    return "gave up"
                return "answered"

        async def impatient():
            return await asyncio.gather(*(gives_up(i) for i in range(8)))

        assert asyncio.run(impatient()) == ["gave up"] * 8
        stats = srv.wait_idle(timeout=20)
        assert stats.num_free_blocks == stats.num_blocks
        assert 0 < stats.num_generated_tokens - before < 8 * 400
        ok = httpx.post(srv.base_url + "/v1/completions", json={"prompt": "after", "max_tokens": 3}, timeout=10)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
        srv.wait_idle()
    finally:
        srv.close()
