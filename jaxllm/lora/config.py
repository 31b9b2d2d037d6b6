"""LoRAConfig: what the device side needs to know about Multi-LoRA (host only, no jax)."""
from __future__ import annotations

from dataclasses import dataclass


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
