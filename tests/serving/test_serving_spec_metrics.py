"""Speculative decoding's series (vLLM V1's ``spec_decode_*``, jaxllm: prefix) scraped from a real
``--metrics-port`` with prometheus-client's parser, and its part of the ``--log-stats`` line. The
reference: what the runner returned, counted by a wrapper around its dispatch (drafts scheduled,
tokens handed back per drafted sequence), not the engine's own totals."""

from __future__ import annotations

import asyncio

from jaxllm.config import EngineConfig
from jaxllm.engine.engine import LLMEngine
from jaxllm.metrics.loggers import LoggingStatLogger
from jaxllm.metrics.stats import IterationStats, SchedulerStats, SpecDecodingStats
from serving.frontdoor import PROBE_PREFIX
from serving_helpers import run, running_server
from test_serving_metrics import delta, scrape
from tests.fakes.fake_runner import FakeRunner
from tests.fakes.fake_tokenizer import FakeIncrementalDetokenizer, FakeTokenizer

K = 3
SCRIPT = "the quick brown fox jumps over the lazy dog. "


def spec_engine():
    """The real engine over the fake runner, whose "model" writes SCRIPT over and over (prompt lookup
    finds it in prompts that contain it), with n-gram drafts; `seen` counts what the runner did."""
    tok = FakeTokenizer()
    script = tok.encode(SCRIPT, add_special_tokens=False)
    runner = FakeRunner(256, 4, vocab_size=tok.vocab_size, eos_token_ids=tok.eos_token_ids,
                        next_token_fn=lambda ctx, seq: script[(len(ctx) - seq.num_prompt_tokens) % len(script)])
    config = EngineConfig(model="fake-llm", block_size=4, max_model_len=256, max_num_batched_tokens=64,
                          max_num_seqs=8, speculative_config={"method": "ngram", "num_speculative_tokens": K,
                                                              "prompt_lookup_min": 2, "prompt_lookup_max": 4})
    eng = LLMEngine(config, runner, tok, detokenizer_factory=FakeIncrementalDetokenizer)
    seen = {"drafts": 0, "draft_tokens": 0, "accepted": 0, "per_pos": [0] * K}
    dispatch = runner.dispatch

    def counting_dispatch(out):
        pending = dispatch(out)
        result = pending.result

        def counted():
            res = result()
            for s in out.seqs:
                got = res.get(s.request_id)
                if s.num_draft_tokens and got is not None and not s.request_id.startswith(PROBE_PREFIX):
                    seen["drafts"] += 1
                    seen["draft_tokens"] += s.num_draft_tokens
                    seen["accepted"] += len(got) - 1
                    for i in range(len(got) - 1):
                        seen["per_pos"][i] += 1
            return res
        pending.result = counted
        return pending
    runner.dispatch = counting_dispatch
    return eng, seen


def test_spec_decode_series_count_what_the_runner_did():
    eng, seen = spec_engine()

    async def main():
        async with running_server(eng, metrics_port=0, health_probe_interval=3600) as c:
            port = c.server.metrics.port
            await c.wait_blocks_free()
            before = await scrape(port, "fake-llm")
            for name in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):  # there from the start
                assert (f"jaxllm:spec_decode_{name}_total", ()) in before, sorted(before)
            assert {("jaxllm:spec_decode_num_accepted_tokens_per_pos_total", (("position", str(i)),))
                    for i in range(K)} <= set(before)
            base = dict(seen, per_pos=list(seen["per_pos"]))
            calls = [c.generate(prompt=SCRIPT * 2 + f"go {i}", max_tokens=30 + i, ignore_eos=True) for i in range(4)]
            calls.append(c.generate(prompt="no script here", max_tokens=12, ignore_eos=True))
            await asyncio.gather(*calls)
            await c.wait_blocks_free()
            after = await scrape(port, "fake-llm")
        return before, after, base

    before, after, base = run(main())
    want = {k: seen[k] - base[k] for k in ("drafts", "draft_tokens", "accepted")}
    assert want["drafts"] > 0 and want["accepted"] > 0, want
    assert delta(before, after, "jaxllm:spec_decode_num_drafts_total") == want["drafts"]
    assert delta(before, after, "jaxllm:spec_decode_num_draft_tokens_total") == want["draft_tokens"]
    assert delta(before, after, "jaxllm:spec_decode_num_accepted_tokens_total") == want["accepted"]
    per_pos = [delta(before, after, "jaxllm:spec_decode_num_accepted_tokens_per_pos_total", position=str(i))
               for i in range(K)]
    assert per_pos == [n - b for n, b in zip(seen["per_pos"], base["per_pos"])] and sum(per_pos) == want["accepted"]


def test_log_stats_line_has_acceptance_length_and_rate():
    lines = []
    logger = LoggingStatLogger(0, emit=lines.append)
    s = SchedulerStats(num_running_reqs=2, num_waiting_reqs=0, kv_cache_usage=0.5)
    logger.record(s, IterationStats(num_generation_tokens=2))  # no drafts: no spec part
    assert "Spec decode" not in lines[-1]
    for drafts in ([(3, 3), (3, 0)], [(2, 1)]):  # two steps in one interval: 3 drafts, 8 tokens, 4 accepted
        sd = SpecDecodingStats(3)
        for d, a in drafts:
            sd.observe_draft(d, a)
        logger.interval = 0 if len(drafts) == 1 else 3600
        logger.record(s, IterationStats(num_generation_tokens=6, spec_decoding=sd))
    assert lines[-1].endswith(", Spec decode: mean acceptance length 2.33, acceptance rate 50.0% (4/8 draft tokens)"), \
        lines[-1]
    assert sd.num_accepted_tokens_per_pos == [1, 0, 0]
    logger.record(s, IterationStats(num_generation_tokens=1))  # the next interval had none
    assert "Spec decode" not in lines[-1]
