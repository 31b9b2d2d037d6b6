"""The accelerator memory JAX may use, sized from ``gpu_memory_utilization`` as vLLM users mean it:
the fraction of the whole card this engine may fill (weights, KV cache, working memory).

XLA's GPU client allocates every array from one pool of ``XLA_CLIENT_MEM_FRACTION`` x the card's
memory (0.75 when unset; ``XLA_PYTHON_CLIENT_MEM_FRACTION`` is the older name), fixed when the
backend starts: nothing outside it can hold an array. Sizing the cache as a fraction of that pool
gave a 0.9 engine 0.9 x 0.75 = 0.675 of an H200 (2026-12-04: a 104.9 GiB pool of 139.8). So
:func:`claim` starts the backends with the pool set to the utilization when nobody chose it (the
variable unset, the backends not started), and :func:`kv_budget` sizes the cache against the card:
``min(utilization x card, pool) - in use - working memory``. On TPUs (no fraction: the limit is the
whole HBM) and CPUs nothing changes. The variable is set only while the backends start, so child
processes do not inherit it."""
from __future__ import annotations

import os
from dataclasses import dataclass

ENV = ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION")  # jaxlib reads both (the second deprecated)
XLA_DEFAULT_FRACTION = 0.75  # XLA's GPU pool when neither variable is set
GPU_PLATFORMS = ("gpu", "cuda", "rocm")


@dataclass(frozen=True)
class Pool:
    fraction: float  # of the card: a GPU pool's bytes_limit / the card's memory
    how: str  # "claimed" (set here), "env" (the user's variable), "started" (backends already running)
    env: str | None = None  # the user's variable that set the fraction, if one did

    def describe(self) -> str:
        return {"claimed": f"pool = {self.fraction:g} of the card (gpu_memory_utilization)",
                "env": f"pool = {self.fraction:g} of the card ({self.env})",
                "started": f"backends started before the engine: pool assumed {self.fraction:g} of the card"}[self.how]


_pool: Pool | None = None


def _user_fraction() -> tuple[str, float] | tuple[None, None]:
    """The first of ENV the user set, and its value (ValueError naming it unless a number in (0, 1])."""
    for name in ENV:
        value = os.environ.get(name)
        if value:
            try:
                fraction = float(value)
            except ValueError:
                fraction = float("nan")
            if not 0 < fraction <= 1:
                raise ValueError(f"{name}={value!r} is invalid: must be a number in (0, 1], the fraction of the "
                                 f"accelerator's memory JAX's pool may take")
            return name, fraction
    return None, None


def claim(utilization: float) -> Pool:
    """Start the JAX backends with the GPU pool at ``utilization`` of the card, unless the user set
    the fraction or the backends already run (then the pool is what they got). Once per process:
    the backends start once. A CUDA backend that cannot start with that pool raises (jax does not
    fall back from a failing plugin) with the field and value named."""
    global _pool
    if _pool is not None:
        return _pool
    import jax
    from jax._src import xla_bridge

    name, fraction = _user_fraction()
    if xla_bridge.backends_are_initialized():
        _pool = Pool(fraction or XLA_DEFAULT_FRACTION, "started", name)
    elif name is not None:
        _pool = Pool(fraction, "env", name)
    else:
        os.environ[ENV[0]] = repr(float(utilization))
        try:
            jax.devices()  # starts the backends: the GPU client reads the variable now
        except RuntimeError as e:
            raise RuntimeError(f"gpu_memory_utilization={utilization!r}: the accelerator backend did not start "
                               f"with a memory pool of that fraction of the card ({e}); lower "
                               f"gpu_memory_utilization or set {ENV[0]}") from None
        finally:
            del os.environ[ENV[0]]
        _pool = Pool(float(utilization), "claimed")
    return _pool


def kv_budget(stats: dict, platform: str, utilization: float, pool_fraction: float, reserve_bytes: int) -> int:
    """Bytes the KV cache may take on an accelerator with allocator ``stats`` (jax memory_stats):
    on GPUs ``utilization`` of the card (the pool's bytes_limit / pool_fraction), capped by the
    pool; elsewhere of bytes_limit. Less what is in use (the weights) and ``reserve_bytes`` (the
    step's working memory, measured by the profiling pass)."""
    limit = int(stats["bytes_limit"])
    card = limit / pool_fraction if platform in GPU_PLATFORMS else limit
    return min(int(card * utilization), limit) - int(stats.get("bytes_in_use", 0)) - reserve_bytes
