"""Streaming cost of the reasoning parsers (serving/reasoning_parsers): an output fed ~one token
(4 characters) at a time, as the HTTP server feeds a stream, at two output lengths.

    python bench/reasoning_parse.py                  # 2,000 and 20,000 tokens, every parser
    python bench/reasoning_parse.py --tokens 2000 --parsers qwen3

Each output is a think block (in the parser's tags) filling three quarters of it, then the
answer. The reasoning is strewn with beginnings of the end tag (``<``, ``</``, ``</think``) so
that many feeds end in a possible end tag and are held back, the case where a rescanning parser turns quadratic. Per length:
total ms of all feeds + finish, mean µs per feed (wall clock, and CPU time of this thread, which
leaves out time slices lost to other processes on a shared machine), and the slowest single feed
in ms, each the fastest of --repeat runs. A linear parser shows the same µs per feed at both lengths. The parse
is checked against the reasoning and content written.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from serving.reasoning_parsers import PARSERS  # noqa: E402

ANSWER = "9.8 is greater than 9.11, because 0.8 > 0.11. "


def workload(cls, tokens: int) -> tuple[str, str, str]:
    """(text, reasoning, content) of an output of ``tokens`` * 4 characters in ``cls``'s tags."""
    chars = 4 * tokens
    end = cls.END
    thought = f"Let me compare 9.11 and 9.8 {end[:-1]} not yet; a {end[0]} b {end[:2]} maybe Zürich 東京 "
    reasoning = (thought * (chars // len(thought) + 1))[: chars * 3 // 4]
    head = cls.START + "\n" + reasoning + "\n" + end + "\n\n"
    content = (ANSWER * (chars // len(ANSWER) + 1))[: max(chars - len(head), 1)]
    return head + content, "\n" + reasoning + "\n", "\n\n" + content


def run_once(cls, chunks: list[str]) -> tuple[float, float, int, int]:
    """Seconds (wall, thread CPU) for all feeds + finish, and the reasoning / content characters
    streamed."""
    p = cls()
    r = c = 0
    c0 = time.thread_time()
    t0 = time.perf_counter()
    for ch in chunks:
        d = p.feed(ch)
        r += len(d.reasoning)
        c += len(d.content)
    d = p.finish()
    dt, cpu = time.perf_counter() - t0, time.thread_time() - c0
    return dt, cpu, r + len(d.reasoning), c + len(d.content)


def slowest_feed(cls, chunks: list[str]) -> float:
    """Seconds of the slowest single feed (a separate run: timing each feed costs time too)."""
    p, slowest = cls(), 0.0
    for ch in chunks:
        t = time.perf_counter()
        p.feed(ch)
        slowest = max(slowest, time.perf_counter() - t)
    return slowest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[2000, 20000],
                    help="output lengths in tokens (4 characters each)")
    ap.add_argument("--parsers", nargs="+", default=sorted(PARSERS), choices=sorted(PARSERS),
                    help="parsers to run")
    ap.add_argument("--repeat", type=int, default=5, help="runs per case; the best is reported")
    args = ap.parse_args()
    print(f"{'parser':<12} {'tokens':>7} {'chars':>7} {'feeds':>6} {'total ms':>9} {'us/feed':>8} "
          f"{'cpu us/feed':>12} {'slowest feed':>13}")
    for name in args.parsers:
        cls = PARSERS[name]
        for tokens in args.tokens:
            text, reasoning, content = workload(cls, tokens)
            chunks = [text[i:i + 4] for i in range(0, len(text), 4)]
            got = cls().extract(text)
            if (got.reasoning, got.content) != (reasoning, content):
                raise SystemExit(f"error: {name} split the output wrongly")
            best = best_cpu = float("inf")
            for _ in range(args.repeat):
                dt, cpu, r, c = run_once(cls, chunks)
                if (r, c) != (len(reasoning), len(content)):
                    raise SystemExit(f"error: {name} streamed {r} + {c} characters, wrote "
                                     f"{len(reasoning)} + {len(content)}")
                best, best_cpu = min(best, dt), min(best_cpu, cpu)
            best_slowest = min(slowest_feed(cls, chunks) for _ in range(args.repeat))
            print(f"{name:<12} {tokens:>7} {len(text):>7} {len(chunks):>6} {best * 1e3:>9.2f} "
                  f"{best * 1e6 / len(chunks):>8.2f} {best_cpu * 1e6 / len(chunks):>12.2f} {best_slowest * 1e3:>13.2f}")


if __name__ == "__main__":
    main()
