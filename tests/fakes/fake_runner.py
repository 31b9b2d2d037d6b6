"""A fake model runner that checks the block tables it is given (no jax).

It keeps a fake KV store: ``kv[slot] = (token_id, position)``. Each step it first writes every
scheduled token into the slot its block table names, then, for each seq, reads the WHOLE
context back from the slots and checks it against what the request should hold; the "model"
is a deterministic function of the context read back from the cache. So a wrong block table,
a block shared by mistake, a prefix-cache hit on stale KV or a resumed request fed the wrong
tokens all show up as an assertion error or as a different output.

``dispatch`` computes the step at once and returns a pending handle; the fake checks the
engine's side of the async contract: results are taken once each, in dispatch order, with at
most one step dispatched past an unread one, and a placeholder token is fed the very token this
request sampled in the previously dispatched step.

Multi-LoRA: ``set_lora(slot, adapter)`` fills a fake device slot (the slots in ``loras``, calls
recorded in ``lora_calls``). A seq's ``lora_slot`` names the adapter its tokens run with: the KV
written for it is tagged with that adapter's name (None = the base model) and every read checks
the tag, so a block shared across adapters (or a slot overwritten under a running request) fails;
the adapter name is mixed into the sampled token, so each adapter "generates" differently.

Prompt logprobs (``supports_prompt_logprobs``): for a seq asking ``prompt_logprobs=k``, each prompt
position p >= 1 computed in a step gets the prompt token's fake logprob at context ``ctx[:p]``
(the same formula ``_sample`` gives a sampled token there), a rank (1 when it is the token greedy
decoding would pick) and the k-token top list ``_sample`` would report; filed at ``result()``, as
the real runner files them, for ``take_prompt_logprobs``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from jaxllm.core.scheduler_output import PLACEHOLDER_TOKEN_ID, ScheduledSeq, SchedulerOutput
from jaxllm.engine.runner_protocol import SampledToken

M64 = (1 << 64) - 1


def _mix(*xs: int) -> int:
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h ^= x & M64
        h = (h * 0xBF58476D1CE4E5B9) & M64
        h ^= h >> 31
    return h


def context_hash(ctx: list[int]) -> int:
    h = 0
    for t in ctx:
        h = _mix(h, t)
    return h


FAKE_HIDDEN_SIZE = 4


def fake_hidden(ctx: list[int]) -> np.ndarray:
    """The fake "model"'s last_hidden_state at the last position of ``ctx``: [4] f32, a
    deterministic function of the whole context (what a causal model's hidden state is)."""
    h = context_hash(ctx)
    return np.array([((h >> (16 * i)) & 0xFFFF) / 65535.0 - 0.5 for i in range(FAKE_HIDDEN_SIZE)], np.float32)


class FakeRunner:
    hidden_size = FAKE_HIDDEN_SIZE  # the embedding size of task "embed"

    def __init__(self, num_blocks: int, block_size: int, vocab_size: int = 131,
                 eos_token_ids: set[int] = frozenset({1}),
                 next_token_fn: Callable[[list[int], ScheduledSeq], int] | None = None,
                 task: str = "generate") -> None:
        self.task = task  # "embed": pool fake_hidden over each chunk instead of sampling (take_pooled)
        self._pooled: dict = {}
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.eos_token_ids = set(eos_token_ids)
        self.next_token_fn = next_token_fn
        self.kv: dict[int, tuple[int, int]] = {}
        self.known: dict[str, list[int]] = {}  # request id -> tokens the runner has seen it compute
        self.steps: list[SchedulerOutput] = []
        self.released: list[str] = []
        self._prev_sampled: dict[str, int] = {}  # request id -> token sampled by the last dispatched step
        self._unread: list[FakePending] = []  # dispatched, result() not called yet (oldest first)
        # SchedulerOutput.late_bitmask: constrained seqs sampled when the engine hands the mask over
        self.supports_late_bitmask = True
        self._unsampled: FakePending | None = None
        self.num_late_steps = 0
        self.num_placeholders_fed = 0
        # speculative decoding: a seq with num_draft_tokens gets a list of SampledTokens (greedy
        # verification: the accepted drafts, then the model's own token)
        self.num_drafts_scheduled = 0
        self.num_drafts_accepted = 0
        self.loras: dict[int, object] = {}  # slot -> adapter (set_lora)
        self.lora_calls: list[tuple[int, object]] = []
        self.max_loras: int | None = None  # set it to check slot numbers against a bound
        self.supports_prompt_logprobs = True
        self.supports_block_copy = True  # SchedulerOutput.block_copies (forks) are applied before a step
        self.num_block_copies = 0
        self._prompt_lp_out: dict[str, dict[int, SampledToken]] = {}  # filed by FakePending.result()

    def set_lora(self, slot: int, adapter) -> None:
        assert isinstance(slot, int) and slot >= 1, slot
        assert self.max_loras is None or slot <= self.max_loras, (slot, self.max_loras)
        self.lora_calls.append((slot, adapter))
        if adapter is None:
            self.loras.pop(slot, None)
        else:
            self.loras[slot] = adapter

    def _adapter_key(self, s: ScheduledSeq):
        if s.lora_slot == 0:
            return None
        assert s.lora_slot in self.loras, f"{s.request_id}: lora_slot={s.lora_slot} is empty"
        return self.loras[s.lora_slot].name

    # ----- protocol -----------------------------------------------------------------
    def release(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.known.pop(rid, None)
            self.released.append(rid)

    def execute(self, out: SchedulerOutput) -> dict[str, SampledToken]:
        return self.dispatch(out).result()

    def dispatch(self, out: SchedulerOutput) -> FakePending:
        assert len(self._unread) <= 1, "a step dispatched with two unread steps before it"
        assert self._unsampled is None, "a step dispatched before the late-bitmask step before it was sampled"
        self._chunks: dict = {}
        self._prompt_lp: dict[str, dict[int, SampledToken]] = {}
        self._late: list = []  # late_bitmask: (index, seq, context, adapter) of the seqs sampled later
        pending = FakePending(self, self._run(out), self._chunks, self._prompt_lp, self._late)
        if self._late:
            self._unsampled = pending
            self.num_late_steps += 1
        self._unread.append(pending)
        return pending

    def _take(self, pending: FakePending) -> None:
        assert self._unread and self._unread[0] is pending, "results read out of dispatch order or twice"
        self._unread.pop(0)

    def _run(self, out: SchedulerOutput) -> dict[str, SampledToken]:
        self.steps.append(out)
        self.release(out.finished_or_preempted_ids)
        ids = [s.request_id for s in out.seqs]
        assert len(ids) == len(set(ids)), f"request scheduled twice in a step: {ids}"
        assert all(s.lora_slot == 0 or s.lora_slot in self.loras for s in out.seqs), "a seq ran on an empty LoRA slot"
        assert out.num_batched_tokens == sum(len(s.token_ids) for s in out.seqs)
        # forks: copy each source block's slots into its destination before any write (a wrong or
        # stale source shows up below as "stale cached KV" in the fork's first step)
        admitted = {b for s in out.seqs if s.prefix_token_ids is not None for b in s.block_ids}
        for src, dst in out.block_copies:
            assert src != dst and dst in admitted, (src, dst, "a copy into a block no admitted seq holds")
            for off in range(self.block_size):
                if (v := self.kv.get(src * self.block_size + off)) is not None:
                    self.kv[dst * self.block_size + off] = v
                else:
                    self.kv.pop(dst * self.block_size + off, None)
            self.num_block_copies += 1
        for s in out.seqs:
            # a forgotten id comes back only as a new request (its id reused) or a resumed one
            assert s.request_id not in out.finished_or_preempted_ids or s.prefix_token_ids is not None, s
            assert s.token_ids, s.request_id
            end = s.start_pos + len(s.token_ids)
            assert len(s.block_ids) >= -(-end // self.block_size), (s.request_id, end, s.block_ids)
            assert all(0 <= b < self.num_blocks for b in s.block_ids), s.block_ids
            assert len(set(s.block_ids)) == len(s.block_ids), f"duplicate block in table {s.block_ids}"
            if s.prefix_token_ids is not None:  # first step since (re)admission
                assert s.request_id not in self.known, f"{s.request_id}: readmitted, not forgotten"
                assert len(s.prefix_token_ids) == s.start_pos
            else:
                assert s.request_id in self.known, f"{s.request_id}: unknown and no prefix given"
                assert len(self.known[s.request_id]) == s.start_pos, (
                    f"{s.request_id}: runner saw {len(self.known[s.request_id])} tokens, "
                    f"start_pos={s.start_pos}")
        # 0) placeholders: the token sampled for this request by the previously dispatched step
        fed = {}
        for s in out.seqs:
            fed[s.request_id] = list(s.token_ids)
            assert (PLACEHOLDER_TOKEN_ID in s.token_ids) == s.placeholder, s
            if s.placeholder:
                assert s.token_ids == [PLACEHOLDER_TOKEN_ID] and s.prefix_token_ids is None, s
                assert s.request_id in self._prev_sampled, f"{s.request_id}: placeholder without a previous sample"
                fed[s.request_id] = [self._prev_sampled[s.request_id]]
                self.num_placeholders_fed += 1
        # 1) write every scheduled token's KV (all writes land before any read)
        for s in out.seqs:
            key = self._adapter_key(s)
            for i, t in enumerate(fed[s.request_id]):
                self.kv[self._slot(s.block_ids, s.start_pos + i)] = (t, s.start_pos + i, key)
        # 2) "attend": read the whole context back from the cache
        result: dict[str, SampledToken] = {}
        for i, s in enumerate(out.seqs):
            end = s.start_pos + len(s.token_ids)
            ctx = []
            key = self._adapter_key(s)
            for p in range(end):
                tok, pos, kv_key = self.kv.get(self._slot(s.block_ids, p), (None, None, None))
                assert pos == p, f"{s.request_id}: slot for position {p} holds position {pos}"
                assert kv_key == key, (f"{s.request_id}: KV at position {p} was computed with adapter "
                                       f"{kv_key!r}, the request runs with {key!r}")
                ctx.append(tok)
            assert ctx[s.start_pos:] == fed[s.request_id]
            if s.prefix_token_ids is not None:  # a prefix-cache hit must hold exactly our tokens
                assert ctx[:s.start_pos] == s.prefix_token_ids, f"{s.request_id}: stale cached KV"
            known = self.known.get(s.request_id)
            if known is not None:
                assert ctx[:len(known)] == known, f"{s.request_id}: cached context changed"
            self.known[s.request_id] = ctx
            if s.num_draft_tokens:  # speculative decoding: greedy verification of the drafts
                assert s.sample and not s.placeholder, s
                d = s.num_draft_tokens
                mask = out.grammar_bitmask[i] if out.constrained and out.constrained[i] else None
                toks = []
                for j in range(d + 1):  # the token after ctx[:end - d + j] (the target's choice)
                    toks.append(self._sample(ctx[:end - d + j], s, mask, key))
                    if j == d or toks[-1].token_id != ctx[end - d + j]:
                        break
                # the rejected drafts' KV is garbage: the runner may only rely on the accepted ones
                self.known[s.request_id] = ctx[:end - d + len(toks) - 1]
                self.num_drafts_scheduled += d
                self.num_drafts_accepted += len(toks) - 1
                result[s.request_id] = toks
                continue
            if self.task == "embed":
                from jaxllm.engine.pooling import PooledChunk

                assert not s.sample, f"{s.request_id}: an embed step never samples"
                hs = [fake_hidden(ctx[:p + 1]) for p in range(s.start_pos, end)]
                self._chunks[s.request_id] = PooledChunk(np.sum(hs, axis=0, dtype=np.float32), hs[-1])
            if s.params.prompt_logprobs is not None:
                self._prompt_logprobs(s, ctx, fed[s.request_id])
            if s.sample and out.late_bitmask and out.constrained[i]:
                self._late.append((i, s, ctx, key))  # sampled at set_bitmask, with the mask then given
            elif s.sample:
                mask = out.grammar_bitmask[i] if out.constrained and out.constrained[i] else None
                result[s.request_id] = self._sample(ctx, s, mask, key)
        self._prev_sampled = {rid: (t[-1] if isinstance(t, list) else t).token_id for rid, t in result.items()}
        return result

    def _sample_late(self, late: list, result: dict, bitmask, constrained) -> None:
        """A late-bitmask step's held-back samples (FakePending.set_bitmask)."""
        for i, s, ctx, key in late:
            mask = bitmask[i] if constrained and constrained[i] else None
            result[s.request_id] = tok = self._sample(ctx, s, mask, key)
            self._prev_sampled[s.request_id] = tok.token_id
        self._unsampled = None

    # ----- the "model" --------------------------------------------------------------
    def _slot(self, block_ids: list[int], pos: int) -> int:
        return block_ids[pos // self.block_size] * self.block_size + pos % self.block_size

    def _sample(self, ctx: list[int], s: ScheduledSeq, mask=None, adapter: str | None = None) -> SampledToken:
        """The context's hash token; with a grammar bitmask ([W] i32) the first allowed id from it on."""
        p = s.params
        num_generated = len(ctx) - s.num_prompt_tokens
        banned = set(s.banned_token_ids)  # bad_words
        if num_generated < p.min_tokens:
            banned |= set(p.stop_token_ids or ())
            if not p.ignore_eos:
                banned |= self.eos_token_ids
        if self.next_token_fn is not None:
            tok = self.next_token_fn(ctx, s)
        else:
            h = context_hash(ctx)
            if adapter is not None:  # each adapter is another "model"
                h = _mix(h, context_hash([ord(c) for c in adapter]))
            if p.temperature > 0:  # seeded: depends on (seed, position) and the context only
                h = _mix(h, s.seed, len(ctx))
            tok = h % self.vocab_size
        if mask is not None:
            bits = (mask.view(np.uint32)[np.arange(self.vocab_size) // 32] >> (np.arange(self.vocab_size) % 32)) & 1
            allowed = set(np.flatnonzero(bits).tolist()) - banned
            assert allowed, f"{s.request_id}: the grammar bitmask allows no token"
            banned = set(range(self.vocab_size)) - allowed
        while tok in banned:
            tok = (tok + 1) % self.vocab_size
        lp = -float(_mix(tok, len(ctx)) % 1000) / 100.0
        top = None
        if p.logprobs is not None:
            top = [(tok, lp)] + [((tok + k) % self.vocab_size, lp - k) for k in range(1, p.logprobs)]
            top = top[:p.logprobs] if p.logprobs else []
        assert math.isfinite(lp)
        return SampledToken(token_id=tok, logprob=lp, top_logprobs=top, rank=1)  # the fake's best token


    def _prompt_logprobs(self, s: ScheduledSeq, ctx: list[int], fed: list[int]) -> None:
        """Prompt positions p + 1 predicted by this step's tokens (p = start_pos + j), as the real
        runner: the chunk's last token predicts ``next_token_id``."""
        k = s.params.prompt_logprobs
        entries = self._prompt_lp.setdefault(s.request_id, {})
        for j in range(len(fed)):
            p = s.start_pos + j
            if p + 1 >= s.num_prompt_tokens:
                break
            target = fed[j + 1] if j + 1 < len(fed) else s.next_token_id
            if target is None:
                continue
            context = ctx[:p + 1]
            best = context_hash(context) % self.vocab_size
            lp = -float(_mix(target, len(context)) % 1000) / 100.0
            rank = 1 if target == best else 2 + _mix(target, len(context)) % (self.vocab_size - 1)
            best_lp = -float(_mix(best, len(context)) % 1000) / 100.0
            top = [((best + i) % self.vocab_size, best_lp - i) for i in range(k)]
            entries[p + 1] = SampledToken(token_id=target, logprob=lp, top_logprobs=top, rank=rank)

    def take_prompt_logprobs(self) -> dict[str, dict[int, SampledToken]]:
        out, self._prompt_lp_out = self._prompt_lp_out, {}
        return out

    def take_pooled(self) -> dict:
        out, self._pooled = self._pooled, {}
        return out


class FakePending:
    """The fake's PendingStep: the result is computed at dispatch (a late-bitmask step's constrained
    seqs at set_bitmask, or at result() with no mask); result() checks the read order (and, for an
    embed step, files its pooled chunks where take_pooled finds them, as the real runner does)."""

    def __init__(self, runner: FakeRunner, result: dict[str, SampledToken], chunks: dict | None = None,
                 prompt_lp: dict | None = None, late: list | None = None) -> None:
        self._runner, self._result, self._read = runner, result, False
        self._chunks = chunks or {}
        self._prompt_lp = prompt_lp or {}
        self._late = late or []

    @property
    def needs_bitmask(self) -> bool:
        return bool(self._late)

    def set_bitmask(self, bitmask, constrained) -> None:
        if self._late:
            late, self._late = self._late, []
            self._runner._sample_late(late, self._result, bitmask, constrained)

    def result(self) -> dict[str, SampledToken]:
        self.set_bitmask(None, None)
        if not self._read:
            self._runner._take(self)
            self._runner._pooled.update(self._chunks)
            for rid, entries in self._prompt_lp.items():
                self._runner._prompt_lp_out.setdefault(rid, {}).update(entries)
            self._read = True
        return self._result
