"""`ragged_paged_attention`: the one attention entry point, dispatching by backend or by `impl`.

impl=None picks by `jax.default_backend()`: "gpu" (CUDA/ROCm) -> Pallas Triton kernels (decode
kernel when `metadata.decode_only`, else the mixed prefill kernel); "tpu" and "cpu" -> reference.
The environment variable JAXLLM_ATTENTION_IMPL (read at trace time; like vLLM's
VLLM_ATTENTION_BACKEND) overrides that choice for a whole engine: "reference" or "pallas" (or one
of IMPLS). Tests force an implementation with impl=... and interpret=True.
`mha_group` reaches the Pallas kernels' decode rows (`decode_rows`: the MHA decode kernel's head group,
0 = the one-head kernel, None = JAXLLM_DECODE_MHA_GROUP); the reference has no such choice.
"""
from __future__ import annotations

import os

import jax

from pallas_kernels.attention.decode import paged_decode_attention
from pallas_kernels.attention.prefill import paged_prefill_attention
from pallas_kernels.attention.reference import ragged_paged_attention_reference
from pallas_kernels.metadata import AttentionMetadata, KVCache

ENV_VAR = "JAXLLM_ATTENTION_IMPL"
IMPLS = {
    "reference": ragged_paged_attention_reference,
    "pallas_decode": paged_decode_attention,
    "pallas_prefill": paged_prefill_attention,
}


def resolve_impl(impl: str | None, metadata: AttentionMetadata) -> str:
    """The implementation name that `ragged_paged_attention` would run."""
    if impl is None:
        impl = os.environ.get(ENV_VAR, "").strip() or None
        if impl is not None and impl not in IMPLS and impl != "pallas":
            raise ValueError(f"{ENV_VAR}={impl!r}: expected 'reference', 'pallas' or one of {sorted(IMPLS)}")
    if impl is None:
        impl = "pallas" if jax.default_backend() == "gpu" else "reference"
    if impl == "pallas":
        impl = "pallas_decode" if metadata.decode_only else "pallas_prefill"
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; expected None, 'pallas' or one of {sorted(IMPLS)}")
    return impl


def ragged_paged_attention(
    q: jax.Array,
    cache: KVCache,
    layer,
    metadata: AttentionMetadata,
    *,
    sm_scale: float | None = None,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    impl: str | None = None,
    interpret: bool = False,
    mha_group: int | str | None = None,
) -> jax.Array:
    """Causal attention of ragged query tokens q [T, num_heads, head_dim] over the paged cache.

    Returns [T, num_heads, head_dim] in q.dtype (fp32 accumulation). See metadata.py for the
    batch layout; `layer` is a Python int or a traced int32 scalar selecting the cache layer.
    `mha_group` (static; Pallas only): see the module doc.
    """
    name = resolve_impl(impl, metadata)
    extra = {} if mha_group is None or name == "reference" else {"mha_group": mha_group}
    return IMPLS[name](q, cache, layer, metadata, sm_scale=sm_scale, sliding_window=sliding_window,
                       soft_cap=soft_cap, interpret=interpret, **extra)
