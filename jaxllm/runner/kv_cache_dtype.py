"""`kv_cache_dtype` ("auto" | "fp8", vLLM's --kv-cache-dtype) → the KV cache's element type, and the
check that the backend can serve an fp8 cache (a one-line ValueError naming the field otherwise).

"auto" stores K/V in the model dtype; "fp8" in float8_e4m3fn with per-layer, per-kv-head scales
(pallas_kernels/kv_quant.py; calibrated at engine start, runner/kv_calibration.py): half the bytes of a bf16 cache, a quarter of an f32 one, so twice
(four times) the blocks fit the same memory.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from jaxllm.config import KV_CACHE_DTYPES
from pallas_kernels.attention.dispatch import ENV_VAR
from pallas_kernels.kv_quant import FP8

# Triton converts float8_e4m3fn ("fp8e4nv") only from compute capability 8.9 (Ada, Hopper) on.
MIN_FP8_COMPUTE_CAPABILITY = (8, 9)


def cache_dtype(kv_cache_dtype: str, model_dtype):
    """The element type the cache's pages stand for (an fp8 cache stores its uint8 bits:
    pallas_kernels/kv_quant.py STORAGE; KVCache.zeros takes this dtype)."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} is invalid: must be one of {list(KV_CACHE_DTYPES)}")
    return jnp.dtype(FP8) if kv_cache_dtype == "fp8" else jnp.dtype(model_dtype)


def _capability(device) -> tuple[int, ...] | None:
    cc = getattr(device, "compute_capability", None)
    try:
        return tuple(int(x) for x in str(cc).split(".")[:2]) if cc else None
    except ValueError:
        return None


def check_kv_cache_dtype(kv_cache_dtype: str, backend: str | None = None, device=None,
                         pallas_attention: bool | None = None) -> None:
    """ValueError when this backend cannot hold or read an fp8 cache: float8 arrays refused, or a
    GPU whose attention runs in the Pallas Triton kernels below compute capability 8.9."""
    if kv_cache_dtype != "fp8":
        return
    backend = backend or jax.default_backend()
    device = device if device is not None else jax.local_devices()[0]
    try:
        jax.block_until_ready(jnp.ones((2,), jnp.float32).astype(FP8).astype(jnp.float32))
    except Exception as e:  # noqa: BLE001 - any backend refusal becomes the one-line error below
        raise ValueError(f"kv_cache_dtype='fp8' is not supported on the {backend} backend "
                         f"(float8_e4m3fn: {type(e).__name__}); use kv_cache_dtype='auto'") from None
    if pallas_attention is None:  # what dispatch.resolve_impl picks on this backend
        impl = os.environ.get(ENV_VAR, "").strip()
        pallas_attention = impl.startswith("pallas") or (not impl and backend == "gpu")
    cc = _capability(device)
    if pallas_attention and backend == "gpu" and cc is not None and cc < MIN_FP8_COMPUTE_CAPABILITY:
        raise ValueError(f"kv_cache_dtype='fp8' is not supported on this {getattr(device, 'device_kind', 'GPU')} "
                         f"(compute capability {'.'.join(map(str, cc))}): the Pallas attention kernels need "
                         f">= 8.9 to read float8_e4m3fn; use kv_cache_dtype='auto'")
