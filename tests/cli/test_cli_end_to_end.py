"""The CLIs as a user runs them, on the dummy tiny-llama (random weights, 2 compiled buckets):
`jaxllm.generate --input` honours per-line overrides and rejects a bad line before any engine is
built; `python -m serving` prints one listening line on stdout, keeps JAX's INFO chatter out of
stderr, prints one engine-start figure, and `serving.client --info` shows the dtype in use."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from serving.client import GenerationClient

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--model", "dummy:tiny-llama", "--max-model-len", "128", "--max-num-seqs", "4",
        "--max-num-batched-tokens", "64", "--kv-cache-memory-bytes", "1000000"]
ENV = {k: v for k, v in os.environ.items() if k not in ("JAXLLM_API_KEY", "JAX_PLATFORMS")}


def _generate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jaxllm.generate", *TINY, "--no-progress", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=ENV)


def test_generate_jsonl_per_line_overrides(tmp_path):
    prompt = [7, 8, 9, 10]
    lines = [{"prompt_token_ids": prompt, "max_tokens": 3, "temperature": 0, "ignore_eos": True},
             {"prompt_token_ids": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True},
             {"prompt_token_ids": [1, 2, 3], "n": 2, "ignore_eos": True},  # --max-tokens 5 from the command line
             {"prompt_token_ids": [4, 5], "max_tokens": 8, "min_tokens": 8, "stop_token_ids": [0, 1, 2]}]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    res = _generate("--input", str(src), "--output", str(dst), "--max-tokens", "5", "--temperature", "1.0",
                    "--log-stats")
    assert res.returncode == 0, res.stderr[-3000:]
    outs = [json.loads(x) for x in dst.read_text().splitlines()]
    counts = [[len(c["token_ids"]) for c in o["outputs"]] for o in outs]
    assert counts == [[3], [6], [5, 5], [8]], counts
    # temperature 0 on both lines (the command line says 1.0): greedy, so one is the other's prefix
    assert outs[0]["outputs"][0]["token_ids"] == outs[1]["outputs"][0]["token_ids"][:3]
    assert "4 requests, 13 prompt tokens, 27 output tokens" in res.stdout
    assert res.stdout.count("engine start") == 1 and res.stderr.count("engine start") == 1
    # --log-stats: the closing stats line (the run is shorter than --log-stats-interval 10)
    stats = [x for x in res.stderr.splitlines() if "Avg prompt throughput:" in x]
    assert len(stats) == 1, res.stderr[-3000:]
    # no prompt fills a 16-token block, so nothing can hit the prefix cache
    assert stats[0].endswith("tokens/s, Running: 0 reqs, Waiting: 0 reqs, KV cache usage: 0.0%, "
                             "Prefix cache hit rate: 0.0%"), stats


def test_generate_bad_line_fails_before_the_engine_is_built(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt_token_ids": [1, 2]}) + "\n" + json.dumps({"prompt_token_ids": [1] * 128}) + "\n")
    res = _generate("--input", str(src))
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-3000:]
    assert lines[0] == (f"error: {src}:2: prompt length=128 tokens is invalid: must be < max_model_len=128 "
                        f"(room for 1 generated token)")
    assert "[jaxllm]" not in res.stderr  # no model was loaded


def test_server_stdout_line_quiet_logs_and_resolved_info(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "serving", "--port", "0", "--metrics-port", "0", "--dtype", "auto",
                             *TINY], cwd=ROOT,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    logs: list[str] = []
    reader = threading.Thread(target=lambda: logs.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        first = proc.stdout.readline()
        assert first.startswith("serving: listening grpc=127.0.0.1:"), (first, logs)
        target = first.strip().split("grpc=", 1)[1]
        second = proc.stdout.readline()
        assert second.startswith("serving: listening metrics=127.0.0.1:"), (second, logs)
        metrics_url = f"http://{second.strip().split('metrics=', 1)[1]}/metrics"
        with GenerationClient(target, timeout=5) as c:
            deadline = time.monotonic() + 540
            while c.health() != "SERVING":
                assert proc.poll() is None and time.monotonic() < deadline, "".join(logs)
                time.sleep(0.2)
        info = subprocess.run([sys.executable, "-m", "serving.client", "--target", target, "--info"], cwd=ROOT,
                              capture_output=True, text=True, timeout=60, env=ENV)
        assert info.returncode == 0, info.stderr
        assert 'dtype: "float32"' in info.stdout and "max_model_len: 128" in info.stdout, info.stdout
        with urllib.request.urlopen(metrics_url, timeout=10) as r:  # health probes have run: steps, no compiles
            metrics = r.read().decode()
        assert 'jaxllm:xla_compiles_since_warmup{model_name="dummy:tiny-llama"} 0.0' in metrics, metrics
        assert 'jaxllm:request_success_total{finished_reason="length",model_name="dummy:tiny-llama"}' in metrics
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        reader.join(timeout=10)
    assert proc.stdout.read() == ""  # the listening lines are the only stdout lines
    text = "".join(logs)
    assert "Resetting cache" not in text and "Unable to initialize backend" not in text, text
    assert text.count("engine start") == 1 and "engine ready" in text and "after start" not in text, text


def test_generate_jsonl_priority_orders_the_runs(tmp_path):
    # one sequence at a time: the lines run in priority order (lower first), ties in line order
    lines = [{"prompt_token_ids": [7, 8, 9], "priority": 5}, {"prompt_token_ids": [4, 5], "priority": -1},
             {"prompt_token_ids": [1, 2, 3], "priority": 5}, {"prompt_token_ids": [3, 4]}]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    res = _generate("--input", str(src), "--output", str(dst), "--max-tokens", "3", "--ignore-eos",
                    "--max-num-seqs", "1", "--scheduling-policy", "priority")
    assert res.returncode == 0, res.stderr[-3000:]
    outs = [json.loads(x) for x in dst.read_text().splitlines()]
    assert [o["prompt_token_ids"] for o in outs] == [x["prompt_token_ids"] for x in lines]  # output in line order
    started = [o["metrics"]["first_scheduled_time"] for o in outs]
    assert sorted(range(4), key=started.__getitem__) == [1, 3, 0, 2], started
    # under fcfs the same file is refused before any engine is built
    res = _generate("--input", str(src))
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        f"error: {src}:1: priority=5 is invalid: scheduling_policy='fcfs' takes priority 0 only (start the "
        f"engine with --scheduling-policy priority)"], res.stderr[-3000:]
    assert "[jaxllm]" not in res.stderr
