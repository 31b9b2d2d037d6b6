"""gpu_memory_utilization as a fraction of the card (runner/device_pool.py): the GPU pool is started at
that fraction when nobody chose one, the KV budget is counted against the card, and the variable
does not outlive the backends' start. No GPU here: the backend start is faked where it matters and a
real CPU process checks the variable's life; the budgets are checked against hand arithmetic."""
from __future__ import annotations

import subprocess
import sys
import types

import pytest
from jax._src import xla_bridge

from jaxllm.runner import device_pool
from jaxllm.runner.device_pool import ENV, Pool, kv_budget

GiB = 2 ** 30
H200 = 139.8 * GiB  # the card's memory as XLA counts it (2026-12-04: a 0.75 pool was 104.9 GiB)


@pytest.fixture
def fresh(monkeypatch):
    """A process whose backends have not started and whose environment names no fraction."""
    monkeypatch.setattr(device_pool, "_pool", None)
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    seen = []

    def start():  # what the GPU client would read from the environment as it starts
        seen.append({name: device_pool.os.environ.get(name) for name in ENV})
        return []

    monkeypatch.setattr("jax.devices", start)
    return seen


def test_claim_starts_the_backends_with_the_utilization_and_unsets_it(fresh):
    pool = device_pool.claim(0.9)
    assert pool == Pool(0.9, "claimed")
    assert fresh == [{ENV[0]: "0.9", ENV[1]: None}]  # set while the backends start (one name: both raise)
    assert all(name not in device_pool.os.environ for name in ENV)  # child processes do not inherit it
    assert device_pool.claim(0.5) is pool and len(fresh) == 1  # once per process: the backends start once


@pytest.mark.parametrize("name", ENV)
def test_the_users_fraction_stands(fresh, monkeypatch, name):
    monkeypatch.setenv(name, "0.6")
    assert device_pool.claim(0.9) == Pool(0.6, "env", name)
    assert fresh == [] and device_pool.os.environ[name] == "0.6"
    assert name in device_pool.claim(0.9).describe()


@pytest.mark.parametrize("bad", ["abc", "0", "1.5"])
def test_a_bad_user_fraction_names_the_variable(fresh, monkeypatch, bad):
    monkeypatch.setenv(ENV[0], bad)
    with pytest.raises(ValueError, match=rf"XLA_CLIENT_MEM_FRACTION='{bad}' is invalid: must be a number in \(0, 1\]"):
        device_pool.claim(0.9)
    assert fresh == [] and device_pool._pool is None


def test_backends_already_started_keep_their_pool(fresh, monkeypatch):
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: True)
    assert device_pool.claim(0.9) == Pool(device_pool.XLA_DEFAULT_FRACTION, "started")
    assert fresh == [] and all(name not in device_pool.os.environ for name in ENV)


def test_a_backend_that_cannot_start_names_the_field(fresh, monkeypatch):
    def refuse():
        raise RuntimeError("Unable to initialize backend 'cuda': RESOURCE_EXHAUSTED")

    monkeypatch.setattr("jax.devices", refuse)
    with pytest.raises(RuntimeError, match=r"gpu_memory_utilization=0\.95: .*RESOURCE_EXHAUSTED.*lower "
                                           r"gpu_memory_utilization or set XLA_CLIENT_MEM_FRACTION"):
        device_pool.claim(0.95)
    assert all(name not in device_pool.os.environ for name in ENV) and device_pool._pool is None


def test_budget_counts_the_card_not_the_pool():
    weights, work = 25.9 * GiB, 1.5 * GiB
    # claimed at 0.9: the pool is 0.9 of the card and the cache gets the rest of it
    claimed = dict(bytes_limit=int(0.9 * H200), bytes_in_use=int(weights))
    assert kv_budget(claimed, "gpu", 0.9, 0.9, int(work)) == pytest.approx(0.9 * H200 - weights - work, abs=2)
    # XLA's default 0.75 pool with 0.9 asked: the pool caps it (was 0.9 x pool = 0.675 of the card)
    default = dict(bytes_limit=int(0.75 * H200), bytes_in_use=int(weights))
    assert kv_budget(default, "gpu", 0.9, 0.75, int(work)) == pytest.approx(0.75 * H200 - weights - work, abs=2)
    # 0.5 asked of a 0.75 pool: half the card, not half the pool
    assert kv_budget(default, "gpu", 0.5, 0.75, int(work)) == pytest.approx(0.5 * H200 - weights - work, abs=2)
    # a TPU's limit is its whole memory: the utilization applies to it, the pool fraction does not
    tpu = dict(bytes_limit=95 * GiB, bytes_in_use=int(weights))
    assert kv_budget(tpu, "tpu", 0.9, 0.75, int(work)) == pytest.approx(0.9 * 95 * GiB - weights - work, abs=2)


def test_kv_cache_blocks_sizes_a_gpu_cache_from_the_card(monkeypatch):
    """kv_cache_blocks on a (faked) GPU: utilization x card - weights - working memory - 1% of the pool,
    in whole blocks, and never past the pool's largest free block."""
    import jax
    import jax.numpy as jnp

    from jaxllm.models.config import ModelConfig
    from jaxllm.runner.kv_sizing import kv_cache_blocks
    from pallas_kernels import KVCache

    mc = ModelConfig.from_hf(dict(model_type="llama", vocab_size=512, hidden_size=576, intermediate_size=1536,
                                  num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                  max_position_embeddings=2048), source="test")
    pool, weights, work = int(0.9 * H200), 26 * GiB, 2 * GiB
    stats = dict(bytes_limit=pool, bytes_in_use=weights, pool_bytes=pool, largest_free_block_bytes=pool - weights)
    gpu = types.SimpleNamespace(platform="gpu", memory_stats=lambda: stats)
    monkeypatch.setattr(jax, "local_devices", lambda: [gpu])
    per_block = KVCache.bytes_per_block(30, 16, 3, 64, jnp.bfloat16)
    n = kv_cache_blocks(mc, 16, jnp.bfloat16, None, 0.9, reserve_bytes=work, pool_fraction=0.9)
    assert n == (pool - weights - work - pool // 100) // per_block
    stats["largest_free_block_bytes"] = 10 * GiB  # holes: the cache must fit one free block
    n = kv_cache_blocks(mc, 16, jnp.bfloat16, None, 0.9, reserve_bytes=work, pool_fraction=0.9)
    assert n == (10 * GiB - work - pool // 100) // per_block


def test_a_real_process_starts_with_the_fraction_and_forgets_it():
    code = ("import os, jax; from jaxllm.runner import device_pool as d; p = d.claim(0.8); "
            "print(p.how, p.fraction, os.environ.get('XLA_CLIENT_MEM_FRACTION'), jax.default_backend(), "
            "d.claim(0.3).fraction)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**device_pool.os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["claimed", "0.8", "None", "cpu", "0.8"]
    started = "import jax; jax.devices(); from jaxllm.runner import device_pool as d; print(d.claim(0.8).how)"
    out = subprocess.run([sys.executable, "-c", started], capture_output=True, text=True, timeout=120,
                         env={**device_pool.os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.stdout.split() == ["started"], out.stderr[-2000:]
