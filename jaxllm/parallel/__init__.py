"""Tensor parallelism: mesh, the logical-axis → mesh-axis table, layouts and sharded ops.

    layout = TPLayout.plan(model_config, tensor_parallel_size)   # validates, builds the mesh
    model = build_model(model_config, params, dtype, layout=layout)  # places params into shards

See README.md in this folder for the design (sharding table, kv-head replication, vocabulary,
multi-host). Names are loaded lazily so `jaxllm.parallel.cli` (argparse flags for the gRPC
server and jaxllm.generate) imports no jax.
"""
import importlib

_EXPORTS = {
    "KV_PARAMS": "layout", "TPLayout": "layout", "check_fits": "layout", "valid_tp_sizes": "layout",
    "check_device_count": "mesh", "init_distributed": "mesh", "make_mesh": "mesh",
    "CACHE_AXES": "rules", "LOGICAL_AXIS_RULES": "rules", "MESH_AXES": "rules", "logical_to_spec": "rules",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"jaxllm.parallel.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'jaxllm.parallel' has no attribute {name!r}")
