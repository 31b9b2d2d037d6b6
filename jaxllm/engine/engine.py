"""LLMEngine: add_request / abort_request / step over the host scheduler and a model runner.

``step() = schedule -> runner.dispatch -> result -> scheduler.update_from_output -> detokenize
-> stop checks -> outputs``. The engine imports no jax: the runner (``ModelRunnerProtocol``) and
the tokenizer are injected; ``jaxllm.engine.factory.build_engine(config)`` builds the real ones.

Async scheduling (``config.async_scheduling``, with a runner that has ``dispatch``): one step
stays in flight between ``step()`` calls. ``step()`` schedules and dispatches step N+1 (decodes
whose token step N sampled feed it on the device: ``ScheduledSeq.placeholder``), then reads
step N back and processes it while N+1 runs; it returns step N's outputs. Results equal the
synchronous engine's; a request that stops, is aborted or preempted while a step is in flight
loses only that step's slot (its token there is discarded). When no request is left unfinished
nothing stays in flight (the engine reads the last step back and drops it).

Speculative decoding (``config.speculative_config``, engine/spec_requests.py): n-gram drafts
proposed after each step ride in the next one; the engine then runs synchronously.

Structured outputs (``params.structured_outputs``): ``add_request`` checks the spec (ValueError naming
the field) and gives each sequence a ``GrammarState`` whose matcher compiles on a thread pool
(``jaxllm/engine/grammar.py``); the scheduler leaves it waiting until then. After each schedule the
engine writes the sampling seqs' allowed-token bitmask into the SchedulerOutput; each sampled token
advances the matcher. With async scheduling a constrained request runs on its token still in flight
like any other (with a runner that has ``supports_late_bitmask``): its mask needs that token, so the
step goes out with ``late_bitmask``: the runner launches its forward pass at once, and ``step()``
hands the masks to ``PendingStep.set_bitmask`` after reading the step before back and advancing the
grammars, while the device computes that forward pass. (A runner without it: a constrained request is
never scheduled on a token in flight and runs every other step.)

Input rules: ``add_request`` (jaxllm/engine/add_requests.py) validates everything before anything is
scheduled and raises ``ValueError`` naming the field, the value and the limit.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable

from jaxllm.config import POOLING_TASKS, EngineConfig
from jaxllm.core.hybrid_kv_cache_manager import HybridKVCacheManager
from jaxllm.core.kv_cache_manager import KVCacheManager, cdiv
from jaxllm.core.request import RequestStatus
from jaxllm.core.scheduler import Scheduler
from jaxllm.engine.output_processor import DetokenizerFactory, ParentState, SeqState, TokenTexts
from jaxllm.engine.pooling import EmbedState
from jaxllm.engine.runner_protocol import ModelRunnerProtocol
from jaxllm.engine.add_requests import AddRequestsMixin
from jaxllm.engine.bad_words import attach_bans
from jaxllm.engine.embed_requests import EmbedRequestsMixin
from jaxllm.engine.engine_stats import EngineStatsMixin
from jaxllm.engine.grammar_requests import GrammarRequestsMixin
from jaxllm.engine.lora_requests import LoRARequestsMixin
from jaxllm.engine.sleep_requests import SleepMixin
from jaxllm.engine.spec_requests import SpecDecodeMixin, split_sampled
from jaxllm.engine.weight_requests import WeightUpdateMixin
from jaxllm.generation_config import NONE as NO_GENERATION_DEFAULTS, GenerationDefaults
from jaxllm.sampling_params import RequestOutputKind
from jaxllm.models.arch_config import long_prompt_threshold
from jaxllm.metrics.stats import IterationStats
from jaxllm.outputs import RequestOutput


class LLMEngine(AddRequestsMixin, EmbedRequestsMixin, EngineStatsMixin, GrammarRequestsMixin, LoRARequestsMixin,
                SleepMixin, SpecDecodeMixin, WeightUpdateMixin):
    def __init__(self, config: EngineConfig, runner: ModelRunnerProtocol, tokenizer,
                 detokenizer_factory: DetokenizerFactory | None = None, grammar_tokenizer=None,
                 lora_load_fn=None, generation_defaults: GenerationDefaults | None = None) -> None:
        self.config = config.validate()
        if config.max_model_len is None:
            raise ValueError("max_model_len=None is invalid for LLMEngine: resolve it from the "
                             "model config first (the factory does)")
        num_blocks = runner.num_blocks
        self.kv_groups = getattr(runner, "kv_groups", None)  # KV cache groups (jaxllm/core/kv_cache_groups.py)
        # the hybrid manager's rules: several groups, or one sliding group (an all-sliding model, Mistral v0.1)
        hybrid = self.kv_groups is not None and self.kv_groups.managed
        if hybrid and num_blocks < (need := self.blocks_per_request()):
            raise ValueError(
                f"num_blocks={num_blocks} is invalid: a request of max_model_len={config.max_model_len} tokens "
                f"needs {need} blocks over the KV cache groups ({self.kv_groups.describe()}; block_size="
                f"{config.block_size}, chunks of max_num_batched_tokens={config.max_num_batched_tokens}); lower "
                f"max_model_len or give the cache more memory")
        if not hybrid and num_blocks * config.block_size < config.max_model_len:
            raise ValueError(
                f"num_blocks={num_blocks} is invalid: the KV cache holds {num_blocks} x "
                f"block_size={config.block_size} = {num_blocks * config.block_size} tokens, less "
                f"than max_model_len={config.max_model_len}; lower max_model_len or give the "
                f"cache more memory (need >= {cdiv(config.max_model_len, config.block_size)} blocks)")
        task = config.task if config.task != "auto" else getattr(runner, "task", "generate")
        if getattr(runner, "task", "generate") != task:
            raise ValueError(f"task={task!r} is invalid for this model runner, built for "
                             f"task={getattr(runner, 'task', 'generate')!r}")
        self.task = task
        self.pooling_defaults = (config.pooling_type or "LAST",
                                 True if config.normalize is None else config.normalize)
        self.runner = runner
        self.tokenizer = tokenizer
        self.vocab_size = runner.vocab_size
        self.max_model_len = config.max_model_len
        self.eos_token_ids = set(getattr(tokenizer, "eos_token_ids", ()) or ())
        # the model's generation_config.json: requests' default sampling values (the factory also put its
        # eos ids into the tokenizer's, read above); LLM.get_default_sampling_params and the servers use them
        self.generation_defaults = generation_defaults or NO_GENERATION_DEFAULTS
        if detokenizer_factory is None:
            from jaxllm.tokenizer import IncrementalDetokenizer  # the lead's; lazy on purpose
            detokenizer_factory = IncrementalDetokenizer
        self.detokenizer_factory = detokenizer_factory
        # Logprob.decoded_token (None for tokenizer-less models, like detokenize=False)
        self._token_texts = TokenTexts(tokenizer) if getattr(tokenizer, "has_text", True) else None
        # longrope: prompts past the original length write other KV; their blocks hash apart
        threshold = long_prompt_threshold(getattr(runner, "model_config", None), config.max_model_len)
        if hybrid:  # one block table per group; sliding groups free the blocks that fell out of the window
            self.kv = HybridKVCacheManager(num_blocks, config.block_size, self.kv_groups,
                                           config.enable_prefix_caching, threshold)
        else:
            self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching, threshold)
        self.scheduler = Scheduler(config.scheduler_config(), self.kv)
        self._rng = random.Random(config.seed)
        self._parents: dict[str, ParentState] = {}
        self._seqs: dict[str, tuple[ParentState, SeqState]] = {}  # child id -> states
        self._embeds: dict[str, EmbedState] = {}  # embedding requests (task "embed")
        on = config.async_scheduling
        if on is None:  # auto: the runner knows whether a separate device runs its steps
            on = getattr(runner, "async_by_default", True)
        self.async_scheduling = bool(on) and hasattr(runner, "dispatch")
        self._init_speculative(config, runner)  # n-gram drafts: synchronous steps only (spec_requests.py)
        # a constrained request may run on its token in flight: its mask follows the forward pass
        self.scheduler.late_grammar_mask = self.async_scheduling and getattr(runner, "supports_late_bitmask", False)
        self._in_flight: tuple | None = None  # (SchedulerOutput, PendingStep) not read back yet
        self.held_by_gates = False  # the last step was empty: every request left waits for release_step
        self._request_errors: dict[str, Exception] = {}  # failed by their host-side processing
        # structured outputs: () -> llguidance tokenizer (default: from the model's HF tokenizer);
        # the compiler (thread pool, cache) is made on the first constrained request
        self._grammar_tokenizer = grammar_tokenizer
        self.grammar = None
        self.num_steps = 0
        self.num_generated_tokens = 0
        self.num_prompt_tokens = 0
        self.startup_seconds: float | None = None  # load + warm-up, set by build_engine
        # stats: loggers get (SchedulerStats, IterationStats) after every step; none = no cost
        self.stat_loggers: list = []
        self.compiles_at_warmup = getattr(runner, "compile_count", 0)  # build_engine sets it after warm-up
        self._stats_base = (0, 0, 0)  # prefix queries, prefix hits, preemptions already reported
        self._stats_excluded: tuple[str, ...] = ()  # request-id prefixes left out (exclude_from_stats)
        # multi-LoRA (enable_lora): lora_load_fn(LoRARequest) -> adapter; jaxllm/engine/lora_requests.py
        self._init_lora(config, runner, lora_load_fn)
        self._init_sleep()  # sleep mode (jaxllm/engine/sleep_requests.py)

    def abort_request(self, request_ids: str | Iterable[str]) -> list[RequestOutput]:
        """Abort requests (parent ids). Unknown or finished ids are a no-op. Frees their blocks
        at once; returns their final outputs (finish_reason "abort"; none for an embedding)."""
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        outs = []
        it = IterationStats() if self.stat_loggers else None
        recorded = False
        for rid in request_ids:
            if rid in self._embeds:
                self._abort_embedding(rid, it)
                recorded = True
                continue
            parent = self._parents.pop(rid, None)
            if parent is None:
                continue
            self._release_lora(rid)
            live = [c.req.request_id for c in parent.children if not c.finished]
            if it is not None and parent.in_stats:
                now = time.time()
                for c in parent.children:
                    if not c.finished:
                        it.add_finished(c, "abort", parent.metrics.arrival_time, now)
                        recorded = True
            for c in parent.children:
                c.abort()
                self._seqs.pop(c.req.request_id, None)
            self.scheduler.finish_requests(live, RequestStatus.FINISHED_ABORTED)
            outs.append(parent.output())
        self._release_if_idle()
        if recorded:
            self._record_stats(it)
        return outs

    def close(self) -> None:
        """Stop the engine's host worker threads without waiting for them (AsyncEngine calls it when
        its loop ends; the servers stop that loop): the LoRA loader (queued loads cancelled, a load in
        flight dropped on its daemon thread) and the grammar compiler's (likewise: queued compiles
        cancelled, one in flight left to its daemon thread)."""
        if self.lora is not None:
            self.lora.close()
        if self.grammar is not None:
            self.grammar.close()

    # ----- the loop -----------------------------------------------------------------
    def has_unfinished_requests(self) -> bool:
        return bool(self._parents) or bool(self._embeds)

    def step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        self._poll_lora_loads()  # finished adapter loads: their requests may run (or fail) now
        if not self.async_scheduling:
            if not self.scheduler.has_unfinished_requests():
                self._release_if_idle()
                return []
            out = self._schedule(in_flight=False)
            return [] if out is None else self._process(out, self.runner.execute(out), t0)
        if self._in_flight is None:  # nothing running on the device: start a step
            if not self.scheduler.has_unfinished_requests():
                self._release_if_idle()
                return []
            out = self._schedule(in_flight=False)
            if out is None:
                return []
            self._in_flight = (out, self.runner.dispatch(out))
        prev, self._in_flight = self._in_flight, None
        late = None  # step N+1 if its sampling waits for grammar masks that need step N's tokens
        if self.scheduler.has_unfinished_requests():  # step N+1 goes out before step N is read
            out = self._schedule(in_flight=True)
            if out is not None:
                self._in_flight = (out, self.runner.dispatch(out))
                late = self._in_flight if out.late_bitmask else None
        try:
            return self._process(prev[0], prev[1].result(), t0)
        finally:  # step N's tokens have advanced the grammars: step N+1's sampling can go
            if late is not None:
                self._send_late_bitmask(*late)

    def _schedule(self, in_flight: bool):
        """The next step's SchedulerOutput. With a step in flight, a grammar compiling or an adapter
        loading, an empty one is normal (what is left waits for those): None then, after releasing
        the forgotten ids."""
        out = self.scheduler.schedule()
        self.held_by_gates = False
        if not out.seqs:
            compiling = [r for r in self.scheduler.waiting if r.waits_for_grammar]
            loading = self._lora_loading()
            gated = self.scheduler.num_gate_closed()  # step-gated requests waiting for release_step
            if in_flight or compiling or loading or gated:
                # nothing runs until a driver releases a gate (or aborts): AsyncEngine sleeps on its queue
                self.held_by_gates = not (in_flight or compiling or loading)
                if out.finished_or_preempted_ids:
                    self.runner.release(out.finished_or_preempted_ids)
                if not in_flight:  # nothing else to run: give the grammar / the load a moment
                    if compiling:
                        compiling[0].grammar.wait(0.05)
                    elif loading:
                        self.lora.wait(0.02)
                return None
            raise RuntimeError(f"scheduler produced an empty step with {self.scheduler.num_waiting} "
                               f"waiting / {self.scheduler.num_running} running requests and "
                               f"{self.kv.num_free_blocks} free blocks")
        if self.grammar is not None:
            self._attach_bitmask(out)
        attach_bans(out)
        self._assign_lora_slots(out)
        return out

    def _process(self, out, sampled, t0: float) -> list[RequestOutput]:
        """Step ``out``'s sampled tokens -> scheduler, detokenizer, stop checks, outputs (and the
        step's stats to the loggers when any is attached; ``t0``: when ``step()`` began)."""
        self.num_steps += 1
        it = IterationStats(num_batched_tokens=out.num_batched_tokens) if self.stat_loggers else None
        take = getattr(self.runner, "take_prompt_logprobs", None)
        if take is not None:
            scheduled = {r.request_id: r for r in out.requests}
            for rid, entries in take().items():  # only to the request that ran (ids can be reused)
                if rid in self._seqs and self._seqs[rid][1].req is scheduled.get(rid):
                    self._seqs[rid][0].add_prompt_logprobs(entries)
        now = time.time()
        outputs: list = self._finish_embeddings(out, now, it) if self.task in POOLING_TASKS else []
        touched: dict[str, ParentState] = {}
        finished: dict[RequestStatus, list[str]] = {}
        failed: dict[str, tuple[ParentState, Exception]] = {}
        token_ids, next_sampled = split_sampled(sampled)  # a speculative seq's list: one token at a time

        def on_token(req, tok: int) -> bool:
            """One appended token: grammar, detokenizer, stop checks, stats. True = the request ends
            here (a speculative step's later tokens are then dropped)."""
            st = next_sampled(req.request_id)
            if req.grammar is not None:
                req.grammar.accept(tok)
            parent, seq = self._seqs[req.request_id]
            if parent.request_id in failed:
                return True
            try:  # host-side per-request work (detokenizer, stop checks): a fault fails this request only
                status = seq.add_token(st, self.eos_token_ids, self.max_model_len)
            except Exception as exc:  # noqa: BLE001 - reported through take_request_errors()
                failed[parent.request_id] = (parent, exc)
                return True
            self.num_generated_tokens += 1 if parent.in_stats else 0
            parent.note_token(now)
            touched[parent.request_id] = parent
            pit = it if parent.in_stats else None
            if pit is not None:
                pit.add_token(seq, parent.metrics.arrival_time, now)
            if status is not None:
                finished.setdefault(status, []).append(req.request_id)
                if pit is not None:
                    pit.add_finished(seq, status.finish_reason, parent.metrics.arrival_time, now)
                return True
            return False

        self.scheduler.update_from_output(out, token_ids, on_token)
        self._count_accepted(out, token_ids, it)  # speculative decoding only (spec_requests.py)
        for status, ids in finished.items():
            self.scheduler.finish_requests(ids, status)
            for cid in ids:
                del self._seqs[cid]
        for rid, parent in touched.items():
            if rid in failed:
                continue
            fin = parent.finished
            try:
                if fin or parent.output_kind != RequestOutputKind.FINAL_ONLY:
                    outputs.append(parent.output(now))
            except Exception as exc:  # noqa: BLE001
                failed[rid] = (parent, exc)
                continue
            if fin:
                del self._parents[rid]
                self._release_lora(rid)
        for rid, (parent, exc) in failed.items():
            self._fail_request(parent, exc)
        self._propose_drafts()  # speculative decoding only: the next step's drafts
        self._release_if_idle()
        if it is not None:
            it.bucket = self._bucket_label(out)
            it.step_time = time.perf_counter() - t0
            self._record_stats(it)
        return outputs

    def _fail_request(self, parent: ParentState, exc: Exception) -> None:
        """Drop a request whose host-side processing raised: its blocks are freed as by an abort and
        the error waits in ``take_request_errors()`` (no output is returned for it)."""
        live = [c.req.request_id for c in parent.children if not c.finished]
        for c in parent.children:
            c.abort()
            self._seqs.pop(c.req.request_id, None)
        self.scheduler.finish_requests(live, RequestStatus.FINISHED_ABORTED)
        self._parents.pop(parent.request_id, None)
        self._release_lora(parent.request_id)
        self._request_errors[parent.request_id] = exc

    def take_request_errors(self) -> dict[str, Exception]:
        """{request_id: exception} of requests failed since the last call (each reported once)."""
        errors, self._request_errors = self._request_errors, {}
        return errors

    def _release_if_idle(self) -> None:
        if not self.scheduler.has_unfinished_requests():
            if self._in_flight is not None:  # every request it served is gone: read it back, drop it
                (_, pending), self._in_flight = self._in_flight, None
                pending.result()
                self.num_steps += 1
                for name in ("take_prompt_logprobs", "take_pooled"):
                    take = getattr(self.runner, name, None)
                    if take is not None:
                        take()
            ids = self.scheduler.take_forgotten()
            if ids:
                self.runner.release(ids)
