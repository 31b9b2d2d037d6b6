"""Whole-block KV copies for forks (jaxllm/runner/block_copy.py) against a sequential numpy copy:
any number of pairs in COPY_CHUNK-sized calls, in order (a pair may read what an earlier one wrote),
padding a no-op; and the compiled copy's loop has a trip count XLA knows (a GPU then reads no predicate
back), with no conditional."""
import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.runner.block_copy import COPY_CHUNK, copy_blocks, copy_chunks
from pallas_kernels import KVCache


def test_chunks_copy_in_order_like_numpy():
    rng = np.random.default_rng(0)
    L, NB, B, H, D = 3, 40, 4, 2, 8
    k = rng.standard_normal((L, NB, B, H, D)).astype(np.float32)
    v = rng.standard_normal((L, NB, B, H, D)).astype(np.float32)
    pairs = [(int(s), int(d)) for s, d in zip(rng.integers(1, NB, 11), rng.integers(1, NB, 11))]
    pairs[5] = (pairs[2][1], 39)  # reads a block an earlier pair wrote
    pairs[9] = (39, 7)  # across the chunk boundary too
    want_k, want_v = k.copy(), v.copy()
    for s, d in pairs:
        want_k[:, d], want_v[:, d] = want_k[:, s], want_v[:, s]
    chunks = copy_chunks(pairs)
    assert len(chunks) == -(-len(pairs) // COPY_CHUNK) and all(c[0].shape == (COPY_CHUNK,) for c in chunks)
    cache = KVCache(jnp.asarray(k), jnp.asarray(v))
    fn = jax.jit(copy_blocks, donate_argnums=(0,))
    for src, dst in chunks:
        cache = fn(cache, src, dst)
    np.testing.assert_array_equal(np.asarray(cache.k), want_k)
    np.testing.assert_array_equal(np.asarray(cache.v), want_v)


def test_compiled_copy_loop_has_a_known_trip_count_and_works_in_place():
    cache = KVCache(jnp.zeros((2, 16, 4, 2, 8), jnp.uint8), jnp.zeros((2, 16, 4, 2, 8), jnp.uint8))  # fp8 pages
    pad = np.zeros(COPY_CHUNK, np.int32)
    exe = jax.jit(copy_blocks, donate_argnums=(0,)).lower(cache, pad, pad).compile()
    loops = [line for line in exe.as_text().splitlines() if " while(" in line]
    assert loops and all(f'"known_trip_count":{{"n":"{COPY_CHUNK}"}}' in line for line in loops), loops
    assert " conditional(" not in exe.as_text()
    ma = exe.memory_analysis()
    assert ma.alias_size_in_bytes >= 2 * cache.k.nbytes and ma.temp_size_in_bytes < cache.k.nbytes
