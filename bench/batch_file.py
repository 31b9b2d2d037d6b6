"""A batch file through ``serving.run_batch``'s runner vs the same requests over HTTP, one process,
one engine (built and warmed once, then driven by each in turn):

    PYTHONPATH=$PWD python bench/batch_file.py --model smollm2-135m --num-lines 64 --max-tokens 32 \\
        --max-num-seqs 32 --repeats 2 --output-json /tmp/batch.json

Lines: ``--num-lines`` bodies, alternately ``/v1/chat/completions`` and ``/v1/completions``, each a
different short question, greedy, ``max_tokens`` with ``ignore_eos`` so both sides generate the
same number of tokens. ``batch``: ``BatchRunner.run`` over the lines (what ``python -m
serving.run_batch`` does after start-up). ``http``: a ServingServer on loopback over the same
engine, every body POSTed at once with httpx (non-streamed). Per round: wall seconds from the
first line to the last answer, output tokens (the answers' usage) and tokens/s; the two sides'
answers must be equal (text, finish reason, usage), else the bench fails.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import format_table, log, machine_info, write_json  # noqa: E402
from jaxllm.cli_args import ArgumentParser, add_engine_args, engine_config_from_args  # noqa: E402

TOPICS = ["the moon", "bread", "rivers", "chess", "volcanoes", "bees", "glass", "trains", "clouds", "salt",
          "maps", "owls", "copper", "tea", "bridges", "snow"]


def make_lines(n: int, max_tokens: int) -> list[tuple[str, dict]]:
    out = []
    for i in range(n):
        topic = f"{TOPICS[i % len(TOPICS)]} (question {i})"
        common = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        if i % 2 == 0:
            out.append(("/v1/chat/completions",
                        {"messages": [{"role": "user", "content": f"Tell me one fact about {topic}."}], **common}))
        else:
            out.append(("/v1/completions", {"prompt": f"A short note about {topic}:", **common}))
    return out


def _answer(body: dict) -> tuple:
    ch = body["choices"][0]
    text = ch["message"]["content"] if "message" in ch else ch["text"]
    return text, ch["finish_reason"], body["usage"]["completion_tokens"]


async def run_batch(engine, cfg, lines) -> tuple[float, list]:
    from serving.run_batch import BatchRunner

    runner = BatchRunner(cfg, engine=engine)
    await runner.start()
    src = [json.dumps({"custom_id": str(i), "method": "POST", "url": u, "body": b}) for i, (u, b) in enumerate(lines)]
    out: list[dict] = []
    t0 = time.perf_counter()
    await runner.run(iter(src), out.append)
    dt = time.perf_counter() - t0
    await runner.stop()
    bad = [o for o in out if o["error"] is not None]
    if bad:
        raise SystemExit(f"batch: {len(bad)} lines failed, first: {bad[0]['error']}")
    return dt, [_answer(o["response"]["body"]) for o in out]


async def run_http(engine, cfg, lines) -> tuple[float, list]:
    import httpx
    import msgspec

    from serving.server import ServingServer

    server = ServingServer(msgspec.structs.replace(cfg, port=0, http_port=0), engine=engine, idle_tick=0.02)
    await server.start()
    await server.wait_serving(600)
    limits = httpx.Limits(max_connections=len(lines) + 1, max_keepalive_connections=len(lines) + 1)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.http_port}", timeout=3600,
                                 limits=limits) as c:
        t0 = time.perf_counter()
        resps = await asyncio.gather(*(c.post(u, json=b) for u, b in lines))
        dt = time.perf_counter() - t0
    await server.stop()
    bad = [r for r in resps if r.status_code != 200]
    if bad:
        raise SystemExit(f"http: {len(bad)} requests failed, first: {bad[0].status_code} {bad[0].text}")
    return dt, [_answer(r.json()) for r in resps]


async def amain(args) -> dict:
    from jaxllm.engine.factory import build_engine
    from serving.config import ServerConfig

    config = engine_config_from_args(args).validate()
    t0 = time.perf_counter()
    engine = build_engine(config)
    log(f"engine built + warm in {time.perf_counter() - t0:.1f}s (max_num_seqs {config.max_num_seqs})")
    # the runner's own config (run_batch.server_config): no queue limit, no watchdog; HTTP: the server's
    cfg = ServerConfig(max_queued_requests=1 << 20, log_stats=False, watchdog_timeout=1e9,
                       health_probe_interval=1e9)
    lines = make_lines(args.num_lines, args.max_tokens)
    await run_batch(engine, cfg, lines[:4])  # compile whatever the shapes of these prompts still need
    rows, ref = [], None
    for r in range(args.repeats):
        for side, fn in (("batch", run_batch), ("http", run_http)) if r % 2 == 0 else (("http", run_http),
                                                                                       ("batch", run_batch)):
            load = machine_info()["loadavg_1_5_15"]
            dt, answers = await fn(engine, cfg, lines)
            if ref is None:
                ref = answers
            elif answers != ref:
                diff = next(i for i, (a, b) in enumerate(zip(answers, ref)) if a != b)
                raise SystemExit(f"{side} round {r}: line {diff} answered {answers[diff]!r}, not {ref[diff]!r}")
            tokens = sum(a[2] for a in answers)
            rows.append({"round": r, "side": side, "lines": len(lines), "seconds": dt, "output_tokens": tokens,
                         "tok_s": tokens / dt, "load_before": load})
            log(f"round {r} {side}: {tokens} tokens in {dt:.2f}s = {tokens / dt:.1f} tok/s (load {load})")
    return {"machine": machine_info(), "rows": rows}


def main(argv=None) -> int:
    ap = ArgumentParser(description="batch file vs HTTP, same engine, same requests")
    ap.add_argument("--num-lines", type=int, default=64, help="requests in the file (default: 64)")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens per answer (default: 32)")
    ap.add_argument("--repeats", type=int, default=2, help="rounds, the order alternating (default: 2)")
    ap.add_argument("--output-json", default=None, help="write the rows here (default: none)")
    add_engine_args(ap)
    args = ap.parse_args(argv)
    out = asyncio.run(amain(args))
    print(format_table(out["rows"], [("round", "round", "d"), ("side", "side", "s"), ("lines", "lines", "d"),
                                     ("seconds", "s", ".2f"), ("output_tokens", "tokens", "d"),
                                     ("tok_s", "tok/s", ".1f"), ("load_before", "load", "s")]))
    if args.output_json:
        write_json(args.output_json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
