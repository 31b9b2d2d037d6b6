"""`LoRARequest`: which adapter a request runs with (vLLM's shape; host only, no jax)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """lora_name: the adapter's public name (what `/v1/models` lists and HTTP's `model` picks);
    lora_int_id: a unique positive id (vLLM's contract: two requests with the same id use the same
    adapter; 0 is the base model and invalid here); lora_path: a PEFT adapter directory
    (`adapter_config.json` + `adapter_model.safetensors`)."""
    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError(f"lora_name={self.lora_name!r} is invalid: must be a non-empty string")
        if isinstance(self.lora_int_id, bool) or not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id={self.lora_int_id!r} is invalid: must be an int >= 1 (0 is the base model)")
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise ValueError(f"lora_path={self.lora_path!r} is invalid: must be a non-empty path string")
