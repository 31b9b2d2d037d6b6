"""Multi-LoRA: PEFT adapters served from one base model in the same batch.

Seams (host/device): the engine's adapter manager gives each scheduled sequence a device slot
(`ScheduledSeq.lora_slot`, 0 = the base model, 1..max_loras = adapter slots) and loads adapters
into slots through the runner (`set_lora(slot, adapter)`); the runner turns the slots into a
per-token adapter index padded to the bucket, and the Projector adds each token's LoRA delta.
"""
from jaxllm.lora.request import LoRARequest

__all__ = ["LoRARequest"]
