"""Engine host time per step, without a device: scheduler, output processing, incremental
detokenization and stop checks around a stub runner that samples instantly.

    JAX_PLATFORMS=cpu python bench/host_overhead.py                  # 64 sequences, SmolLM2's tokenizer
    JAX_PLATFORMS=cpu python bench/host_overhead.py --num-seqs 1 --steps 200
    JAX_PLATFORMS=cpu python bench/host_overhead.py --num-adapters 4   # LoRA bookkeeping on top
    JAX_PLATFORMS=cpu python bench/host_overhead.py --scheduling-policy priority --priorities 8
    JAX_PLATFORMS=cpu python bench/host_overhead.py --bad-words " the" --bad-words "once upon"
    JAX_PLATFORMS=cpu python bench/host_overhead.py --num-seqs 256 --steps 400 --gc   # full-collection stalls, as the servers run (frozen start-up heap) and not
    JAX_PLATFORMS=cpu python bench/host_overhead.py --num-seqs 256 --steps 50 --context 1000 --context 2000 --split
        # long contexts (random prompts of N token ids), each step split into scheduler (of which the block
        # tables it reads), the runner's build_inputs (which the stub runner then runs) and the rest

On an accelerator this time sits between device steps unless it is overlapped, so it bounds
batch-1 latency from below; the runner's own host work (input building, dispatch) comes on top.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class InstantRunner:
    """The runner protocol with no model: every sampled row gets a random ordinary token. With a ``timer``
    (``--split``) it first builds the step's input arrays as the model runner does (runner/inputs.build_inputs)
    and adds their time to ``timer["build_inputs"]``."""

    def __init__(self, vocab_size: int, max_num_seqs: int, num_blocks: int = 8192, block_size: int = 16,
                 timer: dict | None = None, max_model_len: int = 4096):
        self.vocab_size, self.max_num_seqs = vocab_size, max_num_seqs
        self.num_blocks, self.block_size = num_blocks, block_size
        self.rng = random.Random(0)
        self.timer, self.max_model_len = timer, max_model_len
        self.rows: dict[str, int] = {}

    def release(self, request_ids) -> None:
        pass

    def set_lora(self, slot: int, adapter) -> None:  # --num-adapters: the slot write costs nothing here
        pass

    def execute(self, out):
        from jaxllm.engine.runner_protocol import SampledToken

        if self.timer is not None and out.seqs:
            self._build_inputs(out.seqs)

        return {s.request_id: SampledToken(self.rng.randrange(200, min(20000, self.vocab_size)), -1.0, None)
                for s in out.seqs if s.sample}

    def _build_inputs(self, seqs) -> None:
        from jaxllm.runner.inputs import build_inputs

        for rid in set(self.rows) - {s.request_id for s in seqs}:  # (nothing finishes in the timed steps)
            del self.rows[rid]
        free = sorted(set(range(self.max_num_seqs)) - set(self.rows.values()), reverse=True)
        rows = [self.rows[s.request_id] if s.request_id in self.rows else self.rows.setdefault(s.request_id, free.pop())
                for s in seqs]
        T = sum(len(s.token_ids) for s in seqs)
        t0 = time.perf_counter()
        build_inputs(seqs, rows, self.max_num_seqs + 1, [2], T, len(seqs), T == len(seqs), self.block_size,
                     -(-self.max_model_len // self.block_size), self.max_model_len, [], vocab_size=self.vocab_size)
        self.timer["build_inputs"] += time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="whose tokenizer to use")
    ap.add_argument("--num-seqs", type=int, default=64)
    ap.add_argument("--steps", type=int, default=100, help="timed decode steps")
    ap.add_argument("--stop", action="append", default=None, help="stop strings (default: one that never matches)")
    ap.add_argument("--num-adapters", type=int, default=0,
                    help="sequence i runs with LoRA adapter i %% N (stub adapters, max_loras=N; default: 0, the base model)")
    ap.add_argument("--scheduling-policy", choices=("fcfs", "priority"), default="fcfs",
                    help="the engine's policy (default: fcfs)")
    ap.add_argument("--priorities", type=int, default=1,
                    help="with --scheduling-policy priority: sequence i gets priority (7 * i) %% N, so the "
                         "running order is not the arrival order (default: 1, all 0)")
    ap.add_argument("--bad-words", action="append", default=None,
                    help="bad_words of every sequence, repeatable (default: none)")
    ap.add_argument("--output-kind", choices=("cumulative", "delta", "final_only"), default="cumulative",
                    help="SamplingParams.output_kind of every request (LLM.generate asks final_only)")
    ap.add_argument("--gc", action="store_true",
                    help="run twice, without and with the start-up heap frozen (engine/gc_heap.py), and report "
                         "the garbage collector's full-collection pauses in the timed steps")
    ap.add_argument("--context", type=int, action="append", default=None,
                    help="prompts of N random token ids (distinct per sequence) instead of the short text one; "
                         "repeatable: one run per N (default: the ~50-token text prompt)")
    ap.add_argument("--split", action="store_true",
                    help="the stub runner also builds each step's input arrays (runner/inputs.build_inputs); report "
                         "per step the scheduler's time (of which the block tables it reads: KVCacheManager."
                         "block_table / group_block_tables), "
                         "build_inputs' and the rest's (output processing, detokenization, stop checks)")
    args = ap.parse_args(argv)
    for context in args.context or [None]:
        if args.gc:
            for freeze in (False, True):
                run(args, freeze, context)
        else:
            run(args, None, context)
    return 0


def _timed(fn, timer: dict, key: str):
    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            timer[key] += time.perf_counter() - t0
    return wrapper


def run(args, freeze: bool | None, context: int | None = None) -> None:
    """One engine, one timed run. freeze: None = leave the collector alone (no report); False/True =
    report its full collections, with the start-up heap frozen (as the servers run) when True.
    context: prompts of that many random token ids (None: the short text prompt)."""
    import gc

    from checkpoints import load_checkpoint, load_tokenizer
    from jaxllm.config import EngineConfig
    from jaxllm.engine.engine import LLMEngine
    from jaxllm.sampling_params import RequestOutputKind, SamplingParams

    ckpt = load_checkpoint(args.model, "auto")
    tok = load_tokenizer(ckpt.tokenizer_source, ckpt.config)
    del ckpt
    n_ad = args.num_adapters
    max_len = max(4096, (context or 0) + args.steps + 16)
    cfg = EngineConfig(model=args.model, max_model_len=max_len, max_num_seqs=args.num_seqs,
                       max_num_batched_tokens=8192, enable_lora=n_ad > 0, max_loras=max(n_ad, 1),
                       scheduling_policy=args.scheduling_policy).validate()
    # every sequence's whole context fits at once (+ a request's worth of slack)
    num_blocks = max(8192, (args.num_seqs + 1) * -(-max_len // 16))
    timer = {"schedule": 0.0, "block_ids": 0.0, "build_inputs": 0.0} if args.split else None
    engine = LLMEngine(cfg, InstantRunner(tok.vocab_size, args.num_seqs, num_blocks, timer=timer, max_model_len=max_len),
                       tok, lora_load_fn=(lambda lora: lora.lora_name) if n_ad else None)
    from jaxllm.lora import LoRARequest

    loras = [LoRARequest(f"a{k}", k + 1, f"/stub/a{k}") for k in range(n_ad)]
    for i in range(args.num_seqs):
        prompt = "Once upon a time " * 10
        if context:
            r = random.Random(i)
            prompt = [r.randrange(200, min(20000, tok.vocab_size)) for _ in range(context)]
        engine.add_request(f"r{i}", prompt,
                           SamplingParams(max_tokens=args.steps + 10, ignore_eos=True, temperature=0.8, seed=i,
                                          output_kind=RequestOutputKind[args.output_kind.upper()],
                                          stop=args.stop or ["\x00never\x00"], bad_words=args.bad_words),
                           lora_request=loras[i % n_ad] if n_ad else None,
                           **({"priority": (7 * i) % args.priorities} if args.priorities > 1 else {}))
    engine.step()  # the prefill step(s): until every sequence decodes
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.requests.values()):
        engine.step()
    if timer is not None:
        sched, kv = engine.scheduler, engine.kv
        sched.schedule = _timed(sched.schedule, timer, "schedule")
        # the tables the scheduler reads per seq (before the incremental tables: the get_* rebuilds)
        for name in (("block_table", "group_block_tables") if hasattr(kv, "block_table")
                     else ("get_block_ids", "get_group_block_ids")):
            setattr(kv, name, _timed(getattr(kv, name), timer, "block_ids"))
    parts = {k: [] for k in ("schedule", "block_ids", "build_inputs", "rest")}
    pauses, started = [], [0.0]

    def on_gc(phase, info):  # generation-2 (full) collections only
        if info["generation"] == 2:
            if phase == "start":
                started[0] = time.perf_counter()
            else:
                pauses.append(time.perf_counter() - started[0])

    if freeze:
        from jaxllm.engine.gc_heap import freeze_startup_heap
        frozen = freeze_startup_heap()
    if freeze is not None:
        gc.callbacks.append(on_gc)
    times = []
    for _ in range(args.steps):
        if timer is not None:
            timer.update(dict.fromkeys(timer, 0.0))
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
        if timer is not None:
            for k in timer:
                parts[k].append(timer[k])
            parts["rest"].append(times[-1] - timer["schedule"] - timer["build_inputs"])
    times.sort()
    extra = (f", {n_ad} adapters" if n_ad else "") + (
        f", priority ({args.priorities} levels)" if args.scheduling_policy == "priority" else "") + (
        f", {len(args.bad_words)} bad words" if args.bad_words else "") + (
        f", output_kind {args.output_kind}" if args.output_kind != "cumulative" else "") + (
        f", {context}-token prompts" if context else "")
    print(f"{args.num_seqs} sequences, {args.steps} decode steps" + extra
          + f": host time per step median "
          f"{1e3 * statistics.median(times):.2f} ms, p90 {1e3 * times[int(0.9 * (len(times) - 1))]:.2f} ms "
          f"({1e6 * statistics.median(times) / args.num_seqs:.0f} us per sequence)")
    if timer is not None:
        med = {k: 1e3 * statistics.median(v) for k, v in parts.items()}
        print(f"  split, medians per step: scheduler {med['schedule']:.2f} ms (of which block tables "
              f"{med['block_ids']:.2f} ms), build_inputs {med['build_inputs']:.2f} ms, rest {med['rest']:.2f} ms "
              f"(output processing, detokenization, stop checks)")
    if freeze is not None:
        gc.callbacks.remove(on_gc)
        print(f"  start-up heap {'frozen (' + str(frozen) + ' objects)' if freeze else 'not frozen'}: "
              f"{len(gc.get_objects())} objects tracked; slowest step {1e3 * times[-1]:.1f} ms; "
              f"{len(pauses)} full collections in the timed steps"
              + (f", {1e3 * max(pauses):.1f} ms the longest, {1e3 * sum(pauses):.1f} ms in all" if pauses else ""))
        gc.unfreeze()
    engine.abort_request([f"r{i}" for i in range(args.num_seqs)])


if __name__ == "__main__":
    sys.exit(main())
