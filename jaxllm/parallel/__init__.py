"""Tensor parallelism: mesh, the logical-axis → mesh-axis table, layouts and sharded ops.

    layout = TPLayout.plan(model_config, tensor_parallel_size)   # validates, builds the mesh
    params = layout.place_params(model_config, params, dtype)     # numpy/jax → sharded arrays
    model = build_model(model_config, params, dtype, layout=layout)

See README.md in this folder for the design (sharding table, kv-head replication, vocabulary,
multi-host).
"""
from jaxllm.parallel.layout import KV_PARAMS, TPLayout, check_fits, valid_tp_sizes
from jaxllm.parallel.mesh import check_device_count, init_distributed, make_mesh
from jaxllm.parallel.rules import CACHE_AXES, LOGICAL_AXIS_RULES, MESH_AXES, logical_to_spec

__all__ = ["CACHE_AXES", "KV_PARAMS", "LOGICAL_AXIS_RULES", "MESH_AXES", "TPLayout", "check_device_count",
           "check_fits", "init_distributed", "logical_to_spec", "make_mesh", "valid_tp_sizes"]
