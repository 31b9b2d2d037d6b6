"""Pick the decode attention kernel for an MHA model by measurement: the one-head kernel (decode.py) or
decode_mha.py's variant with G kv heads per program, timed on one layer's synthetic paged cache.

No engine knowledge here (the engine's glue, jaxllm/runner/decode_tuning.py, supplies the shapes):
- `candidate_groups(kvh, q_per_kv)`: None (the one-head kernel) then the distinct G of (8, 16, 32) as
  decode_mha runs them over kvh heads (`effective_group`); just [None] for a GQA model;
- `synthetic_decode_batch(...)`: a decode-only batch over a one-layer cache (bf16 / f16 / f32, or fp8
  bits with per-kv-head scales of their own), contexts drawn uniformly in [context / 2, context],
  each sequence's pages distinct and shuffled; `synthetic_cache_bytes` sizes it beforehand;
- `select_group(candidates, run, timer, ...)`: the one-head kernel's output is the reference; each
  other candidate is run, compared with it (`mismatch`: max |got - want| <= tol x max |want|, tol 2e-2
  for 16-bit or fp8 outputs, 2e-3 for f32, finite) and timed; a candidate that raises (lowering,
  compiling, running) or mismatches is dropped with one log line naming it and the error's first
  line. The fastest kept one wins if it beats the one-head kernel by MIN_GAIN (else the one-head
  kernel: a near tie would flip between starts, and each flip recompiles every step program, warm
  compile cache or not); the one-head kernel when every variant is dropped, or when the one-head
  kernel itself fails (then nothing is timed: the engine keeps its default);
- `tune_decode_group(q, cache, metadata, ...)`: the real path, each candidate jitted through
  `paged_decode_attention(mha_group=G or 0)`, timed by `median_ms`.

Cost is capped: at most MAX_CANDIDATES candidates, each WARMUP_CALLS calls then SAMPLES samples of
CALLS_PER_SAMPLE calls queued back to back and blocked on (the median sample / CALLS_PER_SAMPLE), and a
`budget_s` after which the candidates not yet started are dropped as skipped. On a GPU the compiles
dominate (one Triton kernel per candidate).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.attention.decode import paged_decode_attention
from pallas_kernels.attention.decode_mha import effective_group, resolve_mha_group
from pallas_kernels.kv_quant import is_fp8
from pallas_kernels.metadata import AttentionMetadata, KVCache

CANDIDATE_GROUPS = (8, 16, 32)
MAX_CANDIDATES = 4  # the one-head kernel + 3 head groups
WARMUP_CALLS = 3
SAMPLES = 10
CALLS_PER_SAMPLE = 3
BUDGET_S = 30.0  # candidates not started by then are skipped (the cold start's share)
MIN_GAIN = 0.03  # a variant replaces the one-head kernel only when at least this much faster
TOLERANCE = {"float32": 2e-3}  # of max |reference|; every other output dtype (bf16, f16): 2e-2
DEFAULT_TOLERANCE = 2e-2
FP8_BITS_MASK = 0xBF  # synthetic fp8 pages: random e4m3fn bits, exponent < 8 (|x| <= 1.875, no NaN)


def label(group: int | None) -> str:
    return "one-head" if group is None else f"G={group}"


@dataclasses.dataclass
class TuneResult:
    group: int | None  # the chosen head group; None = the one-head kernel
    times_ms: dict[str, float]  # label -> median ms per call, candidates that passed
    dropped: dict[str, str]  # label -> first line of the error (or the mismatch) that dropped it
    seconds: float  # the whole tuning, compiles included

    def describe(self) -> str:
        """"chose G=16 (0.41 ms vs 0.73 ms one-head) in 2.3 s" and what was timed / dropped."""
        one = self.times_ms.get(label(None))
        if one is None:
            head = "kept the one-head kernel (it failed to run: nothing timed)"
        elif self.group is None:
            head = f"chose the one-head kernel ({one:.2f} ms)"
        else:
            head = f"chose {label(self.group)} ({self.times_ms[label(self.group)]:.2f} ms vs {one:.2f} ms one-head)"
        timed = ", ".join(f"{k} {v:.2f} ms" for k, v in self.times_ms.items())
        dropped = "".join(f"; dropped {k}" for k in self.dropped)
        return f"{head} in {self.seconds:.1f} s [{timed}{dropped}]"

    def as_dict(self) -> dict:
        return {"group": self.group, "times_ms": dict(self.times_ms), "dropped": dict(self.dropped),
                "seconds": self.seconds}


def candidate_groups(num_kv_heads: int, q_per_kv: int, groups=CANDIDATE_GROUPS) -> list[int | None]:
    """[None (the one-head kernel), then each distinct G of `groups` as decode_mha runs it over
    `num_kv_heads` heads], at most MAX_CANDIDATES; [None] for GQA (q_per_kv != 1: no variant)."""
    out: list[int | None] = [None]
    for g in groups:
        g = resolve_mha_group(g, q_per_kv)  # validates; None for GQA
        if g is not None and (g := effective_group(g, num_kv_heads)) not in out:
            out.append(g)
    return out[:MAX_CANDIDATES]


def mismatch(got, want, tol: float | None = None) -> str | None:
    """None when `got` matches `want` (the one-head kernel's output): finite, same shape, max |got - want|
    <= tol x max |want| (tol from the dtype: TOLERANCE); else what differs, in one line."""
    if tol is None:
        tol = TOLERANCE.get(np.dtype(want.dtype).name, DEFAULT_TOLERANCE)
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    if got.shape != want.shape:
        return f"output shape {got.shape} != the one-head kernel's {want.shape}"
    if not np.isfinite(got).all():
        return f"{int((~np.isfinite(got)).sum())} non-finite outputs"
    scale = max(float(np.abs(want).max()), 1e-6)
    err = float(np.abs(got - want).max())
    if err > tol * scale:
        return f"max |diff| {err:.3g} > {tol:g} x max |one-head output| {scale:.3g}"
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def select_group(candidates: list[int | None], run: Callable, timer: Callable, *, tolerance: float | None = None,
                 log: Callable[[str], None] = print, budget_s: float = BUDGET_S,
                 clock: Callable[[], float] = time.perf_counter) -> TuneResult:
    """The selection: `run(group)` -> the candidate's output (may raise), `timer(group)` -> its ms per call
    (may raise). candidates[0] must be None: the one-head kernel, the reference and the fallback."""
    if not candidates or candidates[0] is not None:
        raise ValueError(f"candidates must start with None (the one-head kernel), got {candidates}")
    if len(candidates) > MAX_CANDIDATES:
        raise ValueError(f"{len(candidates)} candidates: at most {MAX_CANDIDATES} (the cold start's cap)")
    t0 = clock()
    times, dropped = {}, {}
    try:
        want = jax.block_until_ready(run(None))
        if not np.isfinite(np.asarray(want, np.float32)).all():
            raise FloatingPointError("non-finite outputs")
        times[label(None)] = float(timer(None))
    except Exception as e:  # noqa: BLE001 - the fallback is the kernel the engine runs anyway
        dropped[label(None)] = _first_line(e)
        log(f"one-head kernel failed, nothing timed: {dropped[label(None)]}")
        return TuneResult(None, times, dropped, clock() - t0)
    for group in candidates[1:]:
        name = label(group)
        if clock() - t0 > budget_s:
            dropped[name] = f"skipped: the tuning budget of {budget_s:g} s was spent"
            log(f"dropped {name}: {dropped[name]}")
            continue
        try:
            problem = mismatch(jax.block_until_ready(run(group)), want, tolerance)
            if problem is not None:
                raise AssertionError(f"mismatch against the one-head kernel: {problem}")
            times[name] = float(timer(group))
        except Exception as e:  # noqa: BLE001 - a variant that fails in any way is dropped, not fatal
            dropped[name] = _first_line(e)
            log(f"dropped {name}: {dropped[name]}")
    best = min((g for g in candidates if label(g) in times), key=lambda g: times[label(g)])
    if times[label(best)] > (1 - MIN_GAIN) * times[label(None)]:
        best = None  # within MIN_GAIN of the one-head kernel: keep it
    return TuneResult(best, times, dropped, clock() - t0)


def median_ms(fn: Callable[[], object], *, warmup: int = WARMUP_CALLS, samples: int = SAMPLES,
              calls: int = CALLS_PER_SAMPLE) -> float:
    """ms per call of `fn()`: `warmup` calls, then `samples` samples of `calls` calls queued back to back
    and blocked on; the median sample / calls (queued calls keep the host's dispatch latency out)."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        jax.block_until_ready([fn() for _ in range(calls)])
        times.append((time.perf_counter() - t0) / calls)
    return 1e3 * float(np.median(times))


def synthetic_cache_bytes(num_seqs: int, context: int, block_size: int, num_kv_heads: int, head_dim: int,
                          cache_dtype) -> int:
    """Bytes of `synthetic_decode_batch`'s K and V pages (one layer) for these shapes."""
    blocks = num_seqs * -(-context // block_size) + 1
    return KVCache.bytes_per_block(1, block_size, num_kv_heads, head_dim, cache_dtype) * blocks


def synthetic_decode_batch(*, num_seqs: int, num_kv_heads: int, head_dim: int, block_size: int, max_blocks: int,
                           context: int, cache_dtype, q_dtype, q_per_kv: int = 1,
                           seed: int = 0) -> tuple[jax.Array, KVCache, AttentionMetadata]:
    """A decode-only batch of `num_seqs` sequences over a one-layer paged cache: contexts uniform in
    [max(1, context // 2), context] (capped by the table), pages of each sequence distinct and shuffled
    (block tables [S, max_blocks], entries past a context 0), K / V / q N(0, 1) in their dtypes. An fp8
    `cache_dtype`: pages of random e4m3fn bits (|x| <= 1.875: FP8_BITS_MASK), scales [1, kvh] f32 of
    their own per head (uniform in [0.5, 2]). -> (q [S, H, d], cache, metadata)."""
    rng = np.random.default_rng(seed)
    context = max(1, min(int(context), max_blocks * block_size))
    ctx = rng.integers(max(1, context // 2), context + 1, num_seqs).astype(np.int32)  # [S] i32
    need = -(-ctx // block_size)  # [S] pages per sequence
    num_blocks = int(need.sum()) + 1  # block 0: what the unused table entries point at
    pages = rng.permutation(np.arange(1, num_blocks, dtype=np.int32))
    tables = np.zeros((num_seqs, max_blocks), np.int32)  # [S, MB] i32
    start = np.concatenate([[0], np.cumsum(need)])
    for s in range(num_seqs):
        tables[s, :need[s]] = pages[start[s]:start[s + 1]]
    shape = (1, num_blocks, block_size, num_kv_heads, head_dim)
    keys = jax.random.split(jax.random.key(seed), 3)
    fp8 = is_fp8(cache_dtype)

    @jax.jit
    def page(key):  # [1, NB, bs, kvh, d]: one jitted fill on the device, no f32 transient of its size
        if fp8:  # e4m3fn bits with the exponent's top bit clear: |x| <= 1.875, never NaN
            return jax.random.bits(key, shape, jnp.uint8) & jnp.uint8(FP8_BITS_MASK)
        return jax.random.normal(key, shape, cache_dtype)

    k, v = page(keys[0]), page(keys[1])
    scales = ()
    if fp8:  # [1, kvh] f32 each, a scale per head: a kernel applying another head's scale mismatches
        scales = tuple(jnp.asarray(rng.uniform(0.5, 2.0, (1, num_kv_heads)), jnp.float32) for _ in "kv")
    cache = KVCache(k, v, *scales)
    q = jax.random.normal(keys[2], (num_seqs, num_kv_heads * q_per_kv, head_dim), q_dtype)  # [S, H, d]
    metadata = AttentionMetadata(
        slot_mapping=jnp.full((num_seqs,), -1, jnp.int32), block_tables=jnp.asarray(tables),
        context_lens=jnp.asarray(ctx), cu_q_lens=jnp.arange(num_seqs + 1, dtype=jnp.int32), decode_only=True)
    return q, cache, metadata


def decode_call(group: int | None, q, cache: KVCache, metadata: AttentionMetadata, *, interpret: bool = False,
                **attn) -> Callable[[], jax.Array]:
    """`paged_decode_attention` with head group `group` (None: the one-head kernel) on these inputs,
    jitted: a thunk the tuner runs and times. `attn`: sm_scale, sliding_window, soft_cap."""
    fn = jax.jit(lambda q, c, m: paged_decode_attention(q, c, 0, m, interpret=interpret, mha_group=group or 0, **attn))
    return lambda: fn(q, cache, metadata)


def tune_decode_group(q, cache: KVCache, metadata: AttentionMetadata, candidates: list[int | None], *,
                      interpret: bool = False, log: Callable[[str], None] = print, budget_s: float = BUDGET_S,
                      make_call: Callable = decode_call, samples: int = SAMPLES, **attn) -> TuneResult:
    """`select_group` over `candidates` with the real kernels (`make_call(group, q, cache, metadata, ...)`
    -> a thunk; tests wrap it) timed by `median_ms`. Each candidate compiles once."""
    calls = {}

    def call(group):
        if group not in calls:
            calls[group] = make_call(group, q, cache, metadata, interpret=interpret, **attn)
        return calls[group]

    return select_group(candidates, lambda g: call(g)(), lambda g: median_ms(call(g), samples=samples),
                        log=log, budget_s=budget_s)
