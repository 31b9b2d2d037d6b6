"""Online serving latency against a running server, gRPC or its OpenAI HTTP API, like vLLM's
benchmark_serving.

    .venv/bin/python -m serving --model smollm2-135m --port 50051 --http-port 8000 &  # wait for SERVING
    python bench/serving.py --target 127.0.0.1:50051 --num-prompts 64 --input-len 64..512 \\
        --output-len 64..256 --request-rate 2 --max-concurrency 64 --output-json /tmp/serve.json
    python bench/serving.py ... --request-rate 1,4,inf     # several rates, one table
    python bench/serving.py ... --transport grpc,http --http-target 127.0.0.1:8000  # both doors, same rates

``--transport http`` streams ``POST /v1/completions`` (token-id prompt, ``stream: true``,
``stream_options.include_usage``) with httpx's async client; ``http-raw`` sends the same request
with a minimal asyncio HTTP/1.0 client (httpx itself added latency: RESULTS.md). The model's
vocabulary and limits come from the gRPC ``GetModelInfo`` at ``--target`` (the same server). Over
HTTP the output tokens are the final usage chunk's count and an ITL gap is between SSE chunks
carrying text.

Requests (seeded random plain-vocabulary token ids, ignore_eos, greedy) arrive as a Poisson process
at --request-rate per second (``inf``: all at once), at most --max-concurrency in flight. Per
request: TTFT (send → first token), TPOT ((E2E - TTFT) / (output tokens - 1)), ITL (gaps between
streamed responses carrying tokens), E2E latency; each as mean / P50 / P90 / P99 in ms, plus
request and output-token throughput over the run and errors by gRPC status code.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (FIRST_PLAIN_TOKEN, add_workload_args, format_table, log, machine_info, parse_range, summarize,  # noqa: E402
                          write_json)


def make_requests(num: int, input_len, output_len, vocab: int, avoid: set[int], seed: int):
    rng = random.Random(seed)
    lo = min(FIRST_PLAIN_TOKEN, vocab // 2)
    plain = [t for t in range(lo, vocab) if t not in avoid] if vocab < 1 << 16 else None
    out = []
    for _ in range(num):
        n_in, n_out = rng.randint(*input_len), rng.randint(*output_len)
        if plain is not None:
            ids = [rng.choice(plain) for _ in range(n_in)]
        else:
            ids = []
            while len(ids) < n_in:
                t = rng.randrange(lo, vocab)
                if t not in avoid:
                    ids.append(t)
        out.append((ids, n_out))
    return out


async def one_request(client, ids, n_out, sem, rec: dict):
    import grpc

    async with sem:
        t0 = time.perf_counter()
        rec["start"] = t0
        last = None
        n_tok = 0
        itl = []
        try:
            async for resp in client.generate(token_ids=ids, max_tokens=n_out, ignore_eos=True, temperature=0.0):
                now = time.perf_counter()
                k = sum(len(d.token_ids) for d in resp.outputs)
                if k:
                    if last is None:
                        rec["ttft"] = now - t0
                    else:
                        itl.append(now - last)
                    last = now
                    n_tok += k
                if resp.finished:
                    rec["cached_tokens"] = resp.usage.cached_tokens
            rec["e2e"] = time.perf_counter() - t0
            rec["output_tokens"] = n_tok
            rec["itl"] = itl
            rec["ok"] = True
        except grpc.aio.AioRpcError as e:
            rec["ok"] = False
            rec["error"] = e.code().name
        except Exception as e:  # noqa: BLE001 - counted, the run goes on
            rec["ok"] = False
            rec["error"] = type(e).__name__


def _completion_body(ids, n_out) -> dict:
    """The streamed /v1/completions request both HTTP clients send."""
    return {"prompt": ids, "max_tokens": n_out, "ignore_eos": True, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}


async def _time_sse(payloads, rec: dict, t0: float) -> None:
    """Fill ``rec`` from one stream's SSE payloads (JSON bytes/str, ``[DONE]`` ends): TTFT, ITL
    between chunks carrying text, E2E, the usage chunk's output tokens; ok or the error."""
    import json

    last = None
    itl = []
    n_tok = 0
    try:
        async for data in payloads:
            if data in (b"[DONE]", "[DONE]"):
                break
            now = time.perf_counter()
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(chunk["error"].get("code") or "error")
            if chunk.get("usage"):
                n_tok = chunk["usage"]["completion_tokens"]
            if any(c.get("text") for c in chunk.get("choices") or ()):
                if last is None:
                    rec["ttft"] = now - t0
                else:
                    itl.append(now - last)
                last = now
        rec["e2e"] = time.perf_counter() - t0
        rec["output_tokens"] = n_tok
        rec["itl"] = itl
        rec["ok"] = True
    except Exception as e:  # noqa: BLE001 - counted, the run goes on
        rec["ok"] = False
        rec["error"] = str(e) if isinstance(e, RuntimeError) else type(e).__name__


async def one_http_request(client, ids, n_out, sem, rec: dict):
    async def payloads():
        async with client.stream("POST", "/v1/completions", json=_completion_body(ids, n_out)) as r:
            if r.status_code != 200:
                await r.aread()
                raise RuntimeError(f"HTTP {r.status_code}")
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    yield line[6:]

    async with sem:
        t0 = time.perf_counter()
        rec["start"] = t0
        await _time_sse(payloads(), rec, t0)



class _RawHttp:
    """A minimal HTTP/1.0 client over asyncio streams, one connection per request (HTTP/1.0: no
    chunked framing, the body ends at close). httpx's async client added its own latency to the
    measurement (bench/RESULTS.md: TTFT P50 732 vs 259 ms against the same server at rate inf);
    this one sends the request and reads SSE lines, nothing else."""

    def __init__(self, target: str, api_key, timeout: float):
        host, _, port = target.rpartition(":")
        self.host, self.port, self.timeout = host.strip("[]"), int(port), timeout
        self.auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return None

    async def sse(self, path: str, body: dict):
        """Yield each ``data: ...`` line (bytes, without the prefix) of a streamed POST."""
        import json

        data = json.dumps(body).encode()
        head = (f"POST {path} HTTP/1.0\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                f"{self.auth}Content-Length: {len(data)}\r\n\r\n").encode()
        reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), self.timeout)
        try:
            writer.write(head + data)
            await writer.drain()
            status = await reader.readline()
            if b" 200 " not in status:
                raise RuntimeError(f"HTTP {status.decode(errors='replace').split(' ', 2)[1]}")
            async for line in reader:
                if line.startswith(b"data: "):
                    yield line[6:].rstrip(b"\r\n")
        finally:
            writer.close()


async def one_raw_http_request(client: _RawHttp, ids, n_out, sem, rec: dict):
    async with sem:
        t0 = time.perf_counter()
        rec["start"] = t0
        await _time_sse(client.sse("/v1/completions", _completion_body(ids, n_out)), rec, t0)



def _client(transport: str, target: str, api_key, timeout: float, max_concurrency: int):
    if transport == "http-raw":
        return _RawHttp(target, api_key, timeout)
    if transport == "http":
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return httpx.AsyncClient(base_url=f"http://{target}", headers=headers, timeout=timeout,
                                 limits=httpx.Limits(max_connections=max_concurrency + 4))
    from serving.client import AsyncGenerationClient

    return AsyncGenerationClient(target, api_key=api_key, timeout=timeout)


async def run_rate(target: str, api_key, reqs, rate: float, max_concurrency: int, seed: int, timeout: float,
                   transport: str = "grpc") -> dict:
    rng = random.Random(seed)
    recs = [{"prompt_tokens": len(ids), "requested": n} for ids, n in reqs]
    sem = asyncio.Semaphore(max_concurrency)
    send = {"http": one_http_request, "http-raw": one_raw_http_request}.get(transport, one_request)
    async with _client(transport, target, api_key, timeout, max_concurrency) as client:
        t0 = time.perf_counter()
        tasks = []
        for (ids, n), rec in zip(reqs, recs):
            tasks.append(asyncio.create_task(send(client, ids, n, sem, rec)))
            if rate != float("inf"):
                await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    ok = [r for r in recs if r.get("ok")]
    errors: dict[str, int] = {}
    for r in recs:
        if not r.get("ok"):
            errors[r.get("error", "unknown")] = errors.get(r.get("error", "unknown"), 0) + 1
    out_tok = sum(r["output_tokens"] for r in ok)
    tpot = [(r["e2e"] - r["ttft"]) / (r["output_tokens"] - 1) for r in ok if r["output_tokens"] > 1 and "ttft" in r]
    row = {"transport": transport, "request_rate": rate, "max_concurrency": max_concurrency, "requests": len(recs), "completed": len(ok),
           "failed": len(recs) - len(ok), "errors": errors, "duration_s": duration,
           "requests_per_s": len(ok) / duration, "output_tokens_per_s": out_tok / duration,
           "total_tokens_per_s": (out_tok + sum(r["prompt_tokens"] for r in ok)) / duration,
           "output_tokens": out_tok, "short_outputs": sum(1 for r in ok if r["output_tokens"] != r["requested"])}
    for name, xs in (("ttft", [r["ttft"] for r in ok if "ttft" in r]), ("tpot", tpot),
                     ("itl", [x for r in ok for x in r["itl"]]), ("e2e", [r["e2e"] for r in ok])):
        s = summarize(xs)
        for k in ("mean", "p50", "p90", "p99"):
            row[f"{name}_{k}_ms"] = 1e3 * s[k]
    return row


def parse_rates(s: str) -> list[float]:
    return [float("inf") if x.strip().lower() in ("inf", "infinity") else float(x) for x in s.split(",")]


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="127.0.0.1:50051", help="gRPC HOST:PORT (also where model info comes from)")
    ap.add_argument("--transport", default="grpc",
                    help="grpc, http (the httpx client), http-raw (a minimal asyncio HTTP/1.0 client), or a "
                         "comma list (grpc,http-raw): each rate is run over each, in turn")
    ap.add_argument("--http-target", default="127.0.0.1:8000", help="HOST:PORT of the server's --http-port")
    ap.add_argument("--api-key", default=os.environ.get("JAXLLM_API_KEY"))
    add_workload_args(ap)
    ap.add_argument("--request-rate", default="inf", help="requests/s (Poisson), 'inf', or a comma list")
    ap.add_argument("--max-concurrency", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup-requests", type=int, default=1, help="requests sent (and ignored) first")
    ap.add_argument("--timeout", type=float, default=600.0, help="per-request deadline, seconds")
    ap.add_argument("--overload", type=float, default=None, metavar="FACTOR",
                    help="overload mode: a burst of FACTOR x the server's --max-queued-requests "
                         "requests, all at once (overrides --num-prompts, --request-rate and "
                         "--max-concurrency); RESOURCE_EXHAUSTED refusals are expected and "
                         "counted, latencies are those of the accepted requests, and health must "
                         "still be SERVING after")
    ap.add_argument("--output-json")
    return ap


COLUMNS = [("transport", "door", ""), ("request_rate", "rate/s", ""), ("completed", "done", ""), ("failed", "failed", ""),
           ("duration_s", "secs", ".1f"), ("requests_per_s", "req/s", ".3f"),
           ("output_tokens_per_s", "out tok/s", ".1f"),
           ("ttft_mean_ms", "TTFT mean", ".0f"), ("ttft_p50_ms", "P50", ".0f"), ("ttft_p90_ms", "P90", ".0f"),
           ("ttft_p99_ms", "P99", ".0f"),
           ("tpot_mean_ms", "TPOT mean", ".1f"), ("tpot_p50_ms", "P50", ".1f"), ("tpot_p90_ms", "P90", ".1f"),
           ("tpot_p99_ms", "P99", ".1f"),
           ("itl_mean_ms", "ITL mean", ".1f"), ("itl_p50_ms", "P50", ".1f"), ("itl_p90_ms", "P90", ".1f"),
           ("itl_p99_ms", "P99", ".1f"),
           ("e2e_mean_ms", "E2E mean", ".0f"), ("e2e_p50_ms", "P50", ".0f"), ("e2e_p90_ms", "P90", ".0f"),
           ("e2e_p99_ms", "P99", ".0f")]


async def amain(args) -> dict:
    from serving.client import AsyncGenerationClient

    async with AsyncGenerationClient(args.target, api_key=args.api_key, timeout=30) as c:
        health = await c.health()
        if health != "SERVING":
            raise SystemExit(f"{args.target}: health is {health}, not SERVING")
        info = await c.model_info()
    if args.overload:
        queue = info.limits.max_queued_requests
        args.num_prompts = max(1, round(args.overload * queue))
        args.request_rate, args.max_concurrency = "inf", args.num_prompts
        log(f"overload: a burst of {args.num_prompts} requests = {args.overload:g} x "
            f"--max-queued-requests={queue}")
    reqs = make_requests(args.num_prompts, parse_range(args.input_len), parse_range(args.output_len),
                         info.vocab_size, set(info.eos_token_ids), args.seed)
    too_long = [i for i, (ids, n) in enumerate(reqs) if len(ids) >= info.max_model_len]
    if too_long:
        raise SystemExit(f"{len(too_long)} prompts exceed max_model_len={info.max_model_len}")
    log(f"server {info.model} (max_model_len {info.max_model_len}, max_num_seqs {info.max_num_seqs}); "
        f"{len(reqs)} requests, {sum(len(i) for i, _ in reqs)} prompt / {sum(n for _, n in reqs)} output tokens")
    transports = [t.strip() for t in args.transport.split(",") if t.strip()]
    bad = [t for t in transports if t not in ("grpc", "http", "http-raw")]
    if bad or not transports:
        raise SystemExit(f"--transport {args.transport!r} is invalid: use grpc, http, http-raw or a comma list")
    targets = {"grpc": args.target, "http": args.http_target, "http-raw": args.http_target}
    if args.warmup_requests:
        warm = make_requests(args.warmup_requests, (16, 16), (4, 4), info.vocab_size, set(info.eos_token_ids),
                             args.seed + 1)
        for t in transports:
            await run_rate(targets[t], args.api_key, warm, float("inf"), args.max_concurrency, args.seed,
                           args.timeout, t)
    rows = []
    for rate in parse_rates(args.request_rate):
        for t in transports:
            load0 = machine_info()["loadavg_1_5_15"]
            row = await run_rate(targets[t], args.api_key, reqs, rate, args.max_concurrency, args.seed,
                                 args.timeout, t)
            row["load_before"], row["load_after"] = load0, machine_info()["loadavg_1_5_15"]
            if args.overload and t == "grpc":
                row["refused"] = row["errors"].get("RESOURCE_EXHAUSTED", 0)
                async with AsyncGenerationClient(targets[t], api_key=args.api_key, timeout=30) as c:
                    row["health_after"] = await c.health()
                log(f"overload: {row['completed']} accepted and completed, {row['refused']} refused "
                    f"(RESOURCE_EXHAUSTED), other errors {row['failed'] - row['refused']}; TTFT P99 of "
                    f"accepted {row['ttft_p99_ms']:.0f} ms; health after: {row['health_after']}")
            rows.append(row)
            log(f"{t} rate {rate}: {row['completed']}/{row['requests']} ok in {row['duration_s']:.1f}s, "
                f"TTFT mean {row['ttft_mean_ms']:.0f} ms, TPOT mean {row['tpot_mean_ms']:.1f} ms")
    return {"rows": rows, "server": {"model": info.model, "max_model_len": info.max_model_len,
                                     "max_num_seqs": info.max_num_seqs, "dtype": info.dtype}}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    machine = machine_info()
    result = asyncio.run(amain(args))
    rows = result["rows"]
    print()
    print("latencies in ms")
    print(format_table(rows, COLUMNS))
    for r in rows:
        if r["failed"]:
            print(f"{r['transport']} rate {r['request_rate']}: {r['failed']} failed: {r['errors']}")
        if r["short_outputs"]:
            print(f"{r['transport']} rate {r['request_rate']}: {r['short_outputs']} requests returned fewer "
                  f"tokens than asked")
    if args.output_json:
        write_json(args.output_json, {**result, "machine": machine,
                                      "workload": {"num_prompts": args.num_prompts, "input_len": args.input_len,
                                                   "output_len": args.output_len, "seed": args.seed}})
    if args.overload:  # refusals are the point; anything else, or health not SERVING, fails
        return 0 if all(r["failed"] == r["refused"] and r["health_after"] == "SERVING" and r["completed"]
                        for r in rows) else 1
    return 0 if all(r["failed"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
