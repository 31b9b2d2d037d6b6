"""A deterministic tiny engine with the ``LLMEngine`` interface, for serving tests (no jax).

* Tokenizer (tests/fakes/fake_char_tokenizer.py): one token per Latin-1 character (id = ord(c)),
  plus BOS=256, EOS=257.
* Generation: sample ``i`` of a request echoes its prompt tokens cyclically, starting ``i``
  tokens in (so n > 1 samples differ); EOS never appears unless the prompt holds it.
  ``max_tokens`` -> "length", stop strings / stop token ids / EOS -> "stop".
* Scheduling: at most ``max_num_seqs`` running requests (FIFO waiting queue), one token per
  running sample per step. KV blocks are counted: a running sample holds
  ceil(tokens / block_size) blocks; abort/finish frees them, so ``free_blocks == total_blocks``
  when idle is meaningful. A toy prefix cache reports ``num_cached_tokens`` for prompts whose
  leading full blocks were seen before.
* Faults (thread-safe, settable at runtime or by ``build_fake_engine`` options):
  ``step_delay`` seconds slept per step; ``fail_at_step`` / ``inject_raise()`` make ``step``
  raise; ``hang_at_step`` / ``inject_hang()`` make ``step`` block until ``release_hang()``;
  ``warmup_delay`` / ``build_delay`` for slow start-up. ``poison = "text"``: a text prompt
  holding it makes that request's host-side processing raise (UnicodeDecodeError), which fails
  that request alone (``take_request_errors()``, as ``LLMEngine``).
* Stats: like ``LLMEngine``, ``add_stat_logger`` gets a ``SchedulerStats`` / ``IterationStats`` per
  step and per abort (sequences, tokens, latencies, finish reasons, the toy prefix cache), so
  ``--metrics-port`` serves real numbers with ``--model fake:``.

Selectable from the CLI: ``python -m serving --model fake:step_delay=0.02,max_num_seqs=4``.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import msgspec

from jaxllm.engine.stats import EngineStats
from jaxllm.metrics.stats import FinishedRequestStats, IterationStats, SchedulerStats
from jaxllm.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from jaxllm.sampling_params import SamplingParams
from tests.fakes.fake_char_tokenizer import EOS, VOCAB_SIZE, FakeCharTokenizer

class FakeEngineConfig(msgspec.Struct, kw_only=True):
    model: str = "fake"
    max_model_len: int = 256
    max_num_seqs: int = 8
    max_num_batched_tokens: int = 512
    block_size: int = 4
    num_blocks: int = 2048
    tensor_parallel_size: int = 1
    dtype: str = "float32"
    enable_prefix_caching: bool = True
    token_buckets: list[int] = msgspec.field(default_factory=lambda: [8, 16, 32, 64])
    request_buckets: list[int] = msgspec.field(default_factory=lambda: [1, 2, 4, 8])


class _Sample:
    __slots__ = ("index", "token_ids", "text", "logprobs", "cum_logprob", "finish_reason",
                 "stop_reason", "blocks", "last_token_time")

    def __init__(self, index: int):
        self.index = index
        self.token_ids: list[int] = []
        self.text = ""
        self.logprobs: list[dict[int, Logprob]] | None = None
        self.cum_logprob = 0.0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.blocks = 0
        self.last_token_time: float | None = None


class _Req:
    def __init__(self, rid, prompt, ids, params, arrival):
        self.request_id = rid
        self.prompt = prompt
        self.prompt_token_ids = ids
        self.params = params
        self.samples = [_Sample(i) for i in range(params.n)]
        self.num_cached_tokens = 0
        self.metrics = RequestMetrics(arrival_time=arrival)
        if params.logprobs is not None:
            for s in self.samples:
                s.logprobs = []


class FakeEngine:
    def __init__(self, config: FakeEngineConfig | None = None, *, step_delay: float = 0.0,
                 fail_at_step: int | None = None, hang_at_step: int | None = None):
        self.config = config or FakeEngineConfig()
        self.tokenizer = FakeCharTokenizer()
        self.step_delay = step_delay
        self.fail_at_step = fail_at_step
        self.hang_at_step = hang_at_step
        self._raise_next = threading.Event()
        self._hang_next = threading.Event()
        self._unhang = threading.Event()
        self._stalled = False
        self.add_delay = 0.0  # seconds each add_request takes (admission races)
        self.poison: str | None = None  # a text prompt holding it fails its "detokenizer"
        self._request_errors: dict[str, Exception] = {}
        self.num_steps = 0
        self.free_blocks = self.config.num_blocks
        self._waiting: list[_Req] = []
        self._running: list[_Req] = []
        self._seen_blocks: set[tuple] = set()
        self.aborted: list[str] = []
        self.added: list[str] = []
        self.thread_ids: set[int] = set()  # threads that called into the engine
        self.stat_loggers: list = []
        self._prefix = [0, 0]  # prompt tokens looked up / hit since the last stats record
        self._stats_excluded: tuple[str, ...] = ()

    # ----- faults -------------------------------------------------------------------
    def inject_raise(self) -> None:
        self._raise_next.set()

    def inject_hang(self) -> None:
        self._unhang.clear()
        self._hang_next.set()

    def release_hang(self) -> None:
        self._unhang.set()

    def stall(self, on: bool = True) -> None:
        """``step`` keeps returning (the loop heartbeats) but generates nothing."""
        self._stalled = on

    # ----- interface ------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: Any, params: SamplingParams,
                    arrival_time: float | None = None, priority: int = 0) -> None:
        self.thread_ids.add(threading.get_ident())
        if self.add_delay:
            time.sleep(self.add_delay)
        if priority != 0:  # an fcfs engine, as LLMEngine's default
            raise ValueError(f"priority={priority} is invalid: scheduling_policy='fcfs' takes priority 0 only")
        params.validate(vocab_size=VOCAB_SIZE)
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        elif isinstance(prompt, dict):
            text, ids = None, list(prompt["prompt_token_ids"])
        else:
            text, ids = None, list(prompt)
        if not ids:
            raise ValueError("prompt=[] is invalid: must contain at least 1 token")
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < VOCAB_SIZE:
                raise ValueError(f"prompt_token_ids contains {t!r}, which is invalid: "
                                 f"token ids must be in [0, {VOCAB_SIZE})")
        limit = self.config.max_model_len
        if len(ids) >= limit:
            raise ValueError(f"prompt length={len(ids)} is invalid: must be < max_model_len={limit}")
        if any(r.request_id == request_id for r in self._waiting + self._running):
            raise ValueError(f"request_id={request_id!r} is invalid: already in use")
        self.added.append(request_id)
        self._waiting.append(_Req(request_id, text, ids, params,
                                  arrival_time if arrival_time is not None else time.time()))

    def abort_request(self, ids) -> None:
        self.thread_ids.add(threading.get_ident())
        ids = {ids} if isinstance(ids, str) else set(ids)
        it = IterationStats() if self.stat_loggers else None
        now = time.time()
        for lst in (self._waiting, self._running):
            for r in [r for r in lst if r.request_id in ids]:
                lst.remove(r)
                self._free(r)
                self.aborted.append(r.request_id)
                if it is not None and not r.request_id.startswith(self._stats_excluded):
                    for s in r.samples:
                        if s.finish_reason is None:
                            it.finished_requests.append(self._finished_stats(r, s, "abort", now))
        if it is not None:
            self._record(it)

    def add_stat_logger(self, logger) -> None:
        self.stat_loggers.append(logger)

    def exclude_from_stats(self, prefix: str) -> None:
        """As LLMEngine's: requests whose id starts with ``prefix`` add no request-level stats."""
        self._stats_excluded += (prefix,)

    def has_unfinished_requests(self) -> bool:
        return bool(self._waiting or self._running)

    def get_stats(self) -> EngineStats:
        return EngineStats(num_blocks=self.config.num_blocks, num_free_blocks=self.free_blocks,
                           num_running=len(self._running), num_waiting=len(self._waiting),
                           num_unfinished_requests=len(self._running) + len(self._waiting),
                           num_steps=self.num_steps)

    def step(self) -> list[RequestOutput]:
        self.thread_ids.add(threading.get_ident())
        self.num_steps += 1
        if self._raise_next.is_set() or (self.fail_at_step is not None
                                         and self.num_steps >= self.fail_at_step):
            self._raise_next.clear()
            raise RuntimeError(f"injected fault at step {self.num_steps}")
        if self._hang_next.is_set() or (self.hang_at_step is not None
                                        and self.num_steps == self.hang_at_step):
            self._hang_next.clear()
            self._unhang.wait()
        if self.step_delay:
            time.sleep(self.step_delay)
        if self._stalled:
            time.sleep(0.005)
            return []
        t0 = time.perf_counter()
        self._admit()
        outs = []
        it = IterationStats() if self.stat_loggers else None
        now = time.time()
        for r in list(self._running):
            try:
                for s in r.samples:
                    if s.finish_reason is None:
                        self._advance(r, s)
                        if it is not None and not r.request_id.startswith(self._stats_excluded):
                            self._token_stats(it, r, s, now)
            except Exception as exc:  # noqa: BLE001 - as LLMEngine: this request fails alone
                self._running.remove(r)
                self._free(r)
                self._request_errors[r.request_id] = exc
                continue
            done = all(s.finish_reason is not None for s in r.samples)
            if done:
                self._running.remove(r)
                self._free(r)
                r.metrics.finished_time = time.time()
            outs.append(self._output(r, done))
        if it is not None:
            it.num_batched_tokens = it.num_generation_tokens
            it.step_time, it.bucket = time.perf_counter() - t0, "none"
            self._record(it)
        return outs

    # ----- stats ------------------------------------------------------------------------
    def _token_stats(self, it: IterationStats, r: _Req, s: _Sample, now: float) -> None:
        it.num_generation_tokens += 1
        if s.last_token_time is None:
            it.time_to_first_tokens.append(now - r.metrics.arrival_time)
            it.num_prompt_tokens += len(r.prompt_token_ids)
        else:
            it.inter_token_latencies.append(now - s.last_token_time)
        s.last_token_time = now
        if s.finish_reason is not None:
            it.finished_requests.append(self._finished_stats(r, s, s.finish_reason, now))

    @staticmethod
    def _finished_stats(r: _Req, s: _Sample, reason: str, now: float) -> FinishedRequestStats:
        m = r.metrics
        scheduled = m.first_scheduled_time if m.first_scheduled_time is not None else now
        return FinishedRequestStats(reason, now - m.arrival_time, max(0.0, scheduled - m.arrival_time),
                                    len(r.prompt_token_ids), len(s.token_ids))

    def _record(self, it: IterationStats) -> None:
        (q, h), self._prefix = self._prefix, [0, 0]
        st = SchedulerStats(num_running_reqs=sum(len(r.samples) for r in self._running),
                            num_waiting_reqs=sum(len(r.samples) for r in self._waiting),
                            kv_cache_usage=1.0 - self.free_blocks / self.config.num_blocks,
                            prefix_cache_queries=q, prefix_cache_hits=h)
        for logger in self.stat_loggers:
            logger.record(st, it)

    # ----- internals --------------------------------------------------------------------
    def _blocks_for(self, n_tokens: int) -> int:
        return math.ceil(n_tokens / self.config.block_size)

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.config.max_num_seqs:
            r = self._waiting[0]
            need = self._blocks_for(len(r.prompt_token_ids) + 1) * len(r.samples)
            if need > self.free_blocks:
                break
            self._waiting.pop(0)
            self.free_blocks -= need
            for s in r.samples:
                s.blocks = need // len(r.samples)
            bs = self.config.block_size
            ids = r.prompt_token_ids
            cached = 0
            for b in range(len(ids) // bs):
                key = tuple(ids[: (b + 1) * bs])
                if key in self._seen_blocks:
                    cached = (b + 1) * bs
                else:
                    self._seen_blocks.add(key)
            r.num_cached_tokens = cached if self.config.enable_prefix_caching else 0
            if self.config.enable_prefix_caching:
                self._prefix[0] += len(ids)
                self._prefix[1] += cached
            r.metrics.first_scheduled_time = time.time()
            self._running.append(r)

    def evict_free_cached(self) -> int:
        """As LLMEngine's: forget the cached prefixes (the fake holds no blocks beyond requests)."""
        n, self._seen_blocks = len(self._seen_blocks), set()
        return n

    def take_request_errors(self) -> dict[str, Exception]:
        errors, self._request_errors = self._request_errors, {}
        return errors

    def _advance(self, r: _Req, s: _Sample) -> None:
        p, ids = r.params, r.prompt_token_ids
        if self.poison is not None and self.poison in (r.prompt or ""):
            raise UnicodeDecodeError("fake", b"\xff", 0, 1, f"poisoned prompt {self.poison!r}")
        k = len(s.token_ids)
        tok = ids[(s.index + k) % len(ids)]
        s.token_ids.append(tok)
        need = self._blocks_for(len(ids) + len(s.token_ids))
        if need > s.blocks:
            self.free_blocks -= need - s.blocks
            s.blocks = need
        lp = -0.5 - 0.01 * (tok % 7)
        s.cum_logprob += lp
        if s.logprobs is not None:
            d = {tok: Logprob(lp, 1, self.tokenizer.decode([tok], False))}
            for j in range(1, p.logprobs + 1):
                t = (tok + j) % 256
                d.setdefault(t, Logprob(lp - j, j + 1, self.tokenizer.decode([t], False)))
            s.logprobs.append(d)
        n = len(s.token_ids)
        piece = self.tokenizer.decode([tok], p.skip_special_tokens)
        s.text += piece
        if n >= p.min_tokens:
            if tok == EOS and not p.ignore_eos:
                s.finish_reason = "stop"
                return
            if p.stop_token_ids and tok in p.stop_token_ids:
                s.finish_reason, s.stop_reason = "stop", tok
                return
            for stop in p.stop_strings:
                at = s.text.find(stop)
                if at >= 0:
                    s.text = s.text[: at + len(stop)] if p.include_stop_str_in_output else s.text[:at]
                    s.finish_reason, s.stop_reason = "stop", stop
                    return
        if n >= p.max_tokens or len(ids) + n >= self.config.max_model_len:
            s.finish_reason = "length"

    def _output(self, r: _Req, finished: bool) -> RequestOutput:
        outs = [CompletionOutput(index=s.index, text=s.text, token_ids=list(s.token_ids),
                                 cumulative_logprob=s.cum_logprob,
                                 logprobs=list(s.logprobs) if s.logprobs is not None else None,
                                 finish_reason=s.finish_reason, stop_reason=s.stop_reason)
                for s in r.samples]
        plp = None
        if r.params.prompt_logprobs is not None:
            plp = [None] + [{t: Logprob(-1.0, 1, None)} for t in r.prompt_token_ids[1:]]
        return RequestOutput(request_id=r.request_id, prompt=r.prompt,
                             prompt_token_ids=list(r.prompt_token_ids), outputs=outs,
                             finished=finished, prompt_logprobs=plp,
                             num_cached_tokens=r.num_cached_tokens, metrics=r.metrics)

    def _free(self, r: _Req) -> None:
        for s in r.samples:
            self.free_blocks += s.blocks
            s.blocks = 0


def build_fake_engine(options: str = "") -> FakeEngine:
    """Build from ``"key=value,key=value"`` (the part after ``fake:`` in ``--model``).

    Engine keys: step_delay, fail_at_step, hang_at_step, build_delay; config keys: any
    FakeEngineConfig field (max_num_seqs, max_model_len, block_size, num_blocks, ...).
    """
    kw: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in options.split(","))):
        key, _, val = part.partition("=")
        kw[key.strip()] = val.strip()
    engine_kw = {}
    for key, conv in (("step_delay", float), ("fail_at_step", int), ("hang_at_step", int)):
        if key in kw:
            engine_kw[key] = conv(kw.pop(key))
    build_delay = float(kw.pop("build_delay", 0) or 0)
    cfg_fields = {f.name: f for f in msgspec.structs.fields(FakeEngineConfig)}
    cfg_kw = {}
    for key, val in kw.items():
        if key not in cfg_fields:
            raise ValueError(f"fake engine option {key!r} is invalid: unknown")
        default = cfg_fields[key].default
        cfg_kw[key] = (val.lower() in ("1", "true", "yes")) if isinstance(default, bool) else (
            int(val) if isinstance(default, int) else val)
    if build_delay:
        time.sleep(build_delay)
    return FakeEngine(FakeEngineConfig(**cfg_kw), **engine_kw)
