"""The MoE CUDA-export tests' shared step: a model's forward over one 7-token ragged batch (three
sequences) exported for CUDA under an abstract device, and the ragged dots in its StableHLO."""
from __future__ import annotations

import re

import jax

T_TOKENS = 7  # the step's tokens: sequences (5, 6, 7, 8), (9,), (10, 11)


def export_step_for_cuda(model, c) -> str:
    """The MLIR text of `model`'s forward (config `c`) on the 7-token step, exported for CUDA (under an
    abstract H100: a quantized model's projections are Pallas Triton kernels on GPUs)."""
    from flax import nnx

    from tests.models.test_quant_fp8_bits import step_inputs

    inputs = step_inputs(c, seqs=((5, 6, 7, 8), (9,), (10, 11)))
    gd, st = nnx.split(model)
    treedef = jax.tree.structure((st, *inputs))
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in jax.tree.leaves((st, *inputs))]

    def fwd(*leaves):
        st, t, p, cache, m = jax.tree.unflatten(treedef, leaves)
        return nnx.merge(gd, st)(t, p, cache, m)[0]

    import warnings

    from jax.experimental.pallas import triton as plgpu
    from jax.sharding import AbstractDevice, AbstractMesh, AxisType

    # an Auto (not Explicit) axis: ragged_dot has no explicit-sharding rule
    H100 = AbstractMesh((1,), ("x",), (AxisType.Auto,),
                        abstract_device=AbstractDevice(device_kind="NVIDIA H100", num_cores=None, platform="gpu"))

    triton = [jax.export.DisabledSafetyCheck.custom_call(plgpu.CUSTOM_CALL_TARGET_NAME)]  # quantized projections
    with warnings.catch_warnings(), jax.sharding.use_abstract_mesh(H100):
        warnings.simplefilter("ignore", DeprecationWarning)  # "Pallas Triton backend is deprecated"
        exported = jax.export.export(jax.jit(fwd), platforms=["cuda"], disabled_checks=triton)(*args)
    assert exported.platforms == ("cuda",)
    return exported.mlir_module()


def ragged_dots(text: str) -> list[tuple[str, str]]:
    """(operand types, result type) of every chlo.ragged_dot composite in `text`."""
    return re.findall(r"chlo\.ragged_dot\.impl.*: \((tensor<[^)]*)\) -> (tensor<[\dx]+\w+>)", text)
