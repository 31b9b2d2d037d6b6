"""Device mesh for tensor parallelism, and multi-host start-up (`jax.distributed.initialize`)."""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from jaxllm.parallel.rules import MESH_AXES


def check_device_count(tp: int, devices=None) -> list:
    """The first `tp` devices, or a ValueError naming how many were asked and how many exist."""
    devices = list(jax.devices() if devices is None else devices)
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tensor_parallel_size={tp!r} is invalid: must be an integer >= 1")
    if tp > len(devices):
        platform = devices[0].platform if devices else jax.default_backend()
        raise ValueError(f"tensor_parallel_size={tp} is invalid: it needs {tp} devices but only "
                         f"{len(devices)} {platform} device(s) are present"
                         + (" (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N fakes N devices)"
                            if platform == "cpu" else ""))
    return devices[:tp]


def make_mesh(tp: int, devices=None) -> Mesh:
    """A ("dp", "tp") mesh of shape (1, tp) over the first `tp` devices (all processes' devices in
    multi-host runs: `jax.devices()` is global). Axes are Auto: XLA's partitioner places the
    collectives between the shard_map'd kernels."""
    devs = check_device_count(tp, devices)
    return Mesh(np.asarray(devs, dtype=object).reshape(1, tp), MESH_AXES,
                axis_types=(AxisType.Auto, AxisType.Auto))


def init_distributed(coordinator_address: str | None, num_processes: int | None,
                     process_id: int | None) -> bool:
    """Joins a multi-host run (one process per host, all running the same command). No-op when
    no coordinator is given. Must run before anything touches a jax backend. Returns True when
    this process is the scheduler (process 0) or the run is single-host."""
    if coordinator_address is None:
        if num_processes not in (None, 1) or process_id not in (None, 0):
            raise ValueError("--num-processes/--process-id need --coordinator-address (host:port of process 0)")
        return True
    if num_processes is None or process_id is None:
        raise ValueError("--coordinator-address needs --num-processes and --process-id")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} is invalid: must be in [0, num_processes={num_processes})")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    return jax.process_index() == 0
