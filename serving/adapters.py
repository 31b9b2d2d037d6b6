"""Adapters: the served LoRA adapters by public name, for both doors (no jax, no grpc, no HTTP).

The front door owns one ``Adapters`` (``door.adapters``). gRPC names an adapter in
``GenerateRequest.lora_name``, HTTP in the request's ``model``; both resolve it here
(``resolve``), so an unknown name is the same NOT_FOUND behind either door. Adapters come from
``--lora-modules name=path ...`` at start (``register_modules``, on the engine thread, before
the server is ready: a bad module fails the start) and from ``load`` / ``unload`` at run time
(gRPC ``LoadAdapter`` / ``UnloadAdapter``, HTTP ``/v1/load_lora_adapter`` /
``/v1/unload_lora_adapter``, vLLM's). A load reads and checks the adapter's files on the engine's
loader thread (``engine.load_lora_adapter``: the engine keeps stepping meanwhile), then runs the
engine's ``add_lora(lora, adapter)`` on the engine thread; an unload runs ``remove_lora`` there.
Each name gets the next ``lora_int_id`` (ids are never reused, so a reloaded adapter never hits
the prefix cache of the one it replaces).

Errors (FrontDoorError): lora off (INVALID_ARGUMENT naming enable_lora), unknown name (NOT_FOUND),
a name already served or the base model's name (ALREADY_EXISTS), a bad adapter or one in use
(INVALID_ARGUMENT with the engine's one-line message).
"""

from __future__ import annotations

import asyncio
from typing import Any

from jaxllm.lora.request import LoRARequest


class Adapters:
    def __init__(self, async_engine: Any) -> None:
        self.async_engine = async_engine
        self.by_name: dict[str, LoRARequest] = {}
        self._next_id = 1
        self._busy: set[str] = set()  # names being loaded or unloaded right now

    # ----- what the engine offers ---------------------------------------------------------------
    def enabled(self) -> bool:
        eng = self.async_engine.engine
        cfg = getattr(eng, "config", None)
        return bool(getattr(cfg, "enable_lora", False)) and hasattr(eng, "add_lora")

    def list(self) -> list[LoRARequest]:
        return sorted(self.by_name.values(), key=lambda r: r.lora_int_id)

    def resolve(self, name: str | None, field: str = "lora_name") -> LoRARequest | None:
        """The adapter called ``name`` (None / "" = the base model), else NOT_FOUND."""
        from serving.frontdoor import Code, FrontDoorError

        if not name:
            return None
        lora = self.by_name.get(name)
        if lora is None:
            known = ", ".join(sorted(self.by_name)) or "none"
            raise FrontDoorError(Code.NOT_FOUND, f"{field}={name!r} does not exist: this server's adapters "
                                                 f"are: {known}", field)
        return lora

    # ----- start-up (engine thread) ----------------------------------------------------------------
    def register_modules(self, engine: Any, modules, base_names: tuple[str, ...]) -> None:
        """``--lora-modules``: add each (name, path) to ``engine`` now; ValueError (one line) on the first
        bad one, which fails the server's start."""
        for name, path in modules:
            if name in self.by_name or name in base_names:
                raise ValueError(f"--lora-modules {name}={path} is invalid: the name {name!r} is already served")
            lora = LoRARequest(name, self._next_id, path)
            try:
                engine.add_lora(lora)
            except ValueError as exc:
                raise ValueError(f"--lora-modules {name}={path} is invalid: {exc}") from None
            self._next_id += 1
            self.by_name[name] = lora

    # ----- run time (event loop) ----------------------------------------------------------------------
    async def load(self, name: str, path: str, base_names: tuple[str, ...]) -> LoRARequest:
        from serving.frontdoor import Code, FrontDoorError, invalid

        self._check_enabled()
        if not name:
            raise invalid("lora_name='' is invalid: must be non-empty", "lora_name")
        if not path:
            raise invalid("lora_path='' is invalid: must be non-empty", "lora_path")
        if name in self.by_name or name in self._busy or name in base_names:
            raise FrontDoorError(Code.ALREADY_EXISTS, f"lora_name={name!r} is invalid: already served "
                                                      f"(unload it first)", "lora_name")
        lora = LoRARequest(name, self._next_id, path)
        self._next_id += 1
        self._busy.add(name)

        async def run() -> LoRARequest:  # shielded: a caller gone mid-load leaves the tables consistent
            try:
                adapter = await self._load_files(lora)  # off the engine thread: other requests keep streaming
                await self._engine_call(lambda eng: eng.add_lora(lora) if adapter is None
                                        else eng.add_lora(lora, adapter))
            finally:
                self._busy.discard(name)
            self.by_name[name] = lora
            return lora
        return await asyncio.shield(asyncio.ensure_future(run()))

    async def unload(self, name: str) -> LoRARequest:
        self._check_enabled()
        lora = self.resolve(name)
        if name in self._busy:
            from serving.frontdoor import Code, FrontDoorError

            raise FrontDoorError(Code.UNAVAILABLE, f"lora_name={name!r} is being loaded or unloaded; retry")
        self._busy.add(name)

        async def run() -> LoRARequest:
            try:
                await self._engine_call(lambda eng: eng.remove_lora(lora.lora_int_id))
            finally:
                self._busy.discard(name)
            self.by_name.pop(name, None)
            return lora
        return await asyncio.shield(asyncio.ensure_future(run()))

    def _check_enabled(self) -> None:
        if not self.enabled():
            from serving.frontdoor import invalid

            raise invalid("enable_lora=False is invalid for adapters: start the server with --enable-lora "
                          "(or --lora-modules)", "enable_lora")

    async def _load_files(self, lora: LoRARequest):
        """``lora``'s files read and checked on the engine's loader thread (``load_lora_adapter``),
        registering nothing; None for an engine without one (then ``add_lora`` loads them)."""
        submit = getattr(self.async_engine.engine, "load_lora_adapter", None)
        if submit is None:
            return None
        from serving.frontdoor import invalid

        try:
            return await asyncio.wrap_future(submit(lora))
        except ValueError as exc:  # a bad adapter: the engine's one-line message, as add_lora's
            raise invalid(str(exc)) from None

    async def _engine_call(self, fn):
        from jaxllm.engine.async_engine import EngineDeadError
        from serving.frontdoor import Code, FrontDoorError, dead_message, invalid

        try:
            return await self.async_engine.call(fn)
        except ValueError as exc:
            raise invalid(str(exc)) from None
        except EngineDeadError as exc:
            raise FrontDoorError(Code.INTERNAL, dead_message(exc)) from None
        except RuntimeError as exc:
            raise FrontDoorError(Code.UNAVAILABLE, str(exc)) from None
