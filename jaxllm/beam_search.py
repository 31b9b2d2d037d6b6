"""Beam search, as vLLM's ``LLM.beam_search`` (host only, no jax).

Public types are vLLM's: ``BeamSearchParams`` (``beam_width``, ``max_tokens``, ``ignore_eos``,
``temperature``, ``length_penalty``, ``include_stop_str_in_output``), ``BeamSearchSequence``
(``tokens`` = prompt + generated ids, ``logprobs``, ``cum_logprob``, ``text``, ``finish_reason``,
``stop_reason``) and ``BeamSearchOutput(sequences)``, best first by vLLM's length-penalised score
``cum_logprob / len(tokens) ** length_penalty`` (a final EOS not counted; the prompt counted, as
vLLM counts it).

The algorithm is vLLM's (after HF transformers): every step each live beam offers its
``2 * beam_width`` most likely next tokens (plus its sampled one: with ``temperature > 0`` that
may be another token) under the raw model distribution. A candidate ending in an EOS id (not
``ignore_eos``) is a finished beam (``finish_reason="stop"``, ``stop_reason`` the EOS id, the id
kept in ``tokens`` only with ``include_stop_str_in_output``); the other candidates are ranked by
score and the best ``beam_width`` live on. After ``max_tokens`` steps (or when a beam reaches
max_model_len, ``finish_reason="length"``), finished and live beams together are ranked and the
best ``beam_width`` returned. There is no early stopping (vLLM has none).

How it runs on the engine (``BeamSearchRun``, one per prompt, a state machine the caller feeds
with the engine's outputs): a beam is an ordinary engine request (``logprobs=2*beam_width``,
``ignore_eos``: EOS is the search's decision). A request keeps decoding while its beam's chosen
token is the one the engine sampled for it, so that beam costs one decode token per step and no
prefill; any other surviving candidate forks a new request whose prompt is the beam's tokens
(``fork_of`` its parent's request): its full KV blocks are the parent's (prefix-cache hits: a
running request's full blocks are registered) and its partial last block a device copy of the
parent's (KVCacheManager.pin_fork), so it too computes one token. Where the engine cannot fork
(runner without block copies, prefix caching off, parent gone) the fork prefills what the prefix
cache does not hold. Requests no beam continues are aborted (their blocks freed). A driver on
another thread than the engine (the server's, serving/beam.py) adds its requests step-gated
(``step_gate=True``) and releases the continued ones (``take_releases``) after each depth, so no
request decodes past a decision (dropped beams' tokens wasted; a parent gone before its fork
arrives, which then prefills); the offline driver (jaxllm/beam_offline.py) steps the engine itself,
synchronously, and gates its requests too (a depth split over two steps by the token budget). All beams of all
prompts ride in the same engine steps. vLLM instead submits every beam as a new one-token request
each step (every beam re-prefills the tokens past its last full block every step).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection

import msgspec

from jaxllm.outputs import Logprob
from jaxllm.sampling_params import MAX_LOGPROBS, SamplingParams

MAX_BEAM_WIDTH = MAX_LOGPROBS // 2  # 2 * beam_width candidates ride in the logprobs (<= 20)


class BeamSearchParams(msgspec.Struct, kw_only=True):
    """vLLM's ``BeamSearchParams``; construction validates every field (one-line ValueError)."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "BeamSearchParams":
        for name, lo, hi in (("beam_width", 1, MAX_BEAM_WIDTH), ("max_tokens", 1, None)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
                rule = f"must be an integer in [{lo}, {hi}]" if hi else f"must be an integer >= {lo}"
                if name == "beam_width":
                    rule += f" (2 * beam_width candidates ride in the logprobs, at most {MAX_LOGPROBS})"
                raise ValueError(f"{name}={v!r} is invalid: {rule}")
        for name in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: must be a bool")
        for name, ok, rule in (("temperature", lambda x: x >= 0, "must be a number >= 0"),
                               ("length_penalty", lambda x: True, "must be a finite number")):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
                raise ValueError(f"{name}={v!r} is invalid: {rule}")
        return self


@dataclasses.dataclass
class BeamSearchSequence:
    """One beam: ``tokens`` are the prompt's ids followed by the generated ones (vLLM's layout);
    ``logprobs`` one ``{token_id: Logprob}`` per generated token (the candidates it was chosen
    among); ``text`` is filled when the sequence is returned."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob]]
    lora_request: object = None
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclasses.dataclass
class BeamSearchOutput:
    """The best ``beam_width`` sequences of one prompt, best first."""

    sequences: list[BeamSearchSequence]


def get_beam_search_score(tokens: list[int], cumulative_logprob: float, eos_token_ids: Collection[int],
                          length_penalty: float = 1.0) -> float:
    """vLLM's (and HF's) length-penalised score: a final EOS does not count in the length."""
    return _score(len(tokens), tokens[-1], cumulative_logprob, eos_token_ids, length_penalty)


def _score(num_tokens: int, last_token: int, cumulative_logprob: float, eos_token_ids: Collection[int],
           length_penalty: float) -> float:
    seq_len = num_tokens - 1 if last_token in eos_token_ids else num_tokens
    try:
        denom = float(seq_len) ** length_penalty
    except OverflowError:  # a huge length_penalty: the score goes to 0
        denom = math.inf
    if denom == 0.0:  # a very negative length_penalty, or a beam of nothing but an EOS
        return math.copysign(math.inf, cumulative_logprob) if cumulative_logprob else 0.0
    return cumulative_logprob / denom


def sort_key(eos_token_ids: Collection[int], length_penalty: float):
    return lambda b: get_beam_search_score(b.tokens, b.cum_logprob, eos_token_ids, length_penalty)


def _extended(seq: BeamSearchSequence, tok: int, entry: dict, cum: float) -> BeamSearchSequence:
    return BeamSearchSequence(seq.tokens + [tok], seq.logprobs + [entry], seq.lora_request, cum)


@dataclasses.dataclass
class _Beam:
    seq: BeamSearchSequence
    rid: str  # the engine request whose outputs extend this beam
    start: int  # depth (generated tokens) at which that request's prompt ends


class BeamSearchRun:
    """One prompt's beam search over engine requests. The caller adds ``take_adds()``, aborts
    ``take_aborts()``, feeds every ``RequestOutput`` of the run's requests to ``feed`` and calls
    ``advance()`` while ``ready()``; ``done`` then ``output(tokenizer)``. ``max_model_len`` caps
    the depth: a beam reaching it ends with finish_reason "length" (jaxllm's generate rule)."""

    def __init__(self, rid_prefix: str, prompt_ids: list[int], params: BeamSearchParams,
                 eos_token_ids: Collection[int], max_model_len: int, lora_request=None,
                 step_gate: bool = False) -> None:
        self.prefix = rid_prefix
        self.prompt_len = len(prompt_ids)
        self.params = params
        self.eos = frozenset(() if params.ignore_eos else eos_token_ids)
        self.score_eos = frozenset(eos_token_ids)  # vLLM's score drops a final EOS even with ignore_eos
        self.key = sort_key(self.score_eos, params.length_penalty)
        self.max_depth = min(params.max_tokens, max_model_len - self.prompt_len)
        self.lora_request = lora_request
        self.depth = 0
        self.completed: list[BeamSearchSequence] = []
        self.outputs: dict[str, object] = {}  # rid -> latest CompletionOutput
        self._ids = 0
        self._adds: list[tuple[str, list[int], SamplingParams]] = []
        self._aborts: list[str] = []
        self.step_gate = step_gate  # the driver gates its requests: continued ones go to take_releases
        self._releases: list[str] = []
        root = BeamSearchSequence(list(prompt_ids), [], lora_request)
        self.beams: list[_Beam] = [self._fork(root)]
        self.done = False
        # counters for the bench/tests: requests added (forks) and continued beams
        self.num_forks = 1
        self.num_continued = 0

    # ----- engine traffic -------------------------------------------------------------
    def _fork(self, seq: BeamSearchSequence, parent: "_Beam | None" = None) -> _Beam:
        rid = f"{self.prefix}.{self._ids}"
        self._ids += 1
        p = self.params
        sp = SamplingParams(temperature=p.temperature, max_tokens=self.max_depth - self.depth,
                            logprobs=2 * p.beam_width, ignore_eos=True, detokenize=True)
        self._adds.append((rid, list(seq.tokens), sp, None if parent is None else parent.rid))
        return _Beam(seq, rid, self.depth)

    def take_adds(self) -> list[tuple[str, list[int], SamplingParams, str | None]]:
        """(request id, prompt ids, params, fork_of): fork_of is the request whose KV the new one
        extends by one token (LLMEngine.add_request's hint); add these before ``take_aborts``."""
        adds, self._adds = self._adds, []
        return adds

    def take_aborts(self) -> list[str]:
        aborts, self._aborts = self._aborts, []
        return aborts

    def take_releases(self) -> list[str]:
        """(``step_gate``) the requests that continue a beam past the last depth: release each one's
        next step (``release_step``) after ``take_adds`` (their forks find them unmoved)."""
        releases, self._releases = self._releases, []
        return releases

    def live_request_ids(self) -> set[str]:
        return {b.rid for b in self.beams}

    def feed(self, request_id: str, out) -> None:
        """``out``: the request's RequestOutput (cumulative). Outputs of retired requests are ignored."""
        if any(b.rid == request_id for b in self.beams):
            self.outputs[request_id] = out.outputs[0]

    def lagging_request_ids(self) -> list[str]:
        """The live beams' requests whose output for this depth has not arrived yet."""
        out = []
        for b in self.beams:
            c = self.outputs.get(b.rid)
            if c is None or len(c.token_ids) <= self.depth - b.start:
                out.append(b.rid)
        return out

    def ready(self) -> bool:
        """Whether every live beam's next-token entry has arrived."""
        return not self.done and not self.lagging_request_ids()

    # ----- one depth ------------------------------------------------------------------
    def advance(self) -> None:
        """Rank this depth's candidates, keep the best ``beam_width``; fork / continue / abort."""
        p = self.params
        # candidates as (score, beam, token, cum_logprob, entry, sampled): a sequence object is built
        # only for the kept ones and the finished ones (2 * beam_width^2 candidates a step otherwise)
        candidates: list[tuple] = []
        lp_pen, score_eos = p.length_penalty, self.score_eos
        for b in self.beams:
            c = self.outputs[b.rid]
            j = self.depth - b.start
            entry, sampled = c.logprobs[j], c.token_ids[j]
            n = len(b.seq.tokens) + 1
            for tok, lp in entry.items():
                cum = b.seq.cum_logprob + lp.logprob
                if tok in self.eos:
                    seq = _extended(b.seq, tok, entry, cum)
                    if not p.include_stop_str_in_output:
                        seq.tokens.pop()
                    seq.finish_reason, seq.stop_reason = "stop", tok
                    self.completed.append(seq)
                else:
                    candidates.append((_score(n, tok, cum, score_eos, lp_pen), b, tok, cum, entry, sampled))
        candidates.sort(key=lambda x: x[0], reverse=True)  # stable: ties keep beam, then entry order
        kept = [(_extended(b.seq, tok, entry, cum), b, sampled)
                for _, b, tok, cum, entry, sampled in candidates[:p.beam_width]]
        self.depth += 1
        old = self.beams
        if self.depth >= self.max_depth or not kept:
            for seq, _, _ in kept:
                seq.finish_reason = "length"
                self.completed.append(seq)
            self.beams = []
            self._aborts += [b.rid for b in old]
            self.done = True
            return
        claimed: set[str] = set()
        new: list[_Beam] = []
        for seq, parent, sampled in kept:
            if seq.tokens[-1] == sampled and parent.rid not in claimed:
                claimed.add(parent.rid)  # the request already decodes this token: keep it going
                new.append(_Beam(seq, parent.rid, parent.start))
                self.num_continued += 1
            else:
                new.append(self._fork(seq, parent))
                self.num_forks += 1
        self.beams = new
        self._aborts += [b.rid for b in old if b.rid not in claimed]
        if self.step_gate:
            self._releases += [b.rid for b in new if b.rid in claimed]
        for rid in list(self.outputs):
            if rid not in claimed:
                del self.outputs[rid]

    def output(self, tokenizer) -> BeamSearchOutput:
        best = sorted(self.completed, key=self.key, reverse=True)[:self.params.beam_width]
        for seq in best:
            seq.text = tokenizer.decode(seq.tokens, skip_special_tokens=False)  # vLLM: prompt included
        return BeamSearchOutput(best)
