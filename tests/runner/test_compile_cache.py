"""The persistent compilation cache: one directory, keyed by JAX per compiled program, so engines
whose programs are the same (they differ only in seed, say) compile nothing the second time."""
import os

import jax
import numpy as np
import pytest
from jax._src import monitoring
from jax.experimental.compilation_cache import compilation_cache

from jaxllm.config import EngineConfig
from jaxllm.engine.factory import build_engine, enable_compile_cache

HIT, MISS = "/jax/compilation_cache/cache_hits", "/jax/compilation_cache/cache_misses"
# 2 decode + 1 mixed bucket; a 32-block cache (4 tokens of 2 layers x 4 kv heads x 8 dims, f32)
TINY = dict(model="dummy:tiny-llama", max_model_len=64, block_size=4, max_num_seqs=2, max_num_batched_tokens=16,
            kv_cache_memory_bytes=32 * 2 * 2 * 4 * 4 * 8 * 4)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLLM_COMPILE_CACHE", str(tmp_path / "xla"))
    before = jax.config.jax_compilation_cache_dir
    yield str(tmp_path / "xla")
    jax.config.update("jax_compilation_cache_dir", before)
    compilation_cache.reset_cache()


class CacheEvents:
    """Counts JAX's persistent-cache hit and miss events (one per compile request) while active."""

    def __init__(self):
        self.counts = {HIT: 0, MISS: 0}

    def __call__(self, event, **_):
        if event in self.counts:
            self.counts[event] += 1

    def __enter__(self):
        monitoring.register_event_listener(self)
        return self

    def __exit__(self, *exc):
        monitoring.unregister_event_listener(self)


def entries(path):
    return sorted(f for f in os.listdir(path) if f.endswith("-cache"))


def test_one_directory_for_every_config(cache_dir):
    a = enable_compile_cache()
    jax.jit(lambda x: x * 3 + 2)(1.0)
    assert a == cache_dir and len(entries(a)) == 1
    assert enable_compile_cache() == a  # nothing of the config in the path
    b = enable_compile_cache(os.path.join(cache_dir, "other"))  # a new root within one process is honoured
    jax.jit(lambda x: x * 7 + 2)(1.0)
    assert len(entries(b)) == 1 and len(entries(a)) == 1


def test_fields_outside_the_program_compile_nothing_the_second_time(cache_dir):
    """Engine 1 compiles every bucket into an empty cache; engines differing from it only in a field
    that never reaches the compiled program load every executable from it: no cache miss at all (a
    miss is a compile) and no new entry on disk. (gpu_memory_utilization does not size the cache on
    CPU.) The counter-check: max_num_seqs changes the buckets, so that engine does compile."""
    base = dict(TINY, seed=1)
    with CacheEvents() as first:
        e1 = build_engine(EngineConfig(**base))
    n = len(e1.runner._executables)
    assert first.counts[MISS] >= n and len(entries(cache_dir)) >= n  # it did compile, into our directory
    written = entries(cache_dir)
    # the three fields together in one engine (one build instead of three: the suite's time budget)
    for other in (dict(seed=2, enable_prefix_caching=False, gpu_memory_utilization=0.5),):
        with CacheEvents() as again:
            e2 = build_engine(EngineConfig(**dict(base, **other)))
        assert len(e2.runner._executables) == n
        assert again.counts[MISS] == 0, (other, again.counts)
        assert again.counts[HIT] >= n, (other, again.counts)  # every bucket came from the persistent cache
        assert entries(cache_dir) == written, other
        if "seed" in other:  # the seed still did its job: other dummy weights, yet the same programs
            w1, w2 = jax.tree.leaves(e1.runner.state), jax.tree.leaves(e2.runner.state)
            assert any(not np.array_equal(a, b) for a, b in zip(w1, w2))
    with CacheEvents() as changed:
        build_engine(EngineConfig(**dict(base, max_num_seqs=3)))
    assert changed.counts[MISS] > 0 and len(entries(cache_dir)) > len(written)
