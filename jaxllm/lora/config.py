"""LoRAConfig: what the device side needs to know about Multi-LoRA (host only, no jax)."""
from __future__ import annotations

from dataclasses import dataclass

from jaxllm.gpu_defaults import gpu_default


@dataclass(frozen=True)
class LoRAConfig:
    """max_loras: device adapter slots (slot 0, the base model, comes on top); max_lora_rank: every
    adapter's rank is padded to this; max_cpu_loras: adapters the host keeps loaded (LRU; None =
    max_loras), a host-side number the runner ignores."""
    max_loras: int
    max_lora_rank: int
    max_cpu_loras: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_loras", "max_lora_rank"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} is invalid: must be an integer >= 1")

    @staticmethod
    def from_engine_config(config) -> "LoRAConfig | None":
        """None unless `config.enable_lora` (an EngineConfig)."""
        if not config.enable_lora:
            return None
        return LoRAConfig(config.max_loras, config.max_lora_rank, config.max_cpu_loras)


BASE_PROGRAM_ENV = "JAXLLM_LORA_BASE_PROGRAM"  # auto (on for GPUs) | on | off


def base_program_enabled(platform: str) -> bool:
    """Whether a LoRA runner runs steps without adapters on a base-only program (the plain runner's:
    no LoRA deltas), compiled beside the LoRA program for every bucket: $JAXLLM_LORA_BASE_PROGRAM
    "on" / "off", default "auto" = on for GPUs (`platform` "gpu", "cuda" or "rocm"), where the deltas'
    small kernels made a 13B decode step 24.7% slower with no adapter in the batch (bench/RESULTS.md);
    off elsewhere, where the second program would double the warm-up's step compiles for a gain
    lost in the CPU's noise."""
    return gpu_default(BASE_PROGRAM_ENV, ("auto", "on", "off"), "on", platform)
