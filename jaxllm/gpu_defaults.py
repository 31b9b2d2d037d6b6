"""Switches whose default depends on the backend being a GPU (host only, no jax).

A GPU runs a step's program from a host thread that an XLA conditional blocks until the device
reaches it, and launches many small kernels at a cost a CPU does not pay: a few choices default one
way on GPUs and the other elsewhere, each overridable by an environment variable with "auto".
"""
from __future__ import annotations

import os

GPU_PLATFORMS = ("gpu", "cuda", "rocm")  # jax.default_backend() / Device.platform of NVIDIA and AMD GPUs


def gpu_default(env: str, choices: tuple[str, ...], on: str, platform: str) -> bool:
    """$`env` read as one of `choices` ("auto" and the two settings; case and spaces ignored; unset or
    empty: "auto"): True for `on`, and for "auto" on a GPU `platform`. ValueError naming the variable,
    its value and the choices otherwise."""
    mode = (os.environ.get(env, "") or "auto").strip().lower()
    if mode not in choices:
        raise ValueError(f"{env}={mode!r} is invalid: must be one of {', '.join(choices)}")
    return platform in GPU_PLATFORMS if mode == "auto" else mode == on
