"""Multi-host flags shared by `python -m jaxllm.generate`, the gRPC server and the benches.

Run the same command on every host with --coordinator-address HOST0:PORT --num-processes N
--process-id i; process 0 serves, the others follow (see README.md in this folder)."""
from __future__ import annotations

import argparse


def add_distributed_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("multi-host (one mesh over several hosts; scheduler on process 0)")
    g.add_argument("--coordinator-address", default=None,
                   help="host:port of process 0 for jax.distributed.initialize (default: none, one host)")
    g.add_argument("--num-processes", type=int, default=None, help="number of processes (hosts) (default: 1)")
    g.add_argument("--process-id", type=int, default=None, help="this process's index, 0 = the scheduler (default: 0)")


def start_distributed(args) -> bool:
    """jax.distributed.initialize from the flags (before any jax backend use). True on process 0
    (or when single-host): this process runs the engine; False: call `run_follower`."""
    if all(getattr(args, k, None) is None for k in ("coordinator_address", "num_processes", "process_id")):
        return True  # single host: no jax import here (the server's host side stays jax-free)
    from jaxllm.parallel.mesh import init_distributed

    return init_distributed(getattr(args, "coordinator_address", None), getattr(args, "num_processes", None),
                            getattr(args, "process_id", None))


def run_follower(config) -> None:
    """Processes other than 0: build the same engine (no warm-up of its own: process 0's warm-up
    drives it) and execute process 0's steps until it stops."""
    from jaxllm.engine.factory import build_engine

    engine = build_engine(config, warmup=False)
    engine.runner.follow()
