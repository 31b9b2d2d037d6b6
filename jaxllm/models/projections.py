"""The one hook every decoder projection goes through: `proj(spec, x, name, w, layer)` (LoRA deltas,
jaxllm/lora/delta.py, and quantized weights land here, once). Four per layer: the fused "wqkv" and "w_gate_up"
(shard-major, jaxllm/models/fusion.py: a LoRA B of a fused projection is laid out in that order), "wo", "w_down". Normally XLA's dot on the layer's weight: its own array in
the "unroll" layer loop (read in place), a slice of the stacked array in the "scan" loop. In the scan
loop, an experiment (JAXLLM_STACKED_MATMUL=1) uses the Pallas `stacked_matmul` that reads the
stacked weight in place at the traced layer index instead.

Why the experiment: XLA copies each layer's weight slice out of the stacked array before its
matmul (seen in the CPU and GPU HLO), so a decode step moves about 3x the weight bytes; on an H200
batch-1 decode ran at 27% of the weight-read roofline (bench/RESULTS.md). The kernel path applies
only on GPU (or interpret mode for tests), on one device, to steps of at most MAX_ROWS tokens.

Full-precision projections of decode-sized steps (at most stacked_dot.MAX_TOKENS tokens) in the CPU
scan loop, one device, are read in place too: in row blocks sliced from the stacked weight at the
traced layer (jaxllm/models/stacked_dot.py; $JAXLLM_CPU_STACKED_DOT), so the scan makes no per-layer
copy of them; like the quantized ones (`stacked_quant`) they reach the loop once, not as scan xs.

Quantized weights (int8 / fp8, per-column or block scales) in steps of at most MAX_ROWS tokens go
to the Pallas `quant_matmul` on GPUs ($JAXLLM_QUANT_MATMUL "auto" (default) | "pallas" | "xla";
"pallas" on a CPU runs it in interpret mode, for tests): it streams the 1-byte weight and converts
each tile in registers, where XLA's gemm for a few rows ran at half the int8 bandwidth
(pallas_kernels/matmul/quant.py). 4-bit weights, longer steps and tensor parallelism keep XLA's dot.
"""
from __future__ import annotations

import math
import os

import jax

from jaxllm.lora.delta import LoRAWeight, lora_delta
from jaxllm.models import quant_dot, stacked_dot
from jaxllm.models.leading_dot import leading_dot
from jaxllm.models.quant import QUANT_PARAMS, QuantWeight, quant_einsum
from pallas_kernels.matmul import quant_matmul, quant_matmul_supported, stacked_matmul, stacked_matmul_supported
from pallas_kernels.matmul.stacked import MAX_ROWS

ENV_VAR = "JAXLLM_STACKED_MATMUL"
QUANT_ENV = quant_dot.QUANT_ENV
pallas_quant_matmul = quant_dot.pallas_quant_matmul


class _InPlace:
    """What the scan loop hands the decoder layer for a weight the Projector reads from the stacked
    array at the traced layer (`Projector.in_place`): the scan does not slice such a weight."""

    def __repr__(self) -> str:
        return "IN_PLACE"


IN_PLACE = _InPlace()


class Projector:
    """`proj(spec, x, name, w_slice, layer)`: `jnp.einsum(spec, x, w_slice)` where spec contracts all
    of x's axes but the first (tokens) with the weight's leading axes. Built once per trace (the
    choice of path is static)."""

    def __init__(self, stacked: dict[str, jax.Array] | None, num_tokens: int, layout, *, interpret: bool | None = None,
                 lora_onehot: jax.Array | None = None):
        """`stacked`: the scan loop's stacked weights (None in the unroll loop: no experiment).
        `lora_onehot` [T, S]: each token's adapter slot (jaxllm/lora/delta.py), for LoRAWeights."""
        self.lora_onehot = lora_onehot
        self.layout = layout
        on = (os.environ.get(ENV_VAR, "0") == "1" and stacked is not None and layout is None
              and num_tokens <= MAX_ROWS)
        self.interpret = jax.default_backend() != "gpu" if interpret is None else interpret
        self.stacked = stacked if on else None
        self.pallas_quant = layout is None and num_tokens <= MAX_ROWS and pallas_quant_matmul()
        # quantized weights: the column-chunked dot on CPU (no f32 copy of a weight), one device only
        self.chunked_quant = quant_dot.use_chunked(layout)
        # ... and in the scan loop each chunk is sliced straight out of the stacked weight at the traced
        # layer (else XLA copies the layer's s8 slice first): these weights are passed to the loop once,
        # not as scan xs (`in_place`); float8 as uint8 bits (held so from load, quant_dot.py)
        self.stacked_quant = {}
        if self.chunked_quant and stacked is not None:
            self.stacked_quant = quant_dot.fp8_as_bits({n: w for n, w in stacked.items() if isinstance(w, QuantWeight)
                                                        and f"layers.{n}" in QUANT_PARAMS})  # not the experts

        # full-precision projections on CPU, decode-sized steps: read in row blocks from the stacked
        # weight at the traced layer (stacked_dot.py), not copied out of it whole by the scan; not
        # under the explicit Pallas stacked-matmul experiment
        self.stacked_float = {}
        if stacked is not None and self.stacked is None and stacked_dot.use_stacked_dot(num_tokens, layout):
            self.stacked_float = {n: w for n, w in stacked.items() if not isinstance(w, QuantWeight)
                                  and f"layers.{n}" in QUANT_PARAMS}

    @property
    def in_place(self) -> frozenset[str]:
        """Names the Projector reads from the stacked weight at the traced layer (scan loop): the layer
        hands it `IN_PLACE` for them instead of a slice."""
        return frozenset(self.stacked_quant) | frozenset(self.stacked_float)

    def __call__(self, spec: str, x: jax.Array, name: str, w, layer) -> jax.Array:
        """`w`: the layer's weight, a jax.Array or a QuantWeight (weight-only int8/fp8: dequantized
        in the dot, jaxllm/models/quant.py; the stacked-matmul experiment reads plain weights only),
        IN_PLACE for a name in `in_place` (scan loop), or a LoRAWeight wrapping any of them: the base
        projection plus each token's adapter delta."""
        if isinstance(w, LoRAWeight):  # B in the fused output's order: the delta adds as it comes
            return self(spec, x, name, w.base, layer) + lora_delta(spec, x, w.a, w.b, self.lora_onehot)
        if name in self.stacked_float:  # w is IN_PLACE: the stacked fp32 / bf16 weight, read at the traced layer
            return stacked_dot.stacked_einsum(x, self.stacked_float[name], layer)
        stacked_layer = name in self.stacked_quant  # w is IN_PLACE: the stacked weight, read at the traced layer
        if stacked_layer:
            w = self.stacked_quant[name]
        if isinstance(w, QuantWeight) and self.pallas_quant:
            y = self._pallas_quant(x, w, layer if stacked_layer else None)
            if y is not None:
                return y
        if stacked_layer:
            return quant_einsum(spec, x, w, chunked=True, layer=layer)
        if isinstance(w, QuantWeight):
            return quant_einsum(spec, x, w, chunked=self.chunked_quant)
        if self.stacked is not None:
            t, k = x.shape[0], math.prod(x.shape[1:])
            ws = self.stacked[name]  # [L, in..., out...]: the contracted axes lead
            n = ws.size // (ws.shape[0] * k)
            if stacked_matmul_supported(t, k, n):
                y = stacked_matmul(x.reshape(t, k), ws.reshape(ws.shape[0], k, n), layer, interpret=self.interpret)
                return y.reshape((t,) + w.shape[x.ndim - 1:])  # [T, out...]
        return leading_dot(x, w)  # [T, out...]: spec's contraction, contracting axes in layout order

    def _pallas_quant(self, x: jax.Array, w: QuantWeight, layer) -> jax.Array | None:
        """x [T, in...] @ w (q [in..., out...], or [L, in..., out...] read at `layer`) through quant_matmul,
        flattened to [T, K] @ [K, N] (a packed 4-bit q: [K / 2, N] bytes); None where the kernel does not
        take the weight (4-bit unpacked, shapes): the caller's XLA dot then runs."""
        lead = 0 if layer is None else 1  # the stacked layer axis
        if w.packed and w.q.ndim + w.pack_axis != lead + x.ndim - 2:  # not the last contracted axis
            return None
        q, scale, offset, k, block, out_shape = quant_dot.flat_quant(w.q, w.scale, w.offset, x.ndim - 1, bool(lead),
                                                                     w.packed)
        t = x.shape[0]
        if block is not None and k % scale.shape[-2]:  # the block scales do not tile K
            return None
        if not quant_matmul_supported(t, k, q.shape[-1], w.q.dtype, block, w.packed):
            return None
        y = quant_matmul(x.reshape(t, k), q, scale, offset, layer=layer, packed=w.packed,
                         interpret=self.interpret)  # [T, N]
        return y.reshape((t,) + out_shape)  # [T, out...]
