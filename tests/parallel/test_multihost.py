"""Multi-host on one machine: two processes with 2 CPU devices each join one tp=4 mesh through
jax.distributed (gloo), `python -m jaxllm.generate` on process 0 drives process 1 as a follower,
and the greedy output equals the single-process tp=1 run."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARGS = ["--model", "dummy:tiny-llama", "--max-tokens", "8", "--temperature", "0", "--ignore-eos",
        "--max-model-len", "128", "--max-num-seqs", "4", "--max-num-batched-tokens", "64",
        "--kv-cache-memory-bytes", str(1 << 20), "--no-progress"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _token_ids(path):
    with open(path) as f:
        return [json.loads(line)["outputs"][0]["token_ids"] for line in f]


def test_two_processes_one_mesh(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt_token_ids": [1, 2, 3, 4, 5]}\n{"prompt_token_ids": [7, 8, 9]}\n')
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAXLLM_COMPILE_CACHE=str(tmp_path / "xla"))
    base = [sys.executable, "-m", "jaxllm.generate", "--input", str(inp), *ARGS]
    addr = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen(base + ["--tensor-parallel-size", "4", "--coordinator-address", addr,
                                      "--num-processes", "2", "--process-id", str(i),
                                      "--output", str(tmp_path / f"out{i}.jsonl")],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in (1, 0)]
    try:
        logs = [p.communicate(timeout=400)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], logs
    assert "tp=4 over" in logs[1] and not (tmp_path / "out1.jsonl").exists()  # process 1 only follows
    single = subprocess.run(base + ["--output", str(tmp_path / "single.jsonl")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=400)
    assert single.returncode == 0, single.stderr
    assert _token_ids(tmp_path / "out0.jsonl") == _token_ids(tmp_path / "single.jsonl")
