"""Small-M matmuls (decode steps): a layer scan's stacked weights read in place at the traced layer
index (stacked.py), and weight-only int8 / fp8 weights dequantized in registers (quant.py)."""
from pallas_kernels.matmul.quant import quant_matmul, quant_matmul_reference, quant_matmul_supported
from pallas_kernels.matmul.stacked import stacked_matmul, stacked_matmul_reference, stacked_matmul_supported

__all__ = ["quant_matmul", "quant_matmul_reference", "quant_matmul_supported", "stacked_matmul",
           "stacked_matmul_reference", "stacked_matmul_supported"]
