"""LLMEngine.add_request: a generation request admitted, or refused before anything changes.

Input rules (``add_request`` validates everything before anything is scheduled and raises
``ValueError`` naming the field, the value and the limit; the engine is unchanged after):
- prompt: ``str`` | ``list[int]`` | ``{"prompt_token_ids": [...]}`` | ``{"prompt": str}``;
  at least 1 token; every id in ``[0, vocab_size)``.
- prompt length must be ``< max_model_len`` (room for at least one generated token).
- prompt + max_tokens over max_model_len is accepted (vLLM's rule): generation stops when the
  sequence reaches max_model_len, with finish_reason "length".
- request ids are unique among unfinished requests; an ``n > 1`` request runs as n child
  sequences with ids ``f"{request_id}#{i}"`` (those ids are taken too). The children share
  full prompt blocks through the prefix cache.
- task: an engine either generates (``SamplingParams``) or embeds (``PoolingParams``; its runner
  pools hidden states instead of sampling, ``runner.task == "embed"``); the other kind of params
  is refused naming ``task``. An embedding prompt may be up to max_model_len tokens; it is
  prefilled (chunked under the token budget like any prompt), pooled, and finished in the step
  that computes its last token: ``step()`` returns its ``EmbeddingRequestOutput`` then and its KV
  blocks are free (they never enter the prefix cache).
- a request whose host-side processing raises (detokenizer, stop checks, output assembly) fails
  alone: it is dropped as by an abort (blocks freed), no output is returned for it, and
  ``take_request_errors()`` hands the exception to the caller (AsyncEngine fails its stream,
  ``LLM.generate`` raises). The engine keeps stepping the other requests.
- seeds: ``params.seed`` if set, else one drawn from the engine RNG (``config.seed``); child i
  of an n > 1 request uses a seed derived from (seed, i) (child 0 uses the seed itself).
- priority (vLLM's ``add_request(..., priority=)``): an int, lower runs first under
  ``scheduling_policy="priority"`` (jaxllm/core/scheduler.py); under "fcfs" only 0 is accepted.
  The children of an n > 1 request share it.
- ``fork_of`` (beam search, jaxllm/beam_search.py): a running request whose computed tokens the new
  prompt extends by one; the new request then shares its full KV blocks and gets a device copy of
  its partial last block at admission (KVCacheManager.pin_fork) instead of a prefill. Only a hint:
  anything that does not match falls back to an ordinary (prefix-cached) prefill.
- ``step_gate`` (a beam search's driver on another thread, serving/beam.py): the request samples
  one token and is then not scheduled again until ``release_step(request_id)`` allows one more
  (``Request.gate``), so it never decodes past the driver's decision (a beam it drops, a fork
  that must still find its parent's partial block). Only with ``n == 1``. Aborting a gated request
  frees it as any other; while every request left waits for its release the engine's steps are
  empty (``held_by_gates``: AsyncEngine then sleeps until a command comes).
"""

from __future__ import annotations

import time

from jaxllm.core.request import Request, RequestStatus
from jaxllm.engine.bad_words import tokenize_bad_words
from jaxllm.engine.intake import (_NO_TEXT, SEED_MOD, cache_salt_of, check_priority, derive_seed, resolve_prompt,
                                  validate_prompt_ids)
from jaxllm.engine.output_processor import ParentState, SeqState
from jaxllm.config import POOLING_TASKS
from jaxllm.pooling_params import PoolingParams
from jaxllm.sampling_params import SamplingParams


class AddRequestsMixin:
    """LLMEngine's intake (the engine's state: its tokenizer, scheduler, kv, runner, _parents/_seqs/_embeds)."""

    def release_step(self, request_id: str) -> bool:
        """Let the step-gated request ``request_id`` compute one more token than it has produced
        (its driver has consumed its last one). False (a no-op) when it is unknown, finished or
        not gated: a driver racing an abort or a finish needs no check."""
        req = self.scheduler.requests.get(request_id)
        if req is None or req.gate is None:
            return False
        req.gate = max(req.gate, req.num_output_tokens + 1)
        return True

    def _resolve_prompt(self, prompt) -> tuple[str | None, list[int]]:
        return resolve_prompt(prompt, self.tokenizer)

    def _validate_ids(self, ids: list[int]) -> None:
        validate_prompt_ids(ids, self.vocab_size, self.max_model_len)

    def _check_new_id(self, request_id: str) -> None:
        if request_id in self._parents or request_id in self._seqs or request_id in self._embeds:
            raise ValueError(f"request_id={request_id!r} is invalid: a request with this id is "
                             f"still unfinished")

    def add_request(self, request_id: str, prompt, params: SamplingParams | PoolingParams | None = None,
                    arrival_time: float | None = None, lora_request=None, priority: int = 0,
                    fork_of: str | None = None, step_gate: bool = False) -> None:
        """``fork_of`` (beam search): the id of a running request whose computed tokens this prompt
        extends by one token; the new request then shares its KV blocks (the partial last one
        copied on the device) instead of prefilling them (KVCacheManager.pin_fork). A hint: when
        it does not apply (tokens differ, no runner support, source gone) the prompt is prefilled
        as usual, with prefix caching."""
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id={request_id!r} is invalid: must be a non-empty str")
        self._check_awake(f"request_id={request_id!r}")  # EngineSleepingError while asleep (sleep_requests.py)
        check_priority(priority, self.scheduler.priority)
        if fork_of is not None and not isinstance(fork_of, str):
            raise ValueError(f"fork_of={fork_of!r} is invalid: must be None or a request id (str)")
        if not isinstance(step_gate, bool):
            raise ValueError(f"step_gate={step_gate!r} is invalid: must be a bool")
        if params is None:
            params = PoolingParams() if self.task in POOLING_TASKS else SamplingParams()
        self._check_lora_request(lora_request, params)
        if isinstance(params, PoolingParams):
            if lora_request is not None:
                raise ValueError(f"lora_request={lora_request.lora_name!r} is invalid for an embedding "
                                 f"request: adapters serve generation only")
            if self.task not in POOLING_TASKS:
                raise ValueError(f"task={self.task!r} is invalid for PoolingParams (an embedding request): "
                                 f"this engine generates; start one with task='embed' or 'classify'")
            return self._add_embed_request(request_id, prompt, params, arrival_time, priority)
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params of type {type(params).__name__} is invalid: "
                             f"must be a SamplingParams or a PoolingParams")
        if self.task != "generate":
            raise ValueError(f"task={self.task!r} is invalid for SamplingParams (a generation request): "
                             f"this engine {'classifies' if self.task == 'classify' else 'embeds'}; start one "
                             f"with task='generate'")
        params.validate(self.vocab_size)
        if step_gate and params.n != 1:
            raise ValueError(f"n={params.n} is invalid with step_gate=True: a gated request is one sequence (n=1)")
        if params.prompt_logprobs is not None and not getattr(self.runner, "supports_prompt_logprobs", False):
            raise ValueError(f"prompt_logprobs={params.prompt_logprobs} is invalid: this engine's model runner "
                             f"cannot compute prompt logprobs (multi-host runs); leave it None")
        text, ids = self._resolve_prompt(prompt)
        salt = cache_salt_of(prompt)
        if params.truncate_prompt_tokens is not None:
            ids = ids[-params.truncate_prompt_tokens:]  # the last k (the length checks see what is kept)
        self._validate_ids(ids)
        grammar_key = None
        if params.structured_outputs is not None:
            grammar_key = self.grammar_compiler().check(params.structured_outputs)
        bad_words = tokenize_bad_words(params.bad_words, self.tokenizer, self.vocab_size) if params.bad_words else ()
        child_ids = [request_id] if params.n == 1 else [f"{request_id}#{i}" for i in range(params.n)]
        for rid in {request_id, *child_ids}:
            self._check_new_id(rid)
        self._acquire_lora(request_id, lora_request)  # pins the adapter (its load runs off-thread): the last check
        # -- everything valid: nothing below raises on user input --
        # prefix-cache namespace: the adapter's, and the prompt's cache_salt (salted blocks match only that salt)
        extra_key = None if lora_request is None else self.lora.cache_key(lora_request.lora_int_id)
        if salt is not None:
            extra_key = ("cache_salt", salt, extra_key)
        now = time.time()
        arrival = now if arrival_time is None else arrival_time
        base_seed = (params.seed % SEED_MOD) if params.seed is not None \
            else self._rng.getrandbits(63)
        max_out = min(params.max_tokens, self.max_model_len - len(ids))
        token_text = self._token_texts if params.detokenize else None
        parent = ParentState(request_id, text, ids, arrival, params.prompt_logprobs is not None, token_text)
        parent.in_stats = self._in_stats(request_id)
        for i, cid in enumerate(child_ids):
            req = Request(cid, ids, params, seed=derive_seed(base_seed, i), arrival_time=arrival,
                          max_output_tokens=max_out, lora_request=lora_request, priority=priority,
                          bad_words=bad_words,
                          extra_key=extra_key,
                          grammar=None if grammar_key is None else self.grammar.new_state(
                              grammar_key, params.structured_outputs.reasoning_end))
            detok = (self.detokenizer_factory(self.tokenizer, ids, params.skip_special_tokens)
                     if params.detokenize else _NO_TEXT)
            seq = SeqState(req, i, detok, token_text)
            parent.children.append(seq)
            self._seqs[cid] = (parent, seq)
            if step_gate:
                req.gate = 1  # the first token (the prefill's); release_step allows each next one
            self.scheduler.add_request(req)
            if fork_of is not None and params.n == 1 and getattr(self.runner, "supports_block_copy", False):
                source = self.scheduler.requests.get(fork_of)
                if source is not None and source.status == RequestStatus.RUNNING:
                    self.kv.pin_fork(req, source)
        self._parents[request_id] = parent
        self.num_prompt_tokens += len(ids) if parent.in_stats else 0  # not health probes' (exclude_from_stats)
