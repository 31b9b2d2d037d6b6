"""Beam-search decode work: tokens the engine computed vs tokens the search used, offline vs server.

    python bench/beam_overhead.py --prompts 4 --width 4 --max-tokens 32 --step-ms 3

The real host engine (scheduler, KV cache manager, output processor) over the fake runner at
``--step-ms`` per step (tests/serving/http_helpers.py's SlowRunner), so the server's engine thread
steps at a realistic pace while the beam driver decides. Modes, each over fresh engines, the same
prompts (all searched at once):
- ``offline``: ``LLM.beam_search`` (the driver steps the engine itself);
- ``server ungated``: /v1/completions ``use_beam_search`` with the driver's step gate off (the
  engine keeps decoding beams while the driver decides: the behaviour before step gates);
- ``server gated``: the same with step gates (serving/beam.py's default).
Columns (sums over the prompts): ``used`` = candidate entries the search consumed after the first
(each needs one computed token); ``computed`` = tokens the engine computed for the search's requests,
the prompts' first prefill excluded; ``wasted`` = computed - used; ``forks``; ``fork prefill`` =
tokens forks prefilled past their one token (a fork whose parent was gone); ``copies`` = partial
blocks copied for forks. Server results are checked equal to offline (greedy).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "serving"))

from bench.common import format_table, log_machine  # noqa: E402


class Tally:
    """Counts what the engine schedules for the searches (wrapping its scheduler's ``schedule``)."""

    def __init__(self, engine):
        self.computed = 0  # every token but the roots' prompt tokens
        self.copies = 0  # partial blocks copied for forks (SchedulerOutput.block_copies)
        self.fork_prompt: dict[str, int] = {}  # fork id -> its prompt tokens computed (1 = no prefill)
        sched = engine.scheduler
        real = sched.schedule

        def schedule():
            out = real()
            self.copies += len(out.block_copies)
            for seq in out.seqs:
                if seq.request_id.startswith("__"):
                    continue  # the server's health probes
                n = len(seq.token_ids)
                in_prompt = max(0, min(seq.start_pos + n, seq.num_prompt_tokens) - seq.start_pos)
                if seq.request_id.endswith(".0"):  # a search's first request: its prompt is no beam's work
                    self.computed += n - in_prompt
                else:
                    self.computed += n
                    if in_prompt:
                        self.fork_prompt[seq.request_id] = self.fork_prompt.get(seq.request_id, 0) + in_prompt
            return out

        sched.schedule = schedule

    @property
    def forks(self) -> int:
        return len(self.fork_prompt)

    @property
    def fork_prefill(self) -> int:
        return sum(n - 1 for n in self.fork_prompt.values())


def patch_advance(counter: list[int]):
    from jaxllm.beam_search import BeamSearchRun

    real = BeamSearchRun.advance

    def advance(self):
        counter[0] += len(self.beams)
        return real(self)

    BeamSearchRun.advance = advance
    return lambda: setattr(BeamSearchRun, "advance", real)


def make_engine(step_ms: float, max_num_seqs: int):
    import http_helpers
    from http_helpers import SlowRunner, make_llm_engine

    class Runner(SlowRunner):
        def dispatch(self, out):
            time.sleep(max(0.0, step_ms / 1000 - 0.003))
            return super().dispatch(out)

    del http_helpers
    return make_llm_engine(max_model_len=512, num_blocks=2048, max_num_seqs=max_num_seqs, runner_cls=Runner)


def run_offline(args, prompts):
    from jaxllm import LLM, BeamSearchParams

    engine = make_engine(args.step_ms, args.max_num_seqs)
    tok = engine.tokenizer
    tally = Tally(engine)
    used = [0]
    undo = patch_advance(used)
    t0 = time.perf_counter()
    try:
        outs = LLM("fake-llm", engine=engine).beam_search(
            prompts, BeamSearchParams(beam_width=args.width, max_tokens=args.max_tokens),
            concurrency_limit=len(prompts))
    finally:
        undo()
    wall = time.perf_counter() - t0
    n0 = [len(tok.encode(p)) for p in prompts]
    eos = set(tok.eos_token_ids)
    texts = [[tok.decode(s.tokens[k:][:-1] if s.tokens[k:] and s.tokens[-1] in eos else s.tokens[k:],
                         skip_special_tokens=False) for s in o.sequences] for o, k in zip(outs, n0)]
    return row("offline", tally, used[0] - len(prompts), wall), texts


def run_server(args, prompts, gated: bool):
    import httpx
    from http_helpers import ThreadedServer

    from serving.beam import BeamRequest

    engine = make_engine(args.step_ms, args.max_num_seqs)
    tally = Tally(engine)
    used = [0]
    undo = patch_advance(used)
    BeamRequest.step_gate = gated
    srv = ThreadedServer(engine)
    try:
        t0 = time.perf_counter()
        r = httpx.post(srv.base_url + "/v1/completions", timeout=120, json={
            "model": "fake-llm", "prompt": prompts, "n": args.width, "max_tokens": args.max_tokens,
            "temperature": 0, "use_beam_search": True})
        wall = time.perf_counter() - t0
        r.raise_for_status()
        srv.wait_idle(20)
    finally:
        srv.close()
        undo()
        BeamRequest.step_gate = True
    choices = r.json()["choices"]
    texts = [[c["text"] for c in choices[i * args.width:(i + 1) * args.width]] for i in range(len(prompts))]
    name = "server gated" if gated else "server ungated"
    return row(name, tally, used[0] - len(prompts), wall), texts


def row(mode, tally, used, wall):
    return {"mode": mode, "used": used, "computed": tally.computed, "wasted": tally.computed - used,
            "forks": tally.forks, "fork_prefill": tally.fork_prefill, "copies": tally.copies, "wall_s": wall}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--width", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--step-ms", type=float, default=3.0)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    args = ap.parse_args()
    log_machine()
    prompts = [f"prompt number {i} about beams" for i in range(args.prompts)]
    rows = []
    base, want = run_offline(args, prompts)
    rows.append(base)
    for gated in (False, True):
        r, texts = run_server(args, prompts, gated)
        r["equal_offline"] = texts == want  # the beams' texts (a final EOS dropped: vLLM's serving rule)
        rows.append(r)
    base["equal_offline"] = True
    print(format_table(rows, [
        ("mode", "mode", ""), ("used", "used", ""), ("computed", "computed", ""), ("wasted", "wasted", ""),
        ("forks", "forks", ""), ("fork_prefill", "fork prefill", ""), ("copies", "copies", ""),
        ("wall_s", "wall s", ".2f"), ("equal_offline", "= offline", "")]))


if __name__ == "__main__":
    main()
