"""The narrow interface between the host engine and the (jitted) model runner.

The engine never imports jax; it talks to any object with this shape. Contract:

- ``num_blocks``: KV blocks the runner allocated (block 0 is an ordinary block, not reserved).
  The engine's KV cache manager hands out exactly ``0 .. num_blocks-1``.
- ``execute(out)``: for every ``ScheduledSeq``, write the KV of ``token_ids`` (positions
  ``start_pos ..``) into the slots given by its block table, attend over positions
  ``0 .. start_pos + len(token_ids) - 1``, and for seqs with ``sample=True`` sample one token
  from the logits of the last position. Blocks can be shared between seqs of the same step
  (prefix caching, n > 1), so a step's cache writes must land before that layer's attention
  reads the cache. Return ``{request_id: SampledToken}`` for exactly the ``sample=True`` seqs.
  Sampling must be reproducible per request: the key for the token at position ``p`` derives
  from ``(seed, p)`` only, whatever else is in the batch. While the request has fewer than
  ``params.min_tokens`` generated tokens (``start_pos + len(token_ids) - num_prompt_tokens``),
  mask EOS (unless ``params.ignore_eos``) and ``params.stop_token_ids``.
- Structured outputs: where ``out.constrained[i]`` is True, seq i's token is drawn only among the ids
  whose bit is set in ``out.grammar_bitmask[i]`` (bit t % 32 of int32 word t // 32), applied before
  allowed_token_ids, logit_bias and penalties; logprobs stay those of the raw distribution.
- ``take_prompt_logprobs()`` (optional; with ``supports_prompt_logprobs``): for seqs whose params
  ask ``prompt_logprobs``, ``{request_id: {prompt position: SampledToken}}`` computed since the last
  call, where the SampledToken is the prompt token at that position (its raw logprob and rank)
  with the top ``prompt_logprobs`` alternatives.
- ``dispatch(out) -> PendingStep``: the same step, launched without waiting for it (JAX dispatch
  is asynchronous); ``pending.result()`` waits and returns what ``execute`` would (prompt
  logprobs become available to ``take_prompt_logprobs`` then). ``execute(out)`` is
  ``dispatch(out).result()``. Steps run in dispatch order: a step dispatched later sees the KV
  cache and penalty state of every earlier one. A seq with ``placeholder=True`` feeds, as its one
  token, the token sampled for the same request by the previously dispatched step (kept on the
  device; its ``token_ids`` hold ``PLACEHOLDER_TOKEN_ID``). The engine calls ``result()`` of each
  pending step once, in dispatch order, with at most one step dispatched after it meanwhile.
- Late masks (optional; a runner with ``supports_late_bitmask = True``): a step with
  ``out.late_bitmask`` comes without ``grammar_bitmask`` (``constrained`` says which seqs will get
  one); the runner may start it but samples only after ``pending.set_bitmask(bitmask, constrained)``
  (same layout as SchedulerOutput's; None = every row free), which the engine calls once, before it
  dispatches the next step. ``result()`` before ``set_bitmask`` samples with every row free.
- ``set_lora(slot, adapter | None)`` (multi-LoRA; only called when the engine has enable_lora): write
  adapter (a ``jaxllm.lora.peft.LoRAAdapter``, or what the runner's optional ``prepare_lora(adapter)``
  made of one: checked and cast on the engine's adapter-loader thread, still at its own rank (the
  engine's host cache keeps that), so that ``set_lora`` on the engine thread is only the device
  write, which sends it at its rank and pads it on the device) into device slot ``slot`` (1..max_loras) in place, or clear it. The engine
  calls it before dispatching the first step whose seqs carry that ``lora_slot``, never for a slot
  that a seq of an undispatched step still needs; steps dispatched before keep the weights they were
  dispatched with. ``ScheduledSeq.lora_slot`` (0 = base model) picks each seq's adapter.
- ``release(ids)`` / ``out.finished_or_preempted_ids``: forget per-request device state
  (penalty counts, ...). Unknown ids are a no-op; a preempted request comes back later with
  ``start_pos == 0``.
- Multi-LoRA: ``set_lora(slot, adapter)`` loads a ``jaxllm.lora.peft.LoRAAdapter`` into device slot
  ``slot`` (1..max_loras; ``None`` empties it), for every step dispatched afterwards; a seq runs with
  the adapter in its ``lora_slot`` (0 = the base model). ValueError (nothing changed) for a slot out
  of range, a rank above max_lora_rank or an adapter of another model; a runner without LoRA raises.
  The real runner's ``lora_model_config`` is the ModelConfig to pass to ``load_adapter`` (the
  checkpoint's: tensor parallelism may repeat kv heads in ``model_config``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from jaxllm.core.scheduler_output import SchedulerOutput


@dataclass
class SampledToken:
    token_id: int
    logprob: float  # logprob of the sampled token under the raw model distribution (vLLM default)
    top_logprobs: list[tuple[int, float]] | None = None  # top-k (k = params.logprobs) when asked, best first:
    # the i-th has rank i + 1
    rank: int | None = None  # 1-based rank of token_id in the raw distribution (1 + #logits strictly greater)


class PendingStep(Protocol):
    def result(self) -> dict[str, SampledToken]: ...


class DoneStep:
    """A PendingStep whose result is already on the host (runners that compute synchronously)."""

    __slots__ = ("_result",)

    def __init__(self, result: dict[str, SampledToken]) -> None:
        self._result = result

    def result(self) -> dict[str, SampledToken]:
        return self._result


@runtime_checkable
class ModelRunnerProtocol(Protocol):
    vocab_size: int
    num_blocks: int

    def dispatch(self, out: SchedulerOutput) -> PendingStep: ...

    def execute(self, out: SchedulerOutput) -> dict[str, SampledToken]: ...

    def release(self, request_ids: list[str]) -> None: ...

    def set_lora(self, slot: int, adapter) -> None: ...
