"""Ragged paged attention: reference (pure jnp) and Pallas Triton kernels behind one entry point."""
from pallas_kernels.attention.decode import paged_decode_attention
from pallas_kernels.attention.dispatch import IMPLS, ragged_paged_attention, resolve_impl
from pallas_kernels.attention.prefill import paged_prefill_attention
from pallas_kernels.attention.reference import ragged_paged_attention_reference

__all__ = ["IMPLS", "paged_decode_attention", "paged_prefill_attention", "ragged_paged_attention",
           "ragged_paged_attention_reference", "resolve_impl"]
