"""The scheduler: one scheduling model, vLLM V1 style (host only, no jax).

Every request carries ``num_computed_tokens``. Each ``schedule()`` hands out
``{request_id: num_new_tokens}`` under ``max_num_batched_tokens`` (tokens per step) and
``max_num_seqs`` (running requests):

1. running requests first, in arrival order: a decode step (1 token) or the next chunk of a
   prefill; when blocks run out, the latest-arrived running request not yet scheduled this
   step is preempted (blocks freed, ``num_computed_tokens = 0``, back to the FRONT of the
   waiting queue; it is recomputed later from prompt + outputs so far);
2. then, if nothing was preempted, waiting requests FCFS (no skipping, except that a request whose
   grammar is still compiling keeps its place and lets later ones by); on first scheduling a
   prefix-cache hit sets ``num_computed_tokens``; a prompt longer than the remaining budget is
   chunked.
   Multi-LoRA (``config.max_loras``): at most that many distinct adapters among running requests
   (the base model does not count), so every step's seqs fit the device slots. An adapter request
   that would exceed it keeps its place and waits; so do all later adapter requests (adapter
   requests are admitted in arrival order: the adapters running now drain, a slot frees, it goes
   first, nobody starves), while later base-model requests, which take no slot, may pass it.
   A request whose adapter is still loading (``loading_loras``: its lora_int_id is there until the
   engine takes the finished load) keeps its place in that order and *reserves* a slot: later
   base requests and requests for resident adapters run meanwhile, and so do later adapters while
   slots stay free beside the reserved ones; an adapter that would need the reserved slot waits (as
   behind a request waiting for a slot). Once loaded it is admitted from its place; when no slot is
   left to reserve it waits like any adapter request without a slot.

``schedule()`` advances ``num_computed_tokens`` by what it hands out (the KV of those tokens is
written by the step before any later step runs) and counts one ``num_output_placeholders`` per
sampling request; ``update_from_output`` appends the sampled tokens and clears the placeholders.
The engine decides stops and calls ``finish_requests``. Requests never exceed ``max_model_len``:
the engine finishes a request whose length reaches it (finish_reason "length").

Embedding requests (``req.pooling``) are prefill only: chunked under the same budget, never
sampled, skipped once their whole prompt is scheduled (the engine finishes them when that step's
hidden states are back), prompts up to max_model_len tokens (no room for an output needed).

Async scheduling (the engine schedules step N+1 before step N's tokens are read back): a running
request with a placeholder gets a one-token decode whose token is that placeholder
(``ScheduledSeq.placeholder``; the runner feeds the sampled id on device), unless the placeholder
already ends it (max tokens / max_model_len) or the next step's mask needs it on the host before
the step goes out (a bad word of 2+ tokens: ``Request.bans_need_last_token``; a grammar unless
``late_grammar_mask``: the engine then writes its mask after the forward pass). A request preempted while its token is in flight
keeps that token when it arrives and is not re-admitted before; one finished or aborted while a
step is in flight gets nothing from that step (its slot is wasted, its blocks are already free).

Step gates (``Request.gate``, a beam search's driver holding its requests in lockstep with its
decisions): a gated request whose allowed output tokens are all produced or in flight is not
scheduled (running: skipped, it keeps its blocks; waiting after a preemption: it keeps its place);
``LLMEngine.release_step`` allows one more. A scheduling condition like a compiling grammar, not a
second scheduler: preemption, aborts and finishing treat gated requests like any other. One
exception to "a waiting request never preempts": when a step would schedule nothing and the
waiting request at the head lacks blocks or a running slot (``max_num_seqs``), the latest held
running request is preempted (held requests would otherwise keep the KV or the slots a driver's
lagging beams need: a deadlock, e.g. ``beam_width > max_num_seqs``).

Speculative decoding (synchronous steps only; vLLM's ``spec_token_ids``): a running request may
carry ``spec_token_ids`` (drafts, e.g. from jaxllm.core.ngram_proposer). When its chunk ends its
known tokens, as many drafts as the budget, max_output_tokens and max_model_len allow ride behind
it (``ScheduledSeq.num_draft_tokens``): they take budget and KV slots like any token, and
``num_computed_tokens`` counts them until ``update_from_output`` learns how many the target model
accepted and rolls the rest back. Requests with a grammar or a multi-token
bad word (``needs_last_token``), embeddings and placeholders get none.

Priority scheduling (``config.policy == "priority"``, vLLM's ``--scheduling-policy priority``):
every order above that says "arrival" is ``(req.priority, arrival_seq)`` instead (lower value
first, ties by arrival): running requests are walked in that order, waiting requests are kept
and admitted in it (a preempted one goes back to its place in it, not to the front), and the
request preempted when blocks run out is the running one with the largest key (lowest priority,
latest arrival), which is never one already scheduled this step: the walk reaches it last (vLLM
walks running requests in admission order and unschedules a victim it already scheduled; the
victim is the same, only which requests get a tight step's budget first differs). As in
vLLM v1, a *waiting* request never preempts: when the pool cannot hold its prompt it waits (and
everything behind it) until a running request finishes or is preempted by a running request's
need; the freed blocks then go to the waiting requests in priority order. Under "fcfs" every
priority is 0 (``add_request`` refuses another value) and the order is arrival.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from collections.abc import Callable, Container, Iterable, Mapping, Sequence

from jaxllm.config import SchedulerConfig
from jaxllm.core.kv_cache_manager import KVCacheManager
from jaxllm.core.request import Request, RequestStatus
from jaxllm.core.scheduler_output import PLACEHOLDER_TOKEN_ID, ScheduledSeq, SchedulerOutput


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache_manager: KVCacheManager) -> None:
        self.config = config.validate()
        self.kv = kv_cache_manager
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # sorted by self._order (arrival_seq under fcfs)
        self._to_forget: list[str] = []  # finished / preempted since the last schedule()
        self.num_preemptions = 0
        self._next_seq = 0
        # lora_int_ids whose adapter is still loading (the engine sets the LoRAManager's ``loading``)
        self.loading_loras: Container[int] = frozenset()
        # async scheduling: a request with a grammar may run on its token in flight (the engine writes
        # its mask after the forward pass: SchedulerOutput.late_bitmask); False: it waits for the token
        self.late_grammar_mask = False
        # the order of running and waiting requests (and, reversed, of preemption victims)
        self.priority = self.config.policy == "priority"
        self._order: Callable[[Request], object] = (
            (lambda r: (r.priority, r.arrival_seq)) if self.priority else (lambda r: r.arrival_seq))

    def holds(self, req: Request) -> bool:
        """``req`` is still the scheduler's request of its id: not finished or aborted since it was
        scheduled (a finished id may be reused by a new request while its last step is in flight)."""
        return self.requests.get(req.request_id) is req

    # ----- intake ---------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request_id={req.request_id!r} is invalid: already in the scheduler")
        if req.num_tokens >= self.config.max_model_len + (req.pooling is not None):
            raise ValueError(f"prompt length={req.num_tokens} is invalid: must be "
                             f"{'<=' if req.pooling is not None else '<'} "
                             f"max_model_len={self.config.max_model_len}")
        if req.priority != 0 and not self.priority:
            raise ValueError(f"priority={req.priority!r} is invalid: scheduling_policy='fcfs' takes "
                             f"priority 0 only (start the engine with --scheduling-policy priority)")
        req.arrival_seq = self._next_seq
        self._next_seq += 1
        req.status = RequestStatus.WAITING
        self.requests[req.request_id] = req
        if self.priority:
            bisect.insort(self.waiting, req, key=self._order)
        else:
            self.waiting.append(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ----- one step -------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        max_len = self.config.max_model_len
        scheduled: list[tuple[Request, int]] = []
        admitted: set[str] = set()
        num_drafts: dict[str, int] = {}  # speculative decoding: drafts scheduled per running request
        preempted = False

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.pooling is not None and req.num_computed_tokens >= req.num_tokens:
                i += 1  # an embedding whose last chunk is in flight: the engine finishes it
                continue
            if req.gate_closed:
                i += 1  # step-gated: its driver has not released the next token yet
                continue
            ph = req.num_output_placeholders
            if ph and (req.num_output_tokens + ph >= req.max_output_tokens
                       or req.num_tokens + ph >= max_len or req.bans_need_last_token
                       or (req.grammar is not None and not self.late_grammar_mask)):
                i += 1  # its token in flight ends it, or (bad words, a grammar) must be known to mask the next
                continue
            n = self._chunk_cap(min(req.num_tokens + ph - req.num_computed_tokens, budget,
                                    max_len - req.num_computed_tokens))
            assert n > 0, (req.request_id, req.num_tokens, req.num_computed_tokens)
            drafts = self._fit_drafts(req, n, budget) if req.spec_token_ids else 0
            num_drafts[req.request_id] = drafts
            n += drafts
            while self.kv.allocate_slots(req, n) is None:
                victim = self.running.pop()  # latest (priority, arrival); never one scheduled this step
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            else:
                scheduled.append((req, n))
                budget -= n
                i += 1
                continue
            break  # the current request preempted itself

        now = time.time()
        copies: list[tuple[int, int]] = []  # forks admitted now: (source block, their own copy)
        if not preempted:
            skipped = []  # waiting for their grammar, adapter load or adapter slot: they keep their place
            max_loras = self.config.max_loras
            resident = self.resident_loras() if max_loras is not None else set()
            lora_blocked = False  # an adapter request waits for a slot: later adapter requests wait too
            reserved: set[int] = set()  # adapters still loading for requests ahead: their slots are kept
            while self.waiting and budget > 0:
                req = self.waiting[0]
                if req.waits_for_grammar or req.gate_closed:  # (a gated one: preempted, not yet released)
                    skipped.append(self.waiting.popleft())
                    continue
                lid = req.lora_int_id if max_loras is not None else None
                if lid is not None and (lora_blocked or (lid not in resident and lid not in reserved
                                                         and len(resident) + len(reserved) >= max_loras)):
                    lora_blocked = True
                    skipped.append(self.waiting.popleft())
                    continue
                if lid is not None and lid in self.loading_loras:  # never resident: it ran nobody yet
                    reserved.add(lid)
                    skipped.append(self.waiting.popleft())
                    continue
                if req.num_output_placeholders:
                    break  # preempted while its token is in flight: resume once that token is known
                if len(self.running) >= self.config.max_num_seqs:
                    if scheduled or not self._preempt_held():
                        break  # slots full: it waits (held beams only give theirs up when nothing runs)
                    continue  # a held request's slot is free now
                cached_blocks, num_cached = self.kv.get_computed_blocks(req)
                n = self._chunk_cap(min(req.num_tokens - num_cached, budget))
                num_hit = self.kv.num_hit_tokens(cached_blocks)  # the rest (a fork's partial block) is copied
                if self.kv.allocate_slots(req, n, cached_blocks, num_cached - num_hit) is None:
                    if scheduled or not self._preempt_held():
                        break
                    continue  # a held request's blocks are free now: try again
                self.waiting.popleft()
                if self.kv.enable_caching and req.pooling is None:  # embeddings bypass the cache
                    self.kv.record_prefix_lookup(req.num_tokens, num_hit)
                req.num_computed_tokens = num_cached
                copies.extend(self.kv.take_fork_copies(req))
                if req.num_cached_tokens < 0:
                    req.num_cached_tokens = num_cached
                if req.first_scheduled_time is None:
                    req.first_scheduled_time = now
                req.status = RequestStatus.RUNNING
                bisect.insort(self.running, req, key=self._order)
                admitted.add(req.request_id)
                scheduled.append((req, n))
                budget -= n
                if lid is not None:
                    resident.add(lid)
            self.waiting.extendleft(reversed(skipped))

        seqs = []
        for req, n in scheduled:
            start = req.num_computed_tokens
            placeholder = start == req.num_tokens  # the one token to feed is still on the device
            assert not placeholder or (n == 1 and req.num_output_placeholders == 1), (req.request_id, n)
            d = num_drafts.get(req.request_id, 0)
            drafts, req.spec_token_ids = req.spec_token_ids[:d], []
            n -= d  # the known tokens of the chunk
            # embedding requests never sample: the engine pools their hidden states instead
            sample = req.pooling is None and start + n == req.num_tokens + req.num_output_placeholders
            seqs.append(ScheduledSeq(
                request_id=req.request_id,
                token_ids=([PLACEHOLDER_TOKEN_ID] if placeholder
                           else req.all_token_ids[start:start + n] + drafts),
                start_pos=start,
                block_ids=group_ids[0] if (group_ids := self.kv.group_block_tables(req.request_id)) is not None
                else self.kv.block_table(req.request_id),
                group_block_ids=group_ids,
                sample=sample,
                num_prompt_tokens=req.num_prompt_tokens,
                params=req.params,
                seed=req.seed,
                prefix_token_ids=req.all_token_ids[:start] if req.request_id in admitted else None,
                next_token_id=req.all_token_ids[start + n] if start + n < req.num_tokens else None,
                placeholder=placeholder,
                num_draft_tokens=d,
            ))
            # the step computes them (drafts too) before any later step runs; update_from_output
            # rolls the rejected drafts back
            req.num_computed_tokens = start + n + d
            if sample:
                req.num_output_placeholders += 1
        forget, self._to_forget = self._to_forget, []
        self.kv.release_pins()  # after every allocation of this step: a source block is reused later at the earliest
        return SchedulerOutput(seqs=seqs,
                               num_batched_tokens=self.config.max_num_batched_tokens - budget,
                               finished_or_preempted_ids=forget,
                               requests=[req for req, _ in scheduled], block_copies=copies)

    def _chunk_cap(self, n: int) -> int:
        """`n` tokens of a request's step, capped at long_prefill_token_threshold (vLLM's per-request chunk cap; 0 = none)."""
        cap = self.config.long_prefill_token_threshold
        return min(n, cap) if cap > 0 else n

    def _fit_drafts(self, req: Request, n: int, budget: int) -> int:
        """How many of ``req.spec_token_ids`` go behind its ``n`` known tokens this step: only when
        those end its known tokens (a decode, or a prefill's last chunk; never on a placeholder), at
        most what the token budget leaves, and never so many that the tokens the step may
        produce (drafts + 1) pass max_output_tokens or max_model_len."""
        if (req.num_output_placeholders or req.needs_last_token or req.pooling is not None
                or req.num_computed_tokens + n != req.num_tokens):
            return 0
        return max(0, min(len(req.spec_token_ids), budget - n,
                          req.max_output_tokens - req.num_output_tokens - 1,
                          self.config.max_model_len - req.num_tokens - 1))

    def _preempt_held(self) -> bool:
        """Nothing else runs this step and a waiting request lacks blocks or a slot: preempt the latest running
        request held by its step gate (it makes no progress until released; its driver may be
        waiting for the waiting one). False when none is held."""
        for victim in reversed(self.running):
            if victim.gate_closed:
                self.running.remove(victim)
                self._preempt(victim)
                return True
        return False

    def num_gate_closed(self) -> int:
        """Requests held by their step gate (jaxllm/core/request.py ``gate``)."""
        return sum(r.gate_closed for r in self.requests.values())

    def resident_loras(self) -> set[int]:
        """The adapters of running requests (each keeps its device slot while it runs)."""
        return {r.lora_int_id for r in self.running if r.lora_request is not None}

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.spec_token_ids = []
        req.num_preemptions += 1
        self.num_preemptions += 1
        if self.priority:  # back to its place in (priority, arrival) order
            bisect.insort(self.waiting, req, key=self._order)
        else:
            self.waiting.appendleft(req)
        self._to_forget.append(req.request_id)

    def update_from_output(self, out: SchedulerOutput, sampled: Mapping[str, int | Sequence[int]],
                           on_token: Callable[[Request, int], bool] | None = None,
                           ) -> list[tuple[Request, int]]:
        """Append each sampled token of step ``out`` (``schedule()`` already counted what it
        computed). A request finished or aborted since ``out`` was scheduled gets nothing (the
        token is discarded); one preempted since keeps its token. Returns ``(request, token_id)``
        for every token appended, in order.

        Speculative decoding: a seq scheduled with drafts gets a sequence of 1..drafts + 1 tokens
        (the accepted drafts, then the target's own token); ``num_computed_tokens`` drops by the
        rejected drafts (their KV is overwritten by a later step; the prefix cache only registers
        blocks of known tokens, so it never holds them). ``on_token(req, tok)`` is called after
        each appended token; True means the request ends there (a stop): its later tokens are
        dropped, never appended."""
        new_tokens = []
        for seq, req in zip(out.seqs, out.requests):
            if not seq.sample or not self.holds(req):
                continue
            if seq.request_id not in sampled:
                raise RuntimeError(f"runner returned no token for request_id="
                                   f"{seq.request_id!r} (scheduled with sample=True)")
            assert req.num_output_placeholders > 0, req.request_id
            req.num_output_placeholders -= 1
            toks = sampled[seq.request_id]
            toks = [toks] if isinstance(toks, int) else list(toks)
            if not 1 <= len(toks) <= seq.num_draft_tokens + 1:
                raise RuntimeError(f"runner returned {len(toks)} tokens for request_id={seq.request_id!r}: "
                                   f"must be 1..{seq.num_draft_tokens + 1} (num_draft_tokens + 1)")
            if req.status == RequestStatus.RUNNING:  # preempted since: already reset to 0
                req.num_computed_tokens -= seq.num_draft_tokens + 1 - len(toks)
            for tok in toks:
                req.append_output_token(tok)
                new_tokens.append((req, tok))
                if on_token is not None and on_token(req, tok):
                    break
        return new_tokens

    def finish_requests(self, request_ids: str | Iterable[str],
                        status: RequestStatus) -> list[Request]:
        """Finish (or abort) requests: free their blocks, drop them. Unknown ids are a no-op."""
        assert status.finished, status
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        done = []
        for rid in request_ids:
            req = self.requests.pop(rid, None)
            if req is None:
                continue
            if req.status == RequestStatus.RUNNING:
                self.running.remove(req)
            else:
                self.waiting.remove(req)
            self.kv.free(req)
            self.kv.forget(rid)
            req.status = status
            self._to_forget.append(rid)
            done.append(req)
        return done

    def take_forgotten(self) -> list[str]:
        """Ids to forget that no schedule() has reported yet (the engine releases them when idle)."""
        forget, self._to_forget = self._to_forget, []
        return forget
