"""Speculative decoding on the engine side (n-gram drafts; host only, no jax).

vLLM's ``--speculative-config '{"method": "ngram", ...}'`` (jaxllm/spec_config.py). After each step
the engine proposes drafts (jaxllm/core/ngram_proposer.py) for the running requests; the scheduler
feeds them behind the last token (they take budget and KV slots); the runner samples a row per
draft position and keeps the drafts while the token sampled before each equals it, plus the next
sampled token (runner/pending.py); the scheduler rolls the rejected ones back. The engine then
handles the tokens one by one, so a stop inside them ends the request there.

Synchronous steps only (async scheduling is switched off), as vLLM's first version: the drafts of
step N+1 need step N's tokens. Requests with a grammar or a penalty get no drafts (see
``_propose_drafts``), nor does one whose recent drafts were mostly rejected (a pause:
engine/spec_backoff.py; ``engine.spec_backoff = None`` turns it off); everything else (random
sampling, logprobs, stop strings, min_tokens, max_tokens) stays exactly what a run without
speculation gives.
"""

from __future__ import annotations

from collections.abc import Callable

from jaxllm.core.ngram_proposer import NgramProposer
from jaxllm.engine.spec_backoff import DraftBackoff
from jaxllm.metrics.stats import SpecDecodingStats


def split_sampled(sampled: dict) -> tuple[dict, Callable[[str], object]]:
    """A step's ``{request_id: SampledToken | [SampledToken, ...]}`` (a list: a seq with drafts, the
    accepted drafts then the model's own token) -> (``{request_id: token id | [ids]}`` for the
    scheduler, ``next_sampled(request_id)``: the SampledToken of that request's next token to handle,
    in order, as the scheduler hands the tokens over one by one)."""
    token_ids = {k: [t.token_id for t in v] if isinstance(v, list) else v.token_id for k, v in sampled.items()}
    taken: dict[str, int] = {}  # request id -> tokens of a speculative list handled so far

    def next_sampled(request_id: str):
        st = sampled[request_id]
        if isinstance(st, list):
            i = taken[request_id] = taken.get(request_id, -1) + 1
            st = st[i]
        return st

    return token_ids, next_sampled


class SpecDecodeMixin:
    def _init_speculative(self, config, runner) -> None:
        # speculative decoding (n-gram drafts): synchronous steps only, as vLLM's first version
        self.speculative = config.speculative()
        self._proposer = None
        self.spec_backoff: DraftBackoff | None = None  # pauses drafting for low-acceptance requests
        self.num_spec_seqs = self.num_draft_tokens = self.num_accepted_tokens = 0  # per seq-step with drafts
        if self.speculative is not None:
            if self.task in ("embed", "classify"):
                raise ValueError(f"speculative_config is invalid for task={self.task!r}: nothing is generated")
            k = getattr(runner, "num_speculative_tokens", None)
            if k is not None and k < self.speculative.num_speculative_tokens:
                raise ValueError(f"speculative_config.num_speculative_tokens={self.speculative.num_speculative_tokens}"
                                 f" is invalid for this runner: built for at most {k} (its mixed buckets' rows)")
            self.async_scheduling = False
            sc = self.speculative
            self._proposer = NgramProposer(sc.num_speculative_tokens, sc.prompt_lookup_min, sc.prompt_lookup_max)
            self.spec_backoff = DraftBackoff()

    @property
    def mean_accepted_tokens(self) -> float:
        """Tokens per sequence-step with drafts (accepted drafts + the model's own token)."""
        return 1 + self.num_accepted_tokens / self.num_spec_seqs if self.num_spec_seqs else 0.0

    def _count_accepted(self, out, ids, it=None) -> None:
        """Drafted / accepted counts of step ``out`` (``ids``: its tokens by request id): the engine's
        totals, the backoff's rates, and ``it.spec_decoding`` for the stat loggers when ``it``. A
        no-op without speculative decoding."""
        if self._proposer is None:
            return
        backoff, requests = self.spec_backoff, self.scheduler.requests
        for seq in out.seqs:
            if seq.num_draft_tokens and seq.request_id in ids:
                accepted = len(ids[seq.request_id]) - 1
                self.num_spec_seqs += 1
                self.num_draft_tokens += seq.num_draft_tokens
                self.num_accepted_tokens += accepted
                if it is not None and self._in_stats(seq.request_id):
                    if it.spec_decoding is None:
                        it.spec_decoding = SpecDecodingStats(self.speculative.num_speculative_tokens)
                    it.spec_decoding.observe_draft(seq.num_draft_tokens, accepted)
                req = requests.get(seq.request_id)
                if backoff is not None and req is not None:
                    backoff.record(req.arrival_seq, seq.num_draft_tokens, accepted, self.num_steps)

    def _propose_drafts(self) -> None:
        """Fresh n-gram drafts for every running request that may carry them. None for a grammar or
        a multi-token bad word (its mask depends on each token) or a penalty (the runner's penalty counts take every fed
        token, drafts included); random sampling keeps them: each draft row samples with the key
        of its position, so accepting while the draw equals the draft gives the very tokens a run
        without speculation draws. A no-op without speculative decoding."""
        if self._proposer is None:
            return
        prop, backoff, step = self._proposer, self.spec_backoff, self.num_steps
        for req in self.scheduler.running:
            p = req.params
            if (req.needs_last_token or req.pooling is not None or p.repetition_penalty != 1
                    or p.frequency_penalty or p.presence_penalty
                    or req.num_computed_tokens != req.num_tokens - 1  # not decoding (yet)
                    or (backoff is not None and not backoff.allows(req.arrival_seq, step))):
                req.spec_token_ids = []
                continue
            k = min(prop.k, req.max_output_tokens - req.num_output_tokens - 1)
            req.spec_token_ids = prop.propose(req.arrival_seq, req.all_token_ids, k) if k > 0 else []
        if len(prop._bufs) > 2 * len(self.scheduler.requests) + 64:  # drop finished requests' buffers
            keep = {r.arrival_seq for r in self.scheduler.requests.values()}
            prop.retain(keep)
            if backoff is not None:
                backoff.retain(keep)
