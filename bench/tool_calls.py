"""Tool calling's cost through the OpenAI HTTP API: the same chat request answered free and with
``tool_choice`` forcing a call (named: the tool's parameters schema; required: the JSON array of
calls), one server, one run.

    JAX_PLATFORMS=cpu python bench/tool_calls.py --requests 8 --max-tokens 64

Starts ``python -m serving --model MODEL --http-port 0`` (a real process, real HTTP), waits for
SERVING, warms each mode once (grammar compile, first-use paths; unmeasured), then for each of
``--requests`` user questions (greedy, one request at a time) sends the forced request, then the
same request free (``tool_choice`` "none", no response_format) with ``min_tokens = max_tokens`` =
the forced answer's token count, so both run the same prompt and the same number of decode
steps. Per mode: mean / P50 / max latency per request, completion tokens, tok/s = tokens / time.
The ratio forced / free is what the constraint costs (llguidance's mask every step, the tool
reader): same work otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather forecast for a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 24},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14}},
        "required": ["city", "unit", "days"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "get_time", "description": "Local time in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}},
                       "required": ["city"], "additionalProperties": False}}}]
CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Perth", "Quito", "Seoul", "Dakar", "Riga"]
MODES = {"free": {"tool_choice": "none"},
         "named": {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
         "required": {"tool_choice": "required"}}


def start_server(model: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "serving", "--model", model, "--port", "0", "--http-port", "0",
           "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))
    url = None
    for line in proc.stdout:
        if line.startswith("serving: listening http="):
            url = "http://" + line.split("=", 1)[1].strip()
            break
    if url is None:
        raise SystemExit(f"server exited with {proc.wait()} before listening")
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.terminate()
    raise SystemExit("server not SERVING after 900 s")


def one(client: httpx.Client, url: str, city: str, mode: str, max_tokens: int, exact: bool = False) -> dict:
    """One request: latency, completion tokens, the answer. ``exact``: exactly max_tokens tokens."""
    body = {"messages": [{"role": "user", "content": f"What is the weather in {city} for the next days?"}],
            "tools": TOOLS, "max_tokens": max_tokens, "temperature": 0, **MODES[mode]}
    if exact:
        body.update(min_tokens=max_tokens, ignore_eos=True)
    t = time.perf_counter()
    r = client.post(url + "/v1/chat/completions", json=body)
    dt = time.perf_counter() - t
    r.raise_for_status()
    out = r.json()
    c = out["choices"][0]
    return {"latency": dt, "tokens": out["usage"]["completion_tokens"], "finish": c["finish_reason"],
            "answer": c["message"].get("tool_calls") or c["message"]["content"]}


def summary(res: list[dict]) -> dict:
    lat = [r["latency"] for r in res]
    toks = sum(r["tokens"] for r in res)
    return {"requests": len(res), "mean_ms": 1e3 * statistics.mean(lat), "p50_ms": 1e3 * statistics.median(lat),
            "max_ms": 1e3 * max(lat), "completion_tokens": toks, "tok_s": toks / sum(lat),
            "sample": res[0]["answer"], "finish_reason": res[0]["finish"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--server-args", default="--max-model-len 1024 --max-num-seqs 4 --max-num-batched-tokens 512",
                    help="more flags for python -m serving")
    ap.add_argument("--output-json", default=None)
    args = ap.parse_args()
    t0 = time.perf_counter()
    proc, url = start_server(args.model, args.server_args.split())
    print(f"server up in {time.perf_counter() - t0:.1f} s at {url}", flush=True)
    rows = {}
    try:
        with httpx.Client(timeout=600) as client:
            for mode in MODES:
                one(client, url, "Berlin", mode, args.max_tokens)  # warm-up: grammar compile, first use
            for mode in ("named", "required"):
                forced, free = [], []
                for i in range(args.requests):  # the forced call, then free text of its length
                    forced.append(one(client, url, CITIES[i % len(CITIES)], mode, args.max_tokens))
                    free.append(one(client, url, CITIES[i % len(CITIES)], "free", forced[-1]["tokens"], exact=True))
                rows[mode], rows[f"free ({mode} lengths)"] = summary(forced), summary(free)
    finally:
        proc.terminate()
        proc.wait(60)
    print(f"{'mode':24} {'req':>4} {'mean ms':>9} {'p50 ms':>9} {'max ms':>9} {'tokens':>7} {'tok/s':>7}")
    for mode, r in rows.items():
        print(f"{mode:24} {r['requests']:4d} {r['mean_ms']:9.1f} {r['p50_ms']:9.1f} {r['max_ms']:9.1f} "
              f"{r['completion_tokens']:7d} {r['tok_s']:7.1f}")
    for mode in ("named", "required"):
        free = rows[f"free ({mode} lengths)"]
        print(f"{mode} / free: tok/s {rows[mode]['tok_s'] / free['tok_s']:.3f}, "
              f"mean latency {rows[mode]['mean_ms'] / free['mean_ms']:.3f}")
    for mode, r in rows.items():
        print(f"sample {mode} ({r['finish_reason']}): {json.dumps(r['sample'])[:200]}")
    if args.output_json:
        from bench.common import machine_info, write_json

        write_json(args.output_json, {"machine": machine_info(), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
