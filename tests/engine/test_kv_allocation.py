"""The engine's KV cache allocation: an allocator refusal shrinks an auto-sized cache, or fails with
the numbers when the size was configured."""
import jax
import jax.numpy as jnp
import pytest

from jaxllm.engine.factory import allocate_runner


class RefusingRunner:
    """A runner whose cache allocation fails (as the device allocator reports it) above a size."""
    fits = 100
    built = []

    def __init__(self, model, *, num_blocks, **kw):
        self.num_blocks = num_blocks
        RefusingRunner.built.append(num_blocks)
        self.kv_cache = jnp.zeros(2) if num_blocks <= self.fits else None

    @property
    def kv_cache(self):
        if self._cache is None:
            raise jax.errors.JaxRuntimeError(
                "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 34.12GiB with allocator GPU_0_bfc")
        return self._cache

    @kv_cache.setter
    def kv_cache(self, value):
        self._cache = value


def test_auto_sized_cache_shrinks_until_it_fits():
    RefusingRunner.built = []
    runner = allocate_runner(RefusingRunner, None, 130, {}, shrink=True)
    assert RefusingRunner.built == [130, 117, 105, 94]  # 10% steps until <= 100 fits
    assert runner.num_blocks == 94


def test_configured_cache_fails_with_the_numbers():
    with pytest.raises(ValueError, match="KV cache of 130 blocks does not fit in device memory"):
        allocate_runner(RefusingRunner, None, 130, {}, shrink=False)


def test_other_runtime_errors_propagate():
    class Broken(RefusingRunner):
        @property
        def kv_cache(self):
            raise jax.errors.JaxRuntimeError("INTERNAL: something else")

        @kv_cache.setter
        def kv_cache(self, value):
            pass

    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        allocate_runner(Broken, None, 10, {}, shrink=True)
