"""The persistent compilation cache: one directory per engine config, even within one process."""
import os

import jax
from jax.experimental.compilation_cache import compilation_cache

from jaxllm.config import EngineConfig
from jaxllm.engine.factory import enable_compile_cache


def test_each_config_writes_its_own_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLLM_COMPILE_CACHE", str(tmp_path))
    before = jax.config.jax_compilation_cache_dir
    try:
        a = enable_compile_cache(EngineConfig(model="a"))
        jax.jit(lambda x: x * 3 + 2)(1.0)
        b = enable_compile_cache(EngineConfig(model="b"))
        jax.jit(lambda x: x * 7 + 2)(1.0)
        assert a != b and os.path.dirname(a) == str(tmp_path)
        assert len(os.listdir(a)) == 1 and len(os.listdir(b)) == 1
        assert enable_compile_cache(EngineConfig(model="a")) == a  # same config, same directory
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
        compilation_cache.reset_cache()
