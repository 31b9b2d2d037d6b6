"""The model cards and LoRA adapter admin of the HTTP door (no jax): ``GET /v1/models`` (the
model, one card per --served-model-name, then its LoRA adapters with ``parent`` = the first name,
as vLLM) and vLLM's ``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter`` (plain-text
"Success: ..." answers). ``model_of`` is serving/openai_api.py's resolver (404 for an unknown name)."""
from __future__ import annotations

import time
import uuid
from typing import Any, Callable

from starlette.responses import PlainTextResponse

from serving.openai_protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest


def add_model_routes(app: Any, server: Any, door: Any, model_of: Callable) -> None:
    cfg = server.config

    @app.get("/v1/models")
    async def models():
        model = door.model().name  # the --model value, vLLM's root of the base model's card
        info = model_of(None)
        created = int(wall_started(server.async_engine.started_at))
        base = {"id": info.name, "object": "model", "created": created, "owned_by": "jaxllm",
                "root": model, "parent": None, "max_model_len": info.max_model_len}
        # a card per --served-model-name, as vLLM; then the LoRA adapters: root = the adapter's path,
        # parent = the first name
        cards = [base] + [{**base, "id": alias} for alias in cfg.served_model_aliases]
        cards += [{**base, "id": a.lora_name, "root": a.lora_path, "parent": info.name}
                  for a in door.adapters.list()]
        return {"object": "list", "data": [{**c, "permission": [_permission(created)]} for c in cards]}

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRAAdapterRequest):
        info = model_of(None)
        lora = await door.adapters.load(body.lora_name, body.lora_path, cfg.model_names(info.name))
        return PlainTextResponse(f"Success: LoRA adapter {lora.lora_name!r} added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest):
        model_of(None)
        lora = await door.adapters.unload(body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter {lora.lora_name!r} removed successfully.")


def _permission(created: int) -> dict:
    """vLLM's ModelPermission with its defaults (the OpenAI legacy object): one per model card."""
    return {"id": f"modelperm-{uuid.uuid4().hex}", "object": "model_permission", "created": created,
            "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
            "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
            "organization": "*", "group": None, "is_blocking": False}


def wall_started(t_monotonic: float) -> float:
    """The wall-clock time of a ``time.monotonic()`` instant (the engine's start: cards' ``created``)."""
    return time.time() - (time.monotonic() - t_monotonic)
