"""/v1/responses vs /v1/chat/completions through the OpenAI HTTP API: the same conversations,
one server, one run, non-streamed and streamed.

    JAX_PLATFORMS=cpu python bench/responses.py --requests 8 --max-tokens 64

Starts ``python -m serving --model MODEL --http-port 0`` (a real process, real HTTP), waits for
SERVING, warms each (endpoint, stream) pair once (unmeasured), then for each of ``--requests``
questions sends the chat request and the Responses request (greedy, one request at a time; the
order alternates per question so drift hits both alike), non-streamed then streamed. Greedy
decoding of the same rendered prompt gives the same tokens: the script checks that the two
answers' texts and token counts are equal (so both did the same engine work) and fails otherwise.
Per (endpoint, stream): mean / P50 latency per request, completion tokens, tok/s = tokens / time.
The ratio responses / chat is what the Responses door costs (its body translation, its output
items and events; a text delta's event is about a chat chunk's size); the engine work is the same.

``--fake-engine``: the server in this process instead (tests/serving/http_helpers.ThreadedServer:
the real host engine, scheduler and front door over the fake runner and byte tokenizer, no model
compute), so the time is the HTTP door's and the host engine's: the door's own cost per token shows.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.tool_calls import start_server  # noqa: E402

QUESTIONS = ["Tell me about Paris.", "How do bees make honey?", "Explain rain to a child.",
             "What is a prime number?", "Describe a sunset.", "Why is the sea salty?",
             "How does a bicycle work?", "What do cats eat?", "Name three planets and one fact each.",
             "What is jazz?"]
SYSTEM = "You are a helpful assistant."


def chat(client: httpx.Client, url: str, q: str, max_tokens: int, stream: bool) -> dict:
    body = {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
            "max_tokens": max_tokens, "temperature": 0}
    if not stream:
        t = time.perf_counter()
        r = client.post(url + "/v1/chat/completions", json=body)
        dt = time.perf_counter() - t
        r.raise_for_status()
        out = r.json()
        return {"latency": dt, "tokens": out["usage"]["completion_tokens"], "text": out["choices"][0]["message"]["content"]}
    body.update(stream=True, stream_options={"include_usage": True})
    text, tokens = [], 0
    t = time.perf_counter()
    with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ch = json.loads(line[6:])
            for c in ch["choices"]:
                text.append(c["delta"].get("content") or "")
            if ch.get("usage"):
                tokens = ch["usage"]["completion_tokens"]
    return {"latency": time.perf_counter() - t, "tokens": tokens, "text": "".join(text)}


def responses(client: httpx.Client, url: str, q: str, max_tokens: int, stream: bool) -> dict:
    body = {"instructions": SYSTEM, "input": q, "max_output_tokens": max_tokens, "temperature": 0}
    if not stream:
        t = time.perf_counter()
        r = client.post(url + "/v1/responses", json=body)
        dt = time.perf_counter() - t
        r.raise_for_status()
        out = r.json()
        text = "".join(p["text"] for i in out["output"] if i["type"] == "message" for p in i["content"])
        return {"latency": dt, "tokens": out["usage"]["output_tokens"], "text": text}
    body["stream"] = True
    text, tokens = [], 0
    t = time.perf_counter()
    with client.stream("POST", url + "/v1/responses", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            ev = json.loads(line[6:])
            if ev["type"] == "response.output_text.delta":
                text.append(ev["delta"])
            elif ev["type"] == "response.completed":
                tokens = ev["response"]["usage"]["output_tokens"]
    return {"latency": time.perf_counter() - t, "tokens": tokens, "text": "".join(text)}


def summary(res: list[dict]) -> dict:
    lat = [r["latency"] for r in res]
    toks = sum(r["tokens"] for r in res)
    return {"requests": len(res), "mean_ms": 1e3 * statistics.mean(lat), "p50_ms": 1e3 * statistics.median(lat),
            "completion_tokens": toks, "tok_s": toks / sum(lat)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--server-args", default="--max-model-len 1024 --max-num-seqs 4 --max-num-batched-tokens 512",
                    help="more flags for python -m serving")
    ap.add_argument("--fake-engine", action="store_true",
                    help="serve in-process over the fake runner (no model compute): the door's own cost")
    ap.add_argument("--output-json", default=None)
    args = ap.parse_args()
    t0 = time.perf_counter()
    if args.fake_engine:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "serving"))
        from http_helpers import ThreadedServer, make_llm_engine

        fake = ThreadedServer(make_llm_engine(max_model_len=2048, num_blocks=2048, max_num_seqs=4))
        proc, url = None, fake.base_url
    else:
        proc, url = start_server(args.model, args.server_args.split())
    print(f"server up in {time.perf_counter() - t0:.1f} s at {url}", flush=True)
    doors = {"chat": chat, "responses": responses}
    res: dict[str, list[dict]] = {f"{d} {'stream' if s else 'json'}": [] for s in (False, True) for d in doors}
    try:
        with httpx.Client(timeout=600) as client:
            for stream in (False, True):
                for fn in doors.values():
                    fn(client, url, "Hello!", args.max_tokens, stream)  # warm-up: first use of each path
            for i in range(args.requests):
                q = QUESTIONS[i % len(QUESTIONS)]
                for stream in (False, True):
                    order = list(doors) if i % 2 == 0 else list(doors)[::-1]
                    got = {d: doors[d](client, url, q, args.max_tokens, stream) for d in order}
                    if (got["chat"]["text"], got["chat"]["tokens"]) != (got["responses"]["text"], got["responses"]["tokens"]):
                        raise SystemExit(f"question {i} stream={stream}: the answers differ: {got}")
                    for d in doors:
                        res[f"{d} {'stream' if stream else 'json'}"].append(got[d])
    finally:
        if proc is None:
            fake.close()
        else:
            proc.terminate()
            proc.wait(60)
    rows = {k: summary(v) for k, v in res.items()}
    print(f"{'endpoint':18} {'req':>4} {'mean ms':>9} {'p50 ms':>9} {'tokens':>7} {'tok/s':>7}")
    for k, r in rows.items():
        print(f"{k:18} {r['requests']:4d} {r['mean_ms']:9.1f} {r['p50_ms']:9.1f} {r['completion_tokens']:7d} "
              f"{r['tok_s']:7.1f}")
    for s in ("json", "stream"):
        print(f"responses / chat ({s}): tok/s {rows[f'responses {s}']['tok_s'] / rows[f'chat {s}']['tok_s']:.3f}")
    print(f"sample: {res['chat json'][0]['text'][:160]!r}")
    if args.output_json:
        from bench.common import machine_info, write_json

        write_json(args.output_json, {"machine": machine_info(), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
