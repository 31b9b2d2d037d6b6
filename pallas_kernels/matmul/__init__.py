"""Matmuls over a layer scan's stacked weights, read in place at the traced layer index."""
from pallas_kernels.matmul.stacked import stacked_matmul, stacked_matmul_reference, stacked_matmul_supported

__all__ = ["stacked_matmul", "stacked_matmul_reference", "stacked_matmul_supported"]
