"""``--metrics-port``: scrape Prometheus text from a real loopback server before and after a few
gRPC requests (the real LLMEngine with the fake runner/tokenizer: no jax). The expected numbers
come from what the gRPC client received."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from jaxllm.config import EngineConfig
from jaxllm.engine.engine import LLMEngine
from serving.proto.jaxllm.v1 import generation_pb2 as pb
from serving_helpers import collect, request, run, running_server
from tests.fakes.fake_engine import FakeEngine
from tests.fakes.fake_runner import FakeRunner
from tests.fakes.fake_tokenizer import FakeIncrementalDetokenizer, FakeTokenizer

REASON = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_ABORT: "abort"}


async def scrape(port: int, model: str = "fake-llm") -> dict[tuple, float]:
    """{(sample name, sorted labels without model_name): value} from /metrics."""
    async with httpx.AsyncClient() as client:
        r = await client.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            if not s.name.startswith("jaxllm:"):
                continue
            assert s.labels.pop("model_name") == model, s
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def delta(before: dict, after: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def slow_engine(step_seconds: float = 0.005) -> LLMEngine:
    """The real engine over the fake runner, whose "model" writes "the quick brown fox ..." over
    and over, with steps that take a little time (so a stream can be cancelled midway)."""
    tok = FakeTokenizer()
    script = tok.encode("the quick brown fox jumps over the lazy dog. ", add_special_tokens=False)
    runner = FakeRunner(256, 4, vocab_size=tok.vocab_size, eos_token_ids=tok.eos_token_ids,
                        next_token_fn=lambda ctx, seq: script[(len(ctx) - seq.num_prompt_tokens) % len(script)])
    config = EngineConfig(model="fake-llm", block_size=4, max_model_len=128, max_num_batched_tokens=64,
                          max_num_seqs=8)
    eng = LLMEngine(config, runner, tok, detokenizer_factory=FakeIncrementalDetokenizer)
    step = eng.step

    def slow_step():
        time.sleep(step_seconds)
        return step()
    eng.step = slow_step
    return eng


@pytest.mark.parametrize("kind", ["llm-engine", "fake-engine"])
def test_metrics_move_by_what_the_requests_did(kind):
    """The real LLMEngine (fake runner) and tests/fakes' FakeEngine report the same way."""
    engine, model = (slow_engine(), "fake-llm") if kind == "llm-engine" else (FakeEngine(step_delay=0.005), "fake")

    async def main():
        async with running_server(engine, metrics_port=0, health_probe_interval=3600) as c:
            port = c.server.metrics.port
            assert port and port != c.port
            await c.wait_blocks_free()  # the start-up health probe has finished
            before = await scrape(port, model)
            assert before[("jaxllm:xla_compiles_since_warmup", ())] == 0
            calls = [c.generate(prompt=f"metrics request {i}", max_tokens=4 + i, ignore_eos=True)
                     for i in range(3)]
            calls.append(c.generate(prompt="stop at the letter q please", max_tokens=40, stop=["q"]))
            calls.append(c.generate(prompt="two samples", n=2, max_tokens=5, ignore_eos=True))
            results = [collect(r) for r in await asyncio.gather(*calls)]
            stream = c.stub.Generate(request(prompt="cancelled midway", max_tokens=100, ignore_eos=True))
            first = await stream.read()
            while not first.outputs or not first.outputs[0].token_ids:  # its first token is out
                first = await stream.read()
            stream.cancel()
            await c.wait_blocks_free()
            after = await scrape(port, model)

        seqs = [(len(r["prompt_token_ids"]), toks, REASON[r["finish"][i]])
                for r in results for i, toks in r["tokens"].items()]
        assert len(seqs) == 6
        reasons = {}
        for _, _, reason in seqs:
            reasons[reason] = reasons.get(reason, 0) + 1
        assert reasons == {"length": 5, "stop": 1}, reasons
        for reason in ("length", "stop"):
            assert delta(before, after, "jaxllm:request_success_total", finished_reason=reason) == reasons[reason]
        assert delta(before, after, "jaxllm:request_success_total", finished_reason="abort") == 1
        # the cancelled stream generated at least what reached the client before the cancel
        cancelled_min = len(first.outputs[0].token_ids)
        gen = sum(len(t) for _, t, _ in seqs)
        gen_delta = delta(before, after, "jaxllm:generation_tokens_total")
        assert gen + cancelled_min <= gen_delta, (gen, gen_delta)
        cancelled_gen = gen_delta - gen
        usage = [r["usage"] for r in results]
        assert sum(u.completion_tokens for u in usage) == gen
        prompt_tokens = sum(p for p, _, _ in seqs) + len("cancelled midway")
        assert delta(before, after, "jaxllm:prompt_tokens_total") == prompt_tokens
        assert delta(before, after, "jaxllm:time_to_first_token_seconds_count") == 7
        assert delta(before, after, "jaxllm:inter_token_latency_seconds_count") == gen_delta - 7
        assert delta(before, after, "jaxllm:e2e_request_latency_seconds_count") == 7
        assert delta(before, after, "jaxllm:request_prompt_tokens_sum") == prompt_tokens
        assert delta(before, after, "jaxllm:request_generation_tokens_sum") == gen + cancelled_gen
        assert delta(before, after, "jaxllm:request_queue_time_seconds_count") == 7
        assert delta(before, after, "jaxllm:iteration_tokens_total_count") > 0
        assert after[("jaxllm:num_requests_running", ())] == 0 == after[("jaxllm:num_requests_waiting", ())]
        assert after[("jaxllm:kv_cache_usage_perc", ())] == 0
        assert after[("jaxllm:xla_compiles_since_warmup", ())] == 0

    run(main())


def test_embedding_requests_in_the_request_series():
    """An embedding server's /metrics (HTTP door, parsed by prometheus-client) counts the embedding
    requests as vLLM V1 counts pooling requests: success "stop", prompt tokens (reference: the
    usage the clients received), e2e and queue time; no time to first token, inter-token latency or
    generated tokens."""
    import httpx
    from test_serving_embed import embed_req, make_engine as make_embed_engine

    async def main():
        async with running_server(make_embed_engine(), http_port=0, health_probe_interval=3600) as c:
            http = c.server.http_port
            await c.wait_blocks_free()  # the start-up health probe has finished
            before = await scrape(http, "fake-embed")
            async with httpx.AsyncClient() as h:
                r = await h.post(f"http://127.0.0.1:{http}/v1/embeddings",
                                 json={"input": ["first", "second prompt " * 4, "third"]}, timeout=10)
            assert r.status_code == 200, r.text
            g = await c.stub.Embed(embed_req(token_ids=list(range(5, 30))), timeout=10)
            await c.wait_blocks_free()
            after = await scrape(http, "fake-embed")
        return r.json()["usage"]["prompt_tokens"] + g.prompt_tokens, before, after

    prompt_tokens, before, after = run(main())
    assert prompt_tokens > 25
    assert delta(before, after, "jaxllm:request_success_total", finished_reason="stop") == 4
    assert delta(before, after, "jaxllm:request_success_total", finished_reason="abort") == 0
    assert delta(before, after, "jaxllm:prompt_tokens_total") == prompt_tokens
    assert delta(before, after, "jaxllm:request_prompt_tokens_sum") == prompt_tokens
    for name in ("jaxllm:request_prompt_tokens_count", "jaxllm:e2e_request_latency_seconds_count",
                 "jaxllm:request_queue_time_seconds_count"):
        assert delta(before, after, name) == 4, name
    for name in ("jaxllm:generation_tokens_total", "jaxllm:time_to_first_token_seconds_count",
                 "jaxllm:inter_token_latency_seconds_count", "jaxllm:request_generation_tokens_count"):
        assert delta(before, after, name) == 0, name
    assert delta(before, after, "jaxllm:iteration_tokens_total_sum") == prompt_tokens


PROBE_LABELS = {"/health", "/metrics", "/grpc.health.v1.Health/Check", "grpc.health.v1.Health", "Check"}


@pytest.mark.parametrize("task", ["generate", "embed"])
def test_health_probes_and_scrapes_are_not_counted(task):
    """Probes are not traffic (vLLM's instrumentator leaves /health and /metrics out): the health
    monitor's synthetic requests (a 1-token generation, or a one-token embedding) run through the
    engine every 50 ms, but no request-level series counts them; /health, /metrics and gRPC health
    checks appear in no series. That the probes really ran with the loggers attached is the engine's
    own step record (tokens per step) moving."""
    from grpc_health.v1 import health_pb2
    from test_serving_embed import make_engine as make_embed_engine

    engine, model = (slow_engine(0), "fake-llm") if task == "generate" else (make_embed_engine(), "fake-embed")

    async def main():
        async with running_server(engine, http_port=0, health_probe_interval=0.05) as c:
            base = f"http://127.0.0.1:{c.server.http_port}"
            async with httpx.AsyncClient() as h:
                for _ in range(5):
                    assert (await h.get(base + "/health", timeout=5)).status_code == 200
                    assert (await h.get(base + "/metrics", timeout=5)).status_code == 200
                    ok = await c.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                    assert ok.status == health_pb2.HealthCheckResponse.SERVING
                t0 = time.monotonic()
                while c.server.monitor.probe_successes < 4:
                    assert time.monotonic() - t0 < 10, c.server.monitor.probe_successes
                    await asyncio.sleep(0.02)
                await c.wait_blocks_free()
                text = (await h.get(base + "/metrics", timeout=5)).text
            return c.server.monitor.probe_successes, text

    probes, text = run(main())
    assert probes >= 4
    values = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            assert not PROBE_LABELS & set(smp.labels.values()), smp
            if smp.name.startswith("jaxllm:"):
                assert smp.labels.pop("model_name") == model, smp
                values[(smp.name, tuple(sorted(smp.labels.items())))] = smp.value
    # no request was sent: every step recorded is a probe's (one step each; the first probe may
    # run before the loggers are attached)
    assert values[("jaxllm:iteration_tokens_total_count", ())] >= 3
    counted = {k: v for k, v in values.items() if v and not k[0].endswith("_created") and k[0].startswith((
        "jaxllm:request_", "jaxllm:prompt_tokens", "jaxllm:generation_tokens", "jaxllm:time_to_first_token",
        "jaxllm:inter_token_latency", "jaxllm:e2e_request_latency"))}
    assert not counted, counted
    for reason in ("stop", "length", "abort"):
        assert values[("jaxllm:request_success_total", (("finished_reason", reason),))] == 0
    assert values[("jaxllm:prompt_tokens_total", ())] == 0 == values[("jaxllm:generation_tokens_total", ())]


def test_metrics_off_by_default_and_the_log_line_on():
    async def main():
        async with running_server(slow_engine(0), log_stats_interval=0) as c:
            assert c.server.metrics.port is None and c.server.metrics.prometheus is None
            eng = c.server.async_engine.engine
            assert [type(lg).__name__ for lg in eng.stat_loggers] == ["LoggingStatLogger"]

    run(main())


def test_cli_prints_the_metrics_port_and_serves_it():
    from urllib.request import urlopen

    from grpc_health.v1 import health_pb2
    from test_serving_process import ServerProcess

    proc = ServerProcess("--model", "fake:", "--metrics-port", "0")
    try:
        line = proc.proc.stdout.readline()
        assert line.startswith("serving: listening metrics=127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1])
        assert port not in (0, proc.port)
        proc.wait_status(health_pb2.HealthCheckResponse.SERVING)  # the engine is warm: its series exist
        with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
            body = r.read()
        assert b"python_info" not in body  # a dedicated registry, not the global default
        assert b'jaxllm:xla_compiles_since_warmup{model_name="fake"} 0.0' in body, body
    finally:
        proc.close()


def test_server_flags():
    import pytest

    from serving.__main__ import build_parser, server_config

    cfg = server_config(build_parser().parse_args(["--metrics-port", "9100", "--disable-log-stats",
                                                   "--log-stats-interval", "2.5"]))
    assert (cfg.metrics_port, cfg.log_stats, cfg.log_stats_interval) == (9100, False, 2.5)
    cfg = server_config(build_parser().parse_args([]))
    assert (cfg.metrics_port, cfg.log_stats, cfg.log_stats_interval) == (None, True, 10.0)
    with pytest.raises(ValueError, match=r"^metrics_port=70000 is invalid: must be in \[0, 65535\]$"):
        server_config(build_parser().parse_args(["--metrics-port", "70000"]))
    with pytest.raises(ValueError, match=r"^log_stats_interval=-1.0 is invalid"):
        server_config(build_parser().parse_args(["--log-stats-interval", "-1"]))


def test_metrics_port_in_use_is_one_error():
    import socket

    from serving.config import ServerConfig
    from serving.server import ServingServer

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        async def main():
            server = ServingServer(ServerConfig(port=0, metrics_port=port), engine=slow_engine(0))
            try:
                await server.start()
            except OSError as e:
                return str(e)
            await server.stop()
            return None
        msg = run(main())
    assert msg is not None and msg.startswith(f"--host 127.0.0.1 --metrics-port {port}: cannot listen: "), msg


def test_metrics_app_serves_the_same_registry():
    from prometheus_client import CollectorRegistry

    from jaxllm.metrics.prometheus import PrometheusStatLogger
    from jaxllm.metrics.stats import IterationStats, SchedulerStats
    from serving.metrics import metrics_app

    reg = CollectorRegistry()
    PrometheusStatLogger(reg, "fake-llm").record(SchedulerStats(3, 1, 0.25),
                                                 IterationStats(num_generation_tokens=5, num_batched_tokens=5))

    async def main():
        transport = httpx.ASGITransport(app=metrics_app(reg))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            r = await client.get("/")
        assert r.status_code == 200
        values = {s.name: s.value for fam in text_string_to_metric_families(r.text) for s in fam.samples}
        assert values["jaxllm:num_requests_running"] == 3 and values["jaxllm:num_requests_waiting"] == 1
        assert values["jaxllm:kv_cache_usage_perc"] == 0.25 and values["jaxllm:generation_tokens_total"] == 5

    run(main())
