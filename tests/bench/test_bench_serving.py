"""bench/serving.py against `python -m serving --model fake:...` (no jax, real gRPC and HTTP)."""
import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def fake_server():
    proc = subprocess.Popen([sys.executable, "-m", "serving", "--model", "fake:step_delay=0.005,max_num_seqs=4",
                             "--port", "0", "--http-port", "0", "--max-queued-requests", "16", "--health-probe-interval", "60"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    target = http = None
    deadline = time.time() + 30
    while time.time() < deadline and not (target and http):
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("serving: listening grpc="):
            target = line.strip().split("grpc=", 1)[1]
        if line.startswith("serving: listening http="):
            http = line.strip().split("http=", 1)[1]
    assert target and http, "server did not start"
    from serving.client import GenerationClient
    with GenerationClient(target, timeout=5) as c:
        while time.time() < deadline and c.health() != "SERVING":
            time.sleep(0.05)
    yield target, http
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_serving_bench_two_rates(fake_server, tmp_path, capsys):
    from bench import serving as sb

    out = tmp_path / "s.json"
    target, http = fake_server
    rc = sb.main(["--target", target, "--http-target", http, "--transport", "grpc,http,http-raw", "--num-prompts", "8",
                  "--input-len", "4..8", "--output-len", "3..6",
                  "--request-rate", "50,inf", "--max-concurrency", "3", "--output-json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert [(r["transport"], r["request_rate"]) for r in res["rows"]] == [
        (t, rate) for rate in (50.0, float("inf")) for t in ("grpc", "http", "http-raw")]
    for r in res["rows"]:
        assert r["completed"] == 8 and r["failed"] == 0 and r["short_outputs"] == 0, r
        assert 0 < r["ttft_p50_ms"] <= r["e2e_p50_ms"] and r["tpot_mean_ms"] > 0 and r["itl_p99_ms"] > 0
    assert "TTFT mean" in capsys.readouterr().out


def test_serving_bench_overload_mode(fake_server, tmp_path):
    """--overload 4: a burst of 4 x --max-queued-requests (16) at once; the excess is refused with
    RESOURCE_EXHAUSTED, the accepted ones complete in full, health stays SERVING."""
    from bench import serving as sb

    out = tmp_path / "o.json"
    rc = sb.main(["--target", fake_server[0], "--overload", "4", "--input-len", "4..8", "--output-len", "20..30",
                  "--output-json", str(out)])
    assert rc == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["requests"] == 64 and row["completed"] + row["refused"] == 64
    assert row["refused"] >= 16 and row["completed"] >= 16 and row["short_outputs"] == 0
    assert row["errors"] == {"RESOURCE_EXHAUSTED": row["refused"]} and row["health_after"] == "SERVING"
    assert 0 < row["ttft_p99_ms"] <= row["e2e_p99_ms"] * 1.0001
