"""Streaming cost of the tool-call parsers (serving/tool_parsers): an output fed ~one token
(4 characters) at a time, as the HTTP server feeds a stream, at two output lengths.

    python bench/tool_parse.py                       # 2,000 and 20,000 tokens, all four parsers
    python bench/tool_parse.py --tokens 2000 --parsers hermes

Each output is some prose and then tool calls in the parser's format: short calls (about 100
tokens each) filling half of it, then one call whose string argument fills the rest, so most of
the feeds land inside a held call, the case where a rescanning parser turns quadratic. Per length:
total ms of all feeds + finish, mean µs per feed, and the slowest single feed in ms (mistral,
pythonic: the one that closes the long call and parses it whole; hermes, llama3_json stream a
call's arguments as they come), each the fastest of --repeat runs. A linear parser
shows the same µs per feed at both lengths. The parse is checked against the calls written.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from serving.tool_parsers import PARSERS  # noqa: E402

PROSE = "Let me look that up for you; I will call the tools below. "


def write(parser: str, calls: list[tuple[str, dict]]) -> str:
    """``calls`` in ``parser``'s output format, after a line of prose where the format allows it."""
    if parser == "hermes":
        return PROSE + "\n" + "".join(
            f'<tool_call>\n{json.dumps({"name": n, "arguments": a})}\n</tool_call>\n' for n, a in calls)
    if parser == "llama3_json":
        return "<|python_tag|>" + "; ".join(json.dumps({"name": n, "parameters": a}) for n, a in calls)
    if parser == "mistral":
        return PROSE + "[TOOL_CALLS]" + json.dumps([{"name": n, "arguments": a} for n, a in calls])
    if parser == "pythonic":
        return "[" + ", ".join(n + "(" + ", ".join(f"{k}={v!r}" for k, v in a.items()) + ")"
                               for n, a in calls) + "]"
    raise ValueError(f"parser={parser!r} is invalid: must be one of {', '.join(sorted(PARSERS))}")


def workload(parser: str, tokens: int) -> tuple[str, list[tuple[str, dict]]]:
    chars = 4 * tokens
    calls: list[tuple[str, dict]] = []
    while len(write(parser, calls)) < chars // 2:
        i = len(calls)
        calls.append(("search_web", {"query": f"weather in city number {i} " * 8, "page": i,
                                     "filters": {"lang": "en", "safe": True}}))
    calls.append(("write_file", {"path": "notes.txt", "text": ""}))
    fill = chars - len(write(parser, calls))
    words = "Zürich \"quoted\" {braces} [brackets] and plain words " * (fill // 40 + 1)
    for _ in range(2):  # escaped quotes make the written text longer than the words: trim
        calls[-1] = ("write_file", {"path": "notes.txt", "text": words[:fill]})
        fill -= len(write(parser, calls)) - chars
    calls[-1] = ("write_file", {"path": "notes.txt", "text": words[:max(fill, 0)]})
    return write(parser, calls), calls


def run_once(cls, chunks: list[str]) -> tuple[float, int]:
    """Seconds for all feeds + finish, calls streamed (a call's first delta carries its name)."""
    p = cls(None)
    n_calls = 0
    t0 = time.perf_counter()
    for c in chunks:
        n_calls += sum(d.name is not None for d in p.feed(c).calls)
    n_calls += sum(d.name is not None for d in p.finish().calls)
    return time.perf_counter() - t0, n_calls


def slowest_feed(cls, chunks: list[str]) -> float:
    """Seconds of the slowest single feed (a separate run: timing each feed costs time too)."""
    p, slowest = cls(None), 0.0
    for c in chunks:
        t = time.perf_counter()
        p.feed(c)
        slowest = max(slowest, time.perf_counter() - t)
    return slowest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[2000, 20000],
                    help="output lengths in tokens (4 characters each)")
    ap.add_argument("--parsers", nargs="+", default=["hermes", "llama3_json", "mistral", "pythonic"],
                    choices=sorted(PARSERS), help="parsers to run")
    ap.add_argument("--repeat", type=int, default=5, help="runs per case; the best is reported")
    args = ap.parse_args()
    print(f"{'parser':<12} {'tokens':>7} {'chars':>7} {'feeds':>6} {'calls':>5} {'total ms':>9} "
          f"{'us/feed':>8} {'slowest feed':>13}")
    for name in args.parsers:
        cls = PARSERS[name]
        for tokens in args.tokens:
            text, calls = workload(name, tokens)
            chunks = [text[i:i + 4] for i in range(0, len(text), 4)]
            got = cls(None).extract(text).calls
            want = [(n, json.dumps(a, ensure_ascii=False)) for n, a in calls]
            if [(c.name, c.arguments) for c in got] != want:
                raise SystemExit(f"error: {name} parsed {len(got)} calls, wrote {len(calls)}")
            best = float("inf")
            for _ in range(args.repeat):
                dt, n = run_once(cls, chunks)
                if n != len(calls):
                    raise SystemExit(f"error: {name} streamed {n} calls, wrote {len(calls)}")
                best = min(best, dt)
            best_slowest = min(slowest_feed(cls, chunks) for _ in range(args.repeat))
            print(f"{name:<12} {tokens:>7} {len(text):>7} {len(chunks):>6} {len(calls):>5} "
                  f"{best * 1e3:>9.2f} {best * 1e6 / len(chunks):>8.2f} {best_slowest * 1e3:>13.2f}")


if __name__ == "__main__":
    main()
