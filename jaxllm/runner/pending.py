"""A dispatched step whose results are still on the device (ModelRunner.dispatch's answer).

JAX dispatch is asynchronous: the jitted step (and the prompt-logprobs pass) are launched and
their outputs are device arrays that fill in later. ``result()`` is the one place the host waits:
it copies them back (device_get) and converts them to ``SampledToken``s, and files prompt
logprobs where ``ModelRunner.take_prompt_logprobs`` finds them.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from jaxllm.core.scheduler_output import ScheduledSeq
from jaxllm.engine.runner_protocol import SampledToken
from jaxllm.runner.inputs import sample_rows
from jaxllm.runner.sampler import SamplerOutput


def start_copy(tree) -> None:
    """Start device -> host copies now, so result() does not pay for them after the step ends."""
    for leaf in jax.tree_util.tree_leaves(tree):
        copy = getattr(leaf, "copy_to_host_async", None)
        if copy is not None:
            copy()


def prompt_logprobs_targets(seqs: list[ScheduledSeq], padded_tokens: int) -> tuple[np.ndarray, list]:
    """For a step's seqs asking prompt_logprobs: (targets [padded_tokens] i32, each token's next prompt
    token, -1 = not wanted; spans (seq, first token index, number of tokens) of those seqs)."""
    targets = np.full(padded_tokens, -1, np.int32)  # [T] next prompt token, -1 = not wanted
    spans = []
    t = 0
    for s in seqs:
        n = len(s.token_ids)
        if s.params.prompt_logprobs is not None:
            for j in range(n):
                p = s.start_pos + j  # this token predicts position p + 1
                if p + 1 < s.num_prompt_tokens:
                    nxt = s.token_ids[j + 1] if j + 1 < n else s.next_token_id
                    if nxt is not None:
                        targets[t + j] = nxt
            spans.append((s, t, n))
        t += n
    return targets, spans


class PromptLogprobsJob:
    """The dispatched prompt-logprobs pass of one step: device outputs plus what to file where."""

    def __init__(self, outputs, targets: np.ndarray, spans: list[tuple[ScheduledSeq, int, int]]) -> None:
        self.outputs = outputs  # (lp [T] f32, rank [T] i32, top_ids [T, K] i32, top_lp [T, K] f32), on device
        self.targets = targets  # [T] i32 next prompt token, -1 = not wanted
        self.spans = spans  # (seq, first token index, number of tokens)
        start_copy(outputs)

    def file(self, into: dict[str, dict[int, SampledToken]]) -> None:
        lp, rank, top_ids, top_lp = jax.device_get(self.outputs)
        for s, start, n in self.spans:
            k = s.params.prompt_logprobs
            entries = into.setdefault(s.request_id, {})
            for j in range(n):
                tgt = int(self.targets[start + j])
                if tgt < 0:
                    continue
                top = [(int(tid), float(v)) for tid, v in zip(top_ids[start + j, :k], top_lp[start + j, :k])]
                entries[s.start_pos + j + 1] = SampledToken(tgt, float(lp[start + j]), top, rank=int(rank[start + j]))


class PendingStep:
    """One dispatched step. ``result()`` waits for it once and returns
    ``{request_id: SampledToken}`` for its ``sample=True`` seqs (later calls return the same); a seq
    with speculative drafts gets a list: the accepted drafts' SampledTokens, then the model's own
    (1..num_draft_tokens + 1 entries; acceptance is decided here, on the sampled ids).

    A late-bitmask step (``SchedulerOutput.late_bitmask``) was dispatched without its sampling:
    ``set_bitmask(bitmask, constrained)`` launches it (``sample_later``); ``result()`` before that
    samples with every row free (the engine does so only for a step none of whose requests is left)."""

    def __init__(self, seqs: list[ScheduledSeq], out: SamplerOutput | None,
                 prompt_lp_sink: Callable[[], dict] | None = None, *,
                 sample_later: Callable[..., SamplerOutput] | None = None, marker=None) -> None:
        self._seqs = seqs
        self._out = out
        self._prompt_lp: PromptLogprobsJob | None = None  # set_prompt_logprobs
        self._prompt_lp_sink = prompt_lp_sink  # () -> the runner's take_prompt_logprobs store
        self._sample_later = sample_later  # (bitmask, constrained) -> SamplerOutput, launched once
        self._result: dict[str, SampledToken] | None = None
        self._marker = marker if out is None else out.token_ids  # a device array ready when the step is done
        if out is not None:
            start_copy(out)

    def set_prompt_logprobs(self, job: PromptLogprobsJob) -> None:
        """The step's prompt-logprobs pass, filed where `prompt_lp_sink()` says when result() runs."""
        self._prompt_lp = job

    @property
    def needs_bitmask(self) -> bool:
        """A late-bitmask step whose sampling is not launched yet."""
        return self._sample_later is not None

    def set_bitmask(self, bitmask, constrained: list[bool] | None) -> None:
        """Launch a late-bitmask step's sampling: `bitmask` [len(seqs), W] i32 and `constrained` as
        SchedulerOutput's (None: every row free). A no-op once launched."""
        if self._sample_later is None:
            return
        launch, self._sample_later = self._sample_later, None
        self._out = launch(bitmask, constrained)
        self._marker = self._out.token_ids
        start_copy(self._out)

    def wait_device(self) -> None:
        """Block until the device has finished this step, without copying anything (benches time
        device idle gaps with it; any thread may call it)."""
        if self._marker is not None:
            self._marker.block_until_ready()

    def result(self) -> dict[str, SampledToken]:
        if self._result is not None:
            return self._result
        self.set_bitmask(None, None)  # a late-bitmask step nobody handed a mask: every row free
        result: dict = {}
        if self._out is not None:
            out = jax.device_get(self._out)
            first_row = sample_rows(self._seqs)
            for i, s in enumerate(self._seqs):
                if not s.sample:
                    continue
                k = s.params.logprobs

                def token(r: int) -> SampledToken:
                    top = None
                    if k is not None:
                        top = [(int(t), float(lp)) for t, lp in zip(out.top_ids[r, :k], out.top_logprobs[r, :k])]
                    return SampledToken(int(out.token_ids[r]), float(out.logprobs[r]), top, rank=int(out.ranks[r]))

                r0, d = first_row[i], s.num_draft_tokens
                if not d:
                    result[s.request_id] = token(r0)
                    continue
                # verification: row j sampled the token after draft j - 1 as if the drafts were the
                # sequence's; keep rows while their token equals the next draft, then the first
                # that differs (or the bonus row after the last draft)
                drafts = s.token_ids[len(s.token_ids) - d:]
                toks = [token(r0)]
                while len(toks) <= d and toks[-1].token_id == drafts[len(toks) - 1]:
                    toks.append(token(r0 + len(toks)))
                result[s.request_id] = toks
        if self._prompt_lp is not None:
            self._prompt_lp.file(self._prompt_lp_sink())
        self._out = self._prompt_lp = None  # drop the device buffers
        self._result = result
        return result
