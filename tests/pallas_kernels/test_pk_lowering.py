"""Every GPU kernel lowers for CUDA on a CPU-only machine (jax.export under an abstract H100).

Catches Triton lowering errors (unsupported ops, bad indexing, shape/dtype mistakes) without a GPU.
Shapes: SmolLM2 (9 q heads / 3 kv heads, head_dim 64) and Llama-2-13B (40 / 40, head_dim 128).
"""
import functools
import warnings

import jax
import jax.numpy as jnp
import pytest
from jax._src.pallas.triton import lowering as triton_lowering
from jax.experimental.pallas import triton as plgpu
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

from pallas_kernels import AttentionMetadata, KVCache, ragged_paged_attention

MODELS = {"smollm2": (9, 3, 64), "llama2_13b": (40, 40, 128)}
H100 = AbstractMesh((1,), ("x",), (AxisType.Explicit,),
                    abstract_device=AbstractDevice(device_kind="NVIDIA H100", num_cores=None, platform="gpu"))


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


def export_for_cuda(impl, num_heads, num_kv_heads, head_dim, *, decode, dtype=jnp.bfloat16, fp8=False, **opts):
    """fp8: the cache is fp8 (uint8 pages holding e4m3fn bits + [L, kvh] f32 K/V scales)."""
    T, S = (64, 64) if decode else (512, 16)
    L, NB, bs, MB = 4, 256, 16, 128
    page_dtype = jnp.uint8 if fp8 else dtype

    def step(q, k, v, layer, slots, tables, ctx, cu, *scales):
        md = AttentionMetadata(slots, tables, ctx, cu, decode_only=decode)
        return ragged_paged_attention(q, KVCache(k, v, *scales), layer, md, impl=impl, **opts)

    args = (_sds((T, num_heads, head_dim), dtype), _sds((L, NB, bs, num_kv_heads, head_dim), page_dtype),
            _sds((L, NB, bs, num_kv_heads, head_dim), page_dtype), _sds((), jnp.int32), _sds((T,), jnp.int32),
            _sds((S, MB), jnp.int32), _sds((S,), jnp.int32), _sds((S + 1,), jnp.int32))
    args += (_sds((L, num_kv_heads), jnp.float32),) * 2 if fp8 else ()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "Pallas Triton backend is deprecated"
        with jax.sharding.use_abstract_mesh(H100):
            return jax.export.export(
                jax.jit(step), platforms=["cuda"],
                disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(plgpu.CUSTOM_CALL_TARGET_NAME)],
            )(*args)


@pytest.fixture(autouse=True)
def verify_triton_modules(monkeypatch):
    """Run the MLIR verifier on every Triton module the lowering builds (jax does not)."""
    original = triton_lowering.lower_jaxpr_to_triton_module
    built = []

    def lower_and_verify(*args, **kwargs):
        result = original(*args, **kwargs)
        assert result.module.operation.verify()
        built.append(result)
        return result

    monkeypatch.setattr(triton_lowering, "lower_jaxpr_to_triton_module", lower_and_verify)
    yield built
    assert built, "no Triton module was lowered"


def kernels(impl: str, decode: bool) -> int:
    """Triton kernels per attention call: a mixed batch through pallas_prefill runs its single-token
    sequences through the decode kernel and the rest through the prefill kernel."""
    return 2 if impl == "pallas_prefill" and not decode else 1


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("impl,decode", [("pallas_decode", True), ("pallas_prefill", False), ("pallas_prefill", True)])
@pytest.mark.parametrize("opts", [{}, dict(sliding_window=256, soft_cap=30.0)], ids=["plain", "window_softcap"])
def test_kernels_lower_for_cuda(model, impl, decode, opts):
    exported = export_for_cuda(impl, *MODELS[model], decode=decode, **opts)
    assert exported.platforms == ("cuda",)
    text = exported.mlir_module()
    assert text.count(plgpu.CUSTOM_CALL_TARGET_NAME) == kernels(impl, decode)


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("impl,decode", [("pallas_decode", True), ("pallas_prefill", False)])
def test_kernels_lower_for_cuda_fp8_cache(model, impl, decode):
    """fp8 KV cache: each K/V tile is loaded as uint8, bitcast to e4m3fn and converted to bf16 in
    registers, the per-kv-head scales loaded as scalars (one Triton kernel, verified)."""
    exported = export_for_cuda(impl, *MODELS[model], decode=decode, fp8=True, soft_cap=30.0)
    text = exported.mlir_module()
    assert text.count(plgpu.CUSTOM_CALL_TARGET_NAME) == kernels(impl, decode)
    assert "ui8" in text  # the cache's pages reach the kernel as bytes


def test_kernels_lower_for_cuda_fp32():
    for impl, decode in [("pallas_decode", True), ("pallas_prefill", False)]:
        export_for_cuda(impl, 9, 3, 64, decode=decode, dtype=jnp.float32)


@pytest.mark.parametrize("m,k,n", [(64, 5120, 5120), (8, 5120, 13824), (1, 13824, 5120), (64, 576, 192)])
def test_stacked_matmul_lowers_for_cuda(m, k, n):
    from pallas_kernels.matmul import stacked_matmul

    f = jax.jit(lambda x, w, layer: stacked_matmul(x, w, layer))
    args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((40, k, n), jnp.bfloat16),
            jax.ShapeDtypeStruct((), jnp.int32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with jax.sharding.use_abstract_mesh(H100):
            exported = jax.export.export(
                f, platforms=["cuda"],
                disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(plgpu.CUSTOM_CALL_TARGET_NAME)])(*args)
    assert exported.mlir_module().count(plgpu.CUSTOM_CALL_TARGET_NAME) == 1


@pytest.mark.parametrize("m,k,n,qdtype,block,offset,packed", [
    (1, 5120, 15360, jnp.int8, None, False, None), (64, 13824, 5120, jnp.float8_e4m3fn, None, False, None),
    (8, 5120, 5120, jnp.uint8, None, False, None), (4, 5120, 13824, jnp.int8, 32, False, None),
    (2, 576, 192, jnp.int8, 32, True, None), (1, 5120, 15360, jnp.uint8, 128, True, "uint4"),
    (16, 13824, 5120, jnp.uint8, 32, False, "int4")])
def test_quant_matmul_lowers_for_cuda(m, k, n, qdtype, block, offset, packed):
    """int8 / fp8 (and fp8 bits) weight tiles converted to bf16 in registers; block scales per chunk;
    4-bit pairs unpacked with masks and shifts."""
    from pallas_kernels.matmul import quant_matmul

    sshape = (k // block, n) if block else (n,)
    args = [jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((k // 2 if packed else k, n), qdtype),
            jax.ShapeDtypeStruct(sshape, jnp.float16 if block else jnp.float32)]
    args += [jax.ShapeDtypeStruct(sshape, jnp.float32)] if offset else [None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with jax.sharding.use_abstract_mesh(H100):
            exported = jax.export.export(
                jax.jit(functools.partial(quant_matmul, packed=packed)), platforms=["cuda"],
                disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(plgpu.CUSTOM_CALL_TARGET_NAME)])(*args)
    text = exported.mlir_module()
    assert text.count(plgpu.CUSTOM_CALL_TARGET_NAME) == 1
    assert "bf16" in text and ("i8" in text or "f8E4M3FN" in text)  # the weight reaches the kernel as its bytes


MHA_OPTS = {"plain": {}, "window_softcap": dict(sliding_window=256, soft_cap=30.0), "fp8": dict(fp8=True, soft_cap=30.0)}


@pytest.mark.parametrize("impl,decode", [("pallas_decode", True), ("pallas_prefill", False)])
@pytest.mark.parametrize("shape,group,opts", [
    ((40, 40, 128), "16", "plain"), ((40, 40, 128), "16", "window_softcap"), ((40, 40, 128), "16", "fp8"),
    ((40, 40, 128), "32", "plain"), ((40, 40, 128), "2", "plain"), ((16, 16, 64), "auto", "plain"),
    ((8, 8, 256), "16", "fp8")], ids=lambda x: "x".join(map(str, x)) if isinstance(x, tuple) else x)
def test_mha_decode_kernel_lowers_for_cuda(monkeypatch, impl, decode, shape, group, opts):
    """JAXLLM_DECODE_MHA_GROUP on an MHA model: the G-heads-per-program decode kernel (decode_mha.py) lowers
    under the Triton verifier, decode-only and in a mixed batch (decode_rows); its [block_k * G, d] K/V
    tiles and [max(G, 16), block_k * G] logits must be powers of two, which interpret mode does not check."""
    monkeypatch.setenv("JAXLLM_DECODE_MHA_GROUP", group)
    text = export_for_cuda(impl, *shape, decode=decode, **MHA_OPTS[opts]).mlir_module()
    assert text.count(plgpu.CUSTOM_CALL_TARGET_NAME) == kernels(impl, decode)
    assert "jaxllm_paged_decode_mha" in text


def test_mha_group_falls_back_on_gqa(monkeypatch):
    """The switch asks for the variant, the model is GQA (SmolLM2, 9/3 heads): the one-head decode kernel."""
    monkeypatch.setenv("JAXLLM_DECODE_MHA_GROUP", "16")
    text = export_for_cuda("pallas_decode", *MODELS["smollm2"], decode=True).mlir_module()
    assert "jaxllm_paged_decode" in text and "jaxllm_paged_decode_mha" not in text
