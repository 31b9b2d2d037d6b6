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


def test_two_processes_one_mesh(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLLM_COMPILE_CACHE", str(tmp_path / "xla_ref"))
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9]]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"prompt_token_ids": p}) + "\n" for p in prompts))
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAXLLM_COMPILE_CACHE=str(tmp_path / "xla"))
    addr = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen([sys.executable, "-m", "jaxllm.generate", "--input", str(inp), *ARGS,
                               "--tensor-parallel-size", "4", "--coordinator-address", addr,
                               "--num-processes", "2", "--process-id", str(i),
                               "--output", str(tmp_path / f"out{i}.jsonl")],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in (1, 0)]
    try:
        # The single-process tp=1 reference, in this process while the two run.
        from jaxllm.llm import LLM
        from jaxllm.sampling_params import SamplingParams

        llm = LLM("dummy:tiny-llama", max_model_len=128, max_num_seqs=4, max_num_batched_tokens=64,
                  kv_cache_memory_bytes=1 << 20)
        ref = [o.outputs[0].token_ids for o in llm.generate(
            [{"prompt_token_ids": p} for p in prompts],
            SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)]
        logs = [p.communicate(timeout=400)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], logs
    assert "tp=4 over" in logs[1] and not (tmp_path / "out1.jsonl").exists()  # process 1 only follows
    assert _token_ids(tmp_path / "out0.jsonl") == ref
