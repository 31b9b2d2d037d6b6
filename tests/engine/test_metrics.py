"""Engine stats -> Prometheus series and the periodic log line, on the real LLMEngine with the
fake runner/tokenizer (no jax). The reference numbers come from the RequestOutputs, the
scheduler / KV manager's own counters and a log of what the runner was asked to compute."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from jaxllm.llm import LLM
from jaxllm.metrics.prometheus import PrometheusStatLogger
from jaxllm.pooling_params import PoolingParams
from jaxllm.runner.buckets import Buckets
from jaxllm.sampling_params import SamplingParams
from tests.engine.conftest import make_engine, run_all, script_fn
from tests.fakes.fake_tokenizer import FakeTokenizer

TOK = FakeTokenizer()
M = "fake"


def metric(reg, name, **labels):
    return reg.get_sample_value(name, {"model_name": M, **labels}) or 0.0


class Recorder:
    """Wraps the fake runner: the tokens of every step it computes (the iteration-tokens reference)."""

    def __init__(self, runner):
        self.runner, self.tokens = runner, []
        self.buckets = Buckets.make(8, 32)

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def execute(self, out):
        self.tokens.append(sum(len(s.token_ids) for s in out.seqs))
        return self.runner.execute(out)


def with_prometheus(engine):
    reg = CollectorRegistry()
    engine.add_stat_logger(PrometheusStatLogger(reg, M, max_model_len=128, max_num_batched_tokens=32))
    return reg


def test_counters_and_histograms_match_the_outputs():
    eng = make_engine(next_token_fn=script_fn("hello world, hello"), async_scheduling=False)
    eng.runner = rec = Recorder(eng.runner)
    reg = with_prometheus(eng)
    stop_id = TOK.encode("w")[0]
    eng.add_request("len", "the quick brown fox", SamplingParams(max_tokens=5, ignore_eos=True))
    eng.add_request("stopstr", "jumps over", SamplingParams(max_tokens=20, stop=["lo w"]))
    eng.add_request("stopid", "the lazy dog", SamplingParams(max_tokens=20, stop_token_ids=[stop_id]))
    eng.add_request("n2", "a prompt shared by two samples", SamplingParams(n=2, max_tokens=3))
    eng.add_request("abort", "to be aborted", SamplingParams(max_tokens=50))
    finals, aborted, running_seen = {}, None, []
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                finals[out.request_id] = out
        running_seen.append((metric(reg, "jaxllm:num_requests_running"), eng.scheduler.num_running,
                             metric(reg, "jaxllm:kv_cache_usage_perc"),
                             1 - eng.kv.num_free_blocks / eng.kv.num_blocks))
        if aborted is None and eng.num_steps >= 4:
            aborted = eng.abort_request("abort")[0]
    finals["abort"] = aborted
    run_all(eng)
    seqs = [(o, c) for o in finals.values() for c in o.outputs]
    assert len(seqs) == 6
    reasons = {}
    for _, c in seqs:
        reasons[c.finish_reason] = reasons.get(c.finish_reason, 0) + 1
    assert reasons == {"length": 3, "stop": 2, "abort": 1}, reasons
    for reason, n in reasons.items():
        assert metric(reg, "jaxllm:request_success_total", finished_reason=reason) == n
    gen = sum(len(c.token_ids) for _, c in seqs)
    started = [(o, c) for o, c in seqs if c.token_ids]
    assert metric(reg, "jaxllm:generation_tokens_total") == gen
    assert metric(reg, "jaxllm:prompt_tokens_total") == sum(len(o.prompt_token_ids) for o, _ in started)
    assert metric(reg, "jaxllm:time_to_first_token_seconds_count") == len(started)
    assert metric(reg, "jaxllm:inter_token_latency_seconds_count") == gen - len(started)
    assert metric(reg, "jaxllm:e2e_request_latency_seconds_count") == 6
    assert metric(reg, "jaxllm:request_queue_time_seconds_count") == 6
    assert metric(reg, "jaxllm:request_prompt_tokens_sum") == sum(len(o.prompt_token_ids) for o, _ in seqs)
    assert metric(reg, "jaxllm:request_generation_tokens_sum") == gen
    assert metric(reg, "jaxllm:request_generation_tokens_count") == 6
    # tokens per step: what the runner was asked to compute, step by step
    assert metric(reg, "jaxllm:iteration_tokens_total_count") == len(rec.tokens) == eng.num_steps
    assert metric(reg, "jaxllm:iteration_tokens_total_sum") == sum(rec.tokens)
    text = generate_latest(reg).decode()
    labels = {line.split('bucket="')[1].split('"')[0] for line in text.splitlines()
              if line.startswith("jaxllm:step_time_seconds_count")}
    allowed = {f"decode_{s}" for s, _, _ in rec.buckets.all()} | {f"mixed_{t}" for t in rec.buckets.mixed}
    assert labels and labels <= allowed, labels
    assert sum(metric(reg, "jaxllm:step_time_seconds_count", bucket=b) for b in labels) == eng.num_steps
    # gauges follow the scheduler after every step; all back to 0 at the end
    assert all(g == s and abs(k - ref) < 1e-9 for g, s, k, ref in running_seen), running_seen
    assert max(g for g, *_ in running_seen) > 0
    assert metric(reg, "jaxllm:num_requests_running") == 0 == metric(reg, "jaxllm:num_requests_waiting")
    assert metric(reg, "jaxllm:kv_cache_usage_perc") == 0
    assert metric(reg, "jaxllm:xla_compiles_since_warmup") == 0


def test_prefix_cache_and_preemptions_match_the_engine_counters():
    # 12 blocks of 4 tokens: three 16-token prompts generating 20 tokens each cannot all fit
    eng = make_engine(num_blocks=12, max_model_len=48, max_num_batched_tokens=64)
    reg = with_prometheus(eng)
    prompt = "sixteen tokens!!"
    sp = SamplingParams(max_tokens=20, ignore_eos=True)
    eng.add_request("warm", prompt, sp)
    outs = run_all(eng)
    for i in range(3):
        eng.add_request(f"r{i}", prompt, sp)
    outs.update(run_all(eng))
    assert eng.scheduler.num_preemptions > 0
    assert metric(reg, "jaxllm:num_preemptions_total") == eng.scheduler.num_preemptions
    assert metric(reg, "jaxllm:prefix_cache_queries_total") == eng.kv.prefix_queries > 0
    assert metric(reg, "jaxllm:prefix_cache_hits_total") == eng.kv.prefix_hits > 0
    assert eng.kv.prefix_hits >= sum(o.num_cached_tokens for o in outs.values()) > 0


def test_counters_start_at_zero_when_a_logger_is_attached_late():
    eng = make_engine()
    eng.add_request("before", "some prompt text", SamplingParams(max_tokens=4, ignore_eos=True))
    run_all(eng)
    reg = with_prometheus(eng)
    eng.add_request("after", "some prompt text", SamplingParams(max_tokens=4, ignore_eos=True))
    outs = run_all(eng)
    assert metric(reg, "jaxllm:prefix_cache_hits_total") == outs["after"].num_cached_tokens > 0
    assert metric(reg, "jaxllm:request_success_total", finished_reason="length") == 1


def test_embedding_requests_in_the_request_series():
    """vLLM V1 counts pooling requests in its request-level series: success by reason ("stop" when
    pooled), prompt tokens, e2e and queue time; they add nothing to the generation-only series
    (time to first token, inter-token latency, generated tokens). The reference numbers come from
    the EmbeddingRequestOutputs (prompt ids, RequestMetrics) and the scheduler's own requests."""
    from tests.engine.test_embed_engine import make_embed_engine

    eng = make_embed_engine(max_num_batched_tokens=16, async_scheduling=False)
    reg = with_prometheus(eng)
    prompts = {"short": [5, 6, 7], "chunked": list(range(2, 40))}  # 38 tokens: three chunks of <= 16
    for rid, ids in prompts.items():
        eng.add_request(rid, ids, PoolingParams())
    outs = run_all(eng)
    assert sorted(outs) == sorted(prompts) and eng.num_steps >= 3
    n_prompt = sum(len(o.prompt_token_ids) for o in outs.values())
    assert n_prompt == sum(len(p) for p in prompts.values())
    e2e = sum(o.metrics.finished_time - o.metrics.arrival_time for o in outs.values())
    queue = sum(o.metrics.first_scheduled_time - o.metrics.arrival_time for o in outs.values())
    assert metric(reg, "jaxllm:request_success_total", finished_reason="stop") == 2
    assert metric(reg, "jaxllm:prompt_tokens_total") == n_prompt
    assert metric(reg, "jaxllm:request_prompt_tokens_count") == 2
    assert metric(reg, "jaxllm:request_prompt_tokens_sum") == n_prompt
    assert metric(reg, "jaxllm:e2e_request_latency_seconds_count") == 2
    assert metric(reg, "jaxllm:e2e_request_latency_seconds_sum") == pytest.approx(e2e, abs=1e-9)
    assert metric(reg, "jaxllm:request_queue_time_seconds_count") == 2
    assert metric(reg, "jaxllm:request_queue_time_seconds_sum") == pytest.approx(queue, abs=1e-9)

    # aborted after its first chunk: "abort", its prompt length in the per-request histogram (as
    # for an aborted sequence), but its tokens were never all prefilled: not in prompt_tokens_total
    eng.add_request("aborted", list(range(3, 50)), PoolingParams())
    eng.step()
    assert eng.scheduler.requests["aborted"].num_computed_tokens == 16
    assert eng.abort_request("aborted") == []
    assert not eng.has_unfinished_requests()
    assert metric(reg, "jaxllm:request_success_total", finished_reason="abort") == 1
    assert metric(reg, "jaxllm:request_success_total", finished_reason="stop") == 2
    assert metric(reg, "jaxllm:prompt_tokens_total") == n_prompt
    assert metric(reg, "jaxllm:request_prompt_tokens_sum") == n_prompt + 47
    assert metric(reg, "jaxllm:e2e_request_latency_seconds_count") == 3
    assert metric(reg, "jaxllm:request_queue_time_seconds_count") == 3
    # generation-only series: nothing, not zeros
    for name in ("jaxllm:generation_tokens_total", "jaxllm:time_to_first_token_seconds_count",
                 "jaxllm:inter_token_latency_seconds_count", "jaxllm:request_generation_tokens_count"):
        assert metric(reg, name) == 0, name
    assert metric(reg, "jaxllm:iteration_tokens_total_sum") == n_prompt + 16  # every prefilled chunk
    assert metric(reg, "jaxllm:num_requests_running") == 0 == metric(reg, "jaxllm:kv_cache_usage_perc")


def test_excluded_prefix_adds_no_request_stats():
    """exclude_from_stats (the server's health probes): requests with the prefix -- finished, n=2,
    aborted -- add nothing to the request-level series nor to get_stats()'s token totals; the others
    count exactly as alone (the reference: a second engine that never sees the probes). Steps still
    count their tokens, and get_stats() every step the runner ran."""
    def run(with_probes):
        eng = make_engine(next_token_fn=script_fn("hello world"), async_scheduling=False)
        eng.runner = rec = Recorder(eng.runner)
        reg = with_prometheus(eng)
        eng.exclude_from_stats("__probe-")
        if with_probes:
            eng.add_request("__probe-0", "probe", SamplingParams(max_tokens=1, ignore_eos=True))
            eng.add_request("__probe-1", "probe two", SamplingParams(n=2, max_tokens=3, ignore_eos=True))
            eng.add_request("__probe-2", "probe aborted", SamplingParams(max_tokens=30, ignore_eos=True))
        eng.add_request("real", "the quick brown fox", SamplingParams(max_tokens=5, ignore_eos=True))
        eng.step()
        eng.step()
        eng.abort_request("__probe-2")
        run_all(eng)
        return reg, rec, eng.get_stats()

    reg, rec, stats = run(True)
    alone, _, alone_stats = run(False)
    names = ["jaxllm:prompt_tokens_total", "jaxllm:generation_tokens_total",
             "jaxllm:time_to_first_token_seconds_count", "jaxllm:inter_token_latency_seconds_count",
             "jaxllm:e2e_request_latency_seconds_count", "jaxllm:request_queue_time_seconds_count",
             "jaxllm:request_prompt_tokens_sum", "jaxllm:request_generation_tokens_sum"]
    def series(r):
        return {n: metric(r, n) for n in names} | {
            reason: metric(r, "jaxllm:request_success_total", finished_reason=reason)
            for reason in ("stop", "length", "abort")}

    got, want = series(reg), series(alone)
    assert got == want and want["length"] == 1 and want["jaxllm:generation_tokens_total"] == 5, (got, want)
    real_tokens = 5 + len(TOK.encode("the quick brown fox"))
    assert metric(reg, "jaxllm:iteration_tokens_total_sum") == sum(rec.tokens) > real_tokens  # + the probes'
    assert (stats.num_prompt_tokens, stats.num_generated_tokens) == (len(TOK.encode("the quick brown fox")), 5)
    assert (alone_stats.num_prompt_tokens, alone_stats.num_generated_tokens) == (stats.num_prompt_tokens, 5)
    assert stats.num_steps == len(rec.tokens)  # the steps that ran only probes count too
    with pytest.raises(ValueError, match=r"^prefix='' is invalid: must be a non-empty str$"):
        make_engine().exclude_from_stats("")


def test_excluded_prefix_embedding_requests():
    from tests.engine.test_embed_engine import make_embed_engine

    eng = make_embed_engine(max_num_batched_tokens=16, async_scheduling=False)
    reg = with_prometheus(eng)
    eng.exclude_from_stats("__probe-")
    eng.add_request("__probe-0", [5], PoolingParams())
    eng.add_request("__probe-1", list(range(2, 40)), PoolingParams())
    eng.add_request("real", [7, 8, 9], PoolingParams())
    outs = {o.request_id: o for o in eng.step()}  # the 1-token probe is done; the other is chunked
    assert eng.abort_request("__probe-1") == []
    outs |= run_all(eng)
    assert set(outs) == {"__probe-0", "real"}
    assert metric(reg, "jaxllm:request_success_total", finished_reason="stop") == 1
    assert metric(reg, "jaxllm:request_success_total", finished_reason="abort") == 0
    assert metric(reg, "jaxllm:prompt_tokens_total") == 3 == metric(reg, "jaxllm:request_prompt_tokens_sum")
    assert metric(reg, "jaxllm:e2e_request_latency_seconds_count") == 1
    assert eng.get_stats().num_prompt_tokens == 3  # the probes' 1 + 38 are left out


class StepClock:
    """+0.5 s per reading: each step's record() and log() read it once each -> 1 s per line."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        self.t += 0.5
        return self.t


def test_offline_log_line_numbers():
    eng = make_engine(next_token_fn=script_fn("abcdef"))
    assert LLM(engine=eng).stat_logger is None and eng.stat_loggers == []  # off by default offline
    llm = LLM(engine=eng, disable_log_stats=False, log_stats_interval=0)
    lines = []
    lg = llm.stat_logger
    lg.emit, lg.clock, lg.last_log_time = lines.append, StepClock(), 0.0
    prompts = ["first prompt", "second, longer prompt", "first prompt"]
    outs = llm.generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True), use_tqdm=False)
    # interval 0: one line per step + the closing one; each line covers 1 s of the fake clock
    assert len(lines) == eng.num_steps + 1
    parsed = [_parse(line) for line in lines]
    assert sum(p["prompt"] for p in parsed) == sum(len(o.prompt_token_ids) for o in outs)
    assert sum(p["gen"] for p in parsed) == sum(len(c.token_ids) for o in outs for c in o.outputs) == 18
    assert parsed[0]["running"] > 0 and parsed[-1]["running"] == 0 == parsed[-1]["waiting"]
    assert parsed[-1]["kv"] == 0.0
    rate = 100 * eng.kv.prefix_hits / eng.kv.prefix_queries
    assert parsed[-1]["hit"] == pytest.approx(rate, abs=0.05) and rate > 0


def test_offline_log_line_at_the_end_of_a_short_run():
    eng = make_engine()
    llm = LLM(engine=eng, disable_log_stats=False)  # default interval 10 s: only the closing line
    lines = []
    lg = llm.stat_logger
    lg.emit, lg.clock, lg.last_log_time = lines.append, (lambda: 4.0), 0.0
    outs = llm.generate(["abc", "defgh"], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(lines) == 1
    assert lines[0] == ("Avg prompt throughput: 2.0 tokens/s, Avg generation throughput: 1.5 tokens/s, "
                        "Running: 0 reqs, Waiting: 0 reqs, KV cache usage: 0.0%, Prefix cache hit rate: 0.0%")
    assert sum(len(o.outputs[0].token_ids) for o in outs) == 6


@pytest.mark.parametrize("bad", [-1, "10", float("nan")])
def test_bad_log_stats_interval(bad):
    with pytest.raises(ValueError, match=r"^log_stats_interval=.* is invalid: must be a number of seconds >= 0$"):
        LLM(engine=make_engine(), disable_log_stats=False, log_stats_interval=bad)


def _parse(line: str) -> dict:
    import re
    m = re.fullmatch(r"Avg prompt throughput: ([\d.]+) tokens/s, Avg generation throughput: ([\d.]+) tokens/s, "
                     r"Running: (\d+) reqs, Waiting: (\d+) reqs, KV cache usage: ([\d.]+)%, "
                     r"Prefix cache hit rate: ([\d.]+)%", line)
    assert m, line
    p, g, r, w, kv, hit = m.groups()
    return {"prompt": float(p), "gen": float(g), "running": int(r), "waiting": int(w), "kv": float(kv),
            "hit": float(hit)}


def test_compile_gauge_counts_from_warmup():
    eng = make_engine()
    eng.runner.compile_count = 6  # what a real runner holds after warm-up
    eng.compiles_at_warmup = 6  # build_engine's mark
    reg = with_prometheus(eng)
    eng.add_request("a", "abc", SamplingParams(max_tokens=2, ignore_eos=True))
    eng.step()
    assert metric(reg, "jaxllm:xla_compiles_since_warmup") == 0
    eng.runner.compile_count = 8  # two new shapes reached the device
    run_all(eng)
    assert metric(reg, "jaxllm:xla_compiles_since_warmup") == 2


def test_batch_histogram_matches_prometheus_client_histogram():
    import random

    from prometheus_client import Histogram

    from jaxllm.metrics.histogram import BatchHistogram

    bounds = (0.01, 0.1, 0.5, 1.0, 2.0)
    ours_reg, ref_reg = CollectorRegistry(), CollectorRegistry()
    ours = BatchHistogram("t:h", "doc", ["model_name"], bounds, ours_reg)
    ref = Histogram("t:h", "doc", ["model_name"], registry=ref_reg, buckets=bounds).labels(M)
    rng = random.Random(0)
    for n in (0, 1, 7, 64, 3):
        values = [rng.choice([0.0, 0.01, 0.1, 0.5, 1.0, 2.0, 5.0, rng.random() * 3]) for _ in range(n)]
        ours.observe(values, (M,))
        for v in values:
            ref.observe(v)
    def samples(reg):
        return sorted((s.name, tuple(sorted(s.labels.items())), s.value) for fam in reg.collect()
                      for s in fam.samples if not s.name.endswith("_created"))
    assert samples(ours_reg) == samples(ref_reg)
    assert ours.count((M,)) == 75
