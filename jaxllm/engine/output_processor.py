"""Per-request output state: incremental detokenization, stop checks, logprobs, and the
merge of n > 1 child sequences into one cumulative ``RequestOutput`` (host only)."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection

from jaxllm.core.request import Request, RequestStatus
from jaxllm.engine.runner_protocol import SampledToken
from jaxllm.engine.stop_checker import find_stop_string, holdback_chars, stop_token_reason
from jaxllm.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from jaxllm.sampling_params import RequestOutputKind

TokenText = Callable[[int], str]  # one token id -> its text (for Logprob.decoded_token)


class TokenTexts:
    """``tokenizer.decode([id], skip_special_tokens=False)`` per id, memoised (vLLM's
    decoded_token; logprob entries repeat the same few ids)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text


def logprob_entry(tok: SampledToken, token_text: TokenText | None) -> dict[int, Logprob]:
    """{token_id: Logprob} for one position: the sampled (or prompt) token first, with the rank the
    runner computed, then the top-k alternatives not already there, ranked by their order."""
    def text(t: int) -> str | None:
        return None if token_text is None else token_text(t)

    entry = {tok.token_id: Logprob(tok.logprob, tok.rank, text(tok.token_id))}
    for i, (tid, lp) in enumerate(tok.top_logprobs or ()):
        if tid not in entry:
            entry[tid] = Logprob(lp, i + 1, text(tid))
    return entry


class SeqState:
    """Output side of one child sequence."""

    def __init__(self, req: Request, index: int, detokenizer, token_text: TokenText | None = None) -> None:
        self.req = req
        self.token_text = token_text  # None: detokenize=False, decoded_token stays None
        self.index = index
        self.detok = detokenizer
        self.text = ""
        self.token_ids: list[int] = []
        self.cumulative_logprob: float | None = 0.0  # None once the runner gives no logprob
        self.logprobs: list[dict[int, Logprob]] | None = [] if req.params.logprobs is not None else None
        self.status: RequestStatus | None = None  # set when finished
        self.stop_reason: int | str | None = None
        self._holdback = holdback_chars(req.params)
        self.last_token_time: float | None = None  # kept while stats are recorded (inter-token latency)
        self._sent = (0, 0)  # output_kind DELTA: (tokens, characters) already in an output

    @property
    def finished(self) -> bool:
        return self.status is not None

    def add_token(self, tok: SampledToken, eos_token_ids: Collection[int],
                  max_model_len: int) -> RequestStatus | None:
        """Record one generated token; return the finish status if it ends the sequence."""
        p = self.req.params
        self.token_ids.append(tok.token_id)
        if self.cumulative_logprob is not None:
            self.cumulative_logprob = (None if tok.logprob is None
                                       else self.cumulative_logprob + tok.logprob)
        if self.logprobs is not None:
            self.logprobs.append(logprob_entry(tok, self.token_text))
        n_out = len(self.token_ids)
        stopped, reason = stop_token_reason(tok.token_id, n_out, p, eos_token_ids)
        if stopped:
            if p.include_stop_str_in_output:
                self.text += self.detok.add([tok.token_id])
            return self._finish(RequestStatus.FINISHED_STOPPED, reason)
        delta = self.detok.add([tok.token_id])
        self.text += delta
        if n_out >= p.min_tokens:
            hit = find_stop_string(self.text, len(delta), p.stop_strings,
                                   p.include_stop_str_in_output)
            if hit is not None:
                self.text = self.text[:hit[0]]
                return self._finish(RequestStatus.FINISHED_STOPPED, hit[1])
        if n_out >= self.req.max_output_tokens or self.req.num_tokens >= max_model_len:
            return self._finish(RequestStatus.FINISHED_LENGTH, None)
        return None

    def _finish(self, status: RequestStatus, stop_reason) -> RequestStatus:
        self.status = status
        self.stop_reason = stop_reason
        return status

    def abort(self) -> None:
        if not self.finished:
            self._finish(RequestStatus.FINISHED_ABORTED, None)

    def completion(self, delta: bool = False) -> CompletionOutput:
        """Everything so far, or with ``delta`` what is new since the last delta (output_kind DELTA;
        held-back text, a possible stop string's start, comes once it is known not to be one)."""
        text = self.text
        if not self.finished and self._holdback:
            text = text[:max(0, len(text) - self._holdback)]
        t0, c0 = self._sent if delta else (0, 0)
        if delta:
            self._sent = (len(self.token_ids), max(c0, len(text)))
        return CompletionOutput(
            index=self.index, text=text[c0:], token_ids=self.token_ids[t0:],
            cumulative_logprob=self.cumulative_logprob,
            # entries are never mutated once appended: a shallow copy keeps this O(len)
            logprobs=self.logprobs[t0:] if self.logprobs is not None else None,
            finish_reason=self.status.finish_reason if self.status is not None else None,
            stop_reason=self.stop_reason)


class ParentState:
    """One user request: n child sequences sharing a prompt."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 arrival_time: float, want_prompt_logprobs: bool = False,
                 token_text: TokenText | None = None) -> None:
        self.request_id = request_id
        self.token_text = token_text
        # One entry per prompt token ({token_id: Logprob}); the first is None (nothing predicts it).
        self.prompt_logprobs: list[dict[int, Logprob] | None] | None = (
            [None] * len(prompt_token_ids) if want_prompt_logprobs else None)
        self.prompt = prompt
        # one list for the request's life, handed to every RequestOutput as it is (as vLLM's are): an
        # O(prompt) copy per step and sequence cost 10+ ms a step at 256 x 2,000-token prompts
        self.prompt_token_ids = list(prompt_token_ids)
        self.children: list[SeqState] = []
        self.metrics = RequestMetrics(arrival_time=arrival_time)
        self.in_stats = True  # False: left out of the request-level stats (engine.exclude_from_stats)
        self._prompt_logprobs_sent = False

    @property
    def finished(self) -> bool:
        return all(c.finished for c in self.children)

    @property
    def output_kind(self) -> RequestOutputKind:
        return self.children[0].req.params.output_kind  # one SamplingParams for the n children

    def add_prompt_logprobs(self, entries: dict[int, SampledToken]) -> None:
        """The runner's prompt token per prompt position (a recompute after preemption or another
        of the n children may send a position again: the first one stays)."""
        if self.prompt_logprobs is None:
            return
        for pos, tok in entries.items():
            if 0 < pos < len(self.prompt_logprobs) and self.prompt_logprobs[pos] is None:
                self.prompt_logprobs[pos] = logprob_entry(tok, self.token_text)

    def _prompt_logprobs(self, delta: bool):
        if self.prompt_logprobs is None or (delta and self._prompt_logprobs_sent):
            return None  # DELTA: once, with the first output
        self._prompt_logprobs_sent = True
        return list(self.prompt_logprobs)

    def note_token(self, now: float) -> None:
        if self.metrics.first_token_time is None:
            self.metrics.first_token_time = now

    def output(self, now: float | None = None) -> RequestOutput:
        """This request's output now, as its output_kind asks (the engine asks FINAL_ONLY requests
        only once they finish)."""
        fin = self.finished
        delta = self.output_kind == RequestOutputKind.DELTA
        m = self.metrics
        sched = [c.req.first_scheduled_time for c in self.children if c.req.first_scheduled_time]
        if sched:
            m.first_scheduled_time = min(sched)
        if fin and m.finished_time is None:
            m.finished_time = now if now is not None else time.time()
        return RequestOutput(
            request_id=self.request_id, prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,  # shared, not copied: read-only to consumers
            outputs=[c.completion(delta) for c in self.children], finished=fin,
            prompt_logprobs=self._prompt_logprobs(delta),
            num_cached_tokens=max(0, self.children[0].req.num_cached_tokens),
            metrics=RequestMetrics(arrival_time=m.arrival_time,
                                   first_scheduled_time=m.first_scheduled_time,
                                   first_token_time=m.first_token_time,
                                   finished_time=m.finished_time))


DetokenizerFactory = Callable[[object, list[int], bool], object]
