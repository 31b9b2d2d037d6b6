"""vLLM's small endpoints on the HTTP door: ``/version``, ``/ping`` (GET and POST, the same answer
as /health), both open like /health; ``/reset_prefix_cache`` (behind the API key) over the real
host engine (scheduler, KV cache manager, block pool) and the fake runner."""

from __future__ import annotations

from importlib.metadata import version

import httpx
import pytest

from http_helpers import SlowRunner, ThreadedServer, make_llm_engine

KEY = "sk-admin"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = "The quick brown fox jumps over the lazy dog, twice over."  # 14 full blocks of 4 tokens


@pytest.fixture(scope="module")
def srv():
    # health probes off after the first: a probe caches (and hits) its own prompt's block, which the
    # exact prefix-cache counts below would see
    s = ThreadedServer(make_llm_engine(max_model_len=4096, num_blocks=2048, runner_cls=SlowRunner), api_key=KEY,
                       health_probe_interval=3600.0)
    yield s
    s.close()


def test_version_and_ping_need_no_key(srv):
    with httpx.Client(base_url=srv.base_url, timeout=10) as h:
        r = h.get("/version")
        assert r.status_code == 200 and r.json() == {"version": version("jaxllm")}
        health = h.get("/health")
        assert health.status_code == 200
        for method in ("GET", "POST"):
            r = h.request(method, "/ping")
            assert (r.status_code, r.json()) == (health.status_code, health.json()) == (200, {"status": "SERVING"})
        assert h.put("/ping").status_code == 405
        assert h.post("/reset_prefix_cache").status_code == 401  # this one needs the key
        assert h.post("/reset_prefix_cache", headers={"Authorization": "Bearer nope"}).status_code == 401


def _hits_of(srv, h, prompt: str, **kw) -> tuple[int, str]:
    """Prompt tokens found in the prefix cache by one request (the engine's counter), its text."""
    srv.wait_idle()
    before = srv.stats().prefix_cache_hits
    r = h.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4, "temperature": 0, **kw})
    assert r.status_code == 200, r.text
    s = srv.wait_idle()
    return s.prefix_cache_hits - before, r.json()["choices"][0]["text"]


def test_reset_prefix_cache_drops_free_cached_blocks_without_leaking(srv):
    with httpx.Client(base_url=srv.base_url, headers=AUTH, timeout=30) as h:
        _hits_of(srv, h, PROMPT)
        hits, text = _hits_of(srv, h, PROMPT)
        assert hits >= 4 * (len(PROMPT) // 4 - 1)  # the repeat finds its prefix cached
        r = h.post("/reset_prefix_cache")
        assert r.status_code == 200 and r.json()["num_blocks_dropped"] >= len(PROMPT) // 4
        s = srv.wait_idle()
        assert s.num_free_blocks == s.num_blocks  # nothing leaked: every block free again
        again, text2 = _hits_of(srv, h, PROMPT)
        assert again == 0 and text2 == text  # recomputed, same answer
        assert h.post("/reset_prefix_cache").json()["num_blocks_dropped"] >= len(PROMPT) // 4
        assert h.post("/reset_prefix_cache").json() == {"num_blocks_dropped": 0}  # nothing left to drop


def test_reset_prefix_cache_leaves_requests_in_flight_alone(srv):
    other = "A different prompt that runs while the cache is reset."
    # 4000 tokens of 3 ms steps (12 s or more): running until the client leaves
    body = {"prompt": other, "max_tokens": 4000, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=srv.base_url, headers=AUTH, timeout=30) as h:
        srv.wait_idle()
        with h.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            next(line for line in lines if line)
            assert h.post("/reset_prefix_cache").status_code == 200
            assert srv.stats().num_running == 1  # still running: it held its blocks through the reset
            # blocks in use keep their hashes: the same prompt now finds them
            before = srv.stats().prefix_cache_hits
            one = h.post("/v1/completions", json={**body, "max_tokens": 1, "stream": False})
            assert one.status_code == 200
            assert srv.stats().prefix_cache_hits - before >= 4 * (len(other) // 4 - 1)
            more = [next(line for line in lines if line) for _ in range(5)]  # the stream goes on
            assert all(x.startswith("data: {") for x in more)
        s = srv.wait_idle()  # the client left: the request was aborted and nothing leaked
        assert s.num_free_blocks == s.num_blocks
