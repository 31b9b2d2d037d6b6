"""Engines on the tiny Llama (tests/parallel/tiny_llama.py) at any tensor-parallel size, built lazily
and kept for the module; shared by test_tp_engine.py and test_tp_logits.py."""
from __future__ import annotations

from jaxllm.config import EngineConfig
from jaxllm.engine.factory import build_engine
from tests.parallel.tp_forward import BLOCK

MAX_LEN = 128


def compiles(runner):
    return runner.num_traces, runner.compile_count


def engine_factory(path):
    """get(tp, kv_cache_dtype="auto", warmup=True) -> the engine; get.built: {key: (engine,
    (num_traces, jit cache size) right after warm-up)}."""
    built = {}

    def get(tp, kv_cache_dtype="auto", warmup=True):
        key = tp if kv_cache_dtype == "auto" else (tp, kv_cache_dtype)
        if key not in built:
            e = build_engine(EngineConfig(model=path, tensor_parallel_size=tp, max_model_len=MAX_LEN,
                                          block_size=BLOCK, max_num_seqs=4, max_num_batched_tokens=64,
                                          kv_cache_memory_bytes=64 * 2 * 2 * BLOCK * 4 * 8 * 4,
                                          kv_cache_dtype=kv_cache_dtype),
                             compile_cache=False, warmup=warmup)
            built[key] = (e, compiles(e.runner))
        return built[key][0]

    get.built = built
    return get
