"""Offline throughput, like vLLM's benchmark_throughput: jaxllm vs HF transformers generate().

    # the issue-4 comparison on this CPU (SmolLM2 fp32, 64 requests, seeded, ignore_eos):
    python bench/throughput.py --model smollm2-135m --num-prompts 64 --input-len 64..512 \\
        --output-len 64..256 --baseline hf --hf-batch-size 8 --output-json /tmp/tp.json

Workload: --num-prompts synthetic requests (prompt tokens drawn uniformly from the plain vocabulary,
lengths uniform in the inclusive ranges, --seed) or --dataset PATH (JSONL with "prompt" or
"prompt_token_ids", optional "output_len"). Every request generates exactly its output length
(ignore_eos, greedy unless --temperature).

jaxllm: all requests submitted at once to one engine (continuous batching); the clock starts after
the engine is built and warm. HF (--baseline hf, same model, fp32, same run): ``generate()`` at
batch 1 over the first --hf-batch1-requests requests, and naive static batching of
--hf-batch-size over the first --hf-batched-requests (left padding, every batch runs to its
longest output); both count only the requested output tokens. The HF subsets are the workload's
first requests (a seeded sample); rates (tok/s) compare across subsets, the table names them.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (BenchRequest, add_workload_args, jsonl_requests, log, loadavg, log_machine,  # noqa: E402
                          parse_range, print_results, workload_from_args, write_json)

COLUMNS = [("system", "system", ""), ("requests", "reqs", ""), ("batch", "batch", ""),
           ("prompt_tokens", "prompt tok", ""), ("output_tokens", "output tok", ""),
           ("elapsed_s", "secs", ".1f"), ("requests_per_s", "req/s", ".3f"),
           ("output_tokens_per_s", "output tok/s", ".1f"), ("total_tokens_per_s", "total tok/s", ".1f")]


def make_row(system: str, reqs: list[BenchRequest], elapsed: float, batch, note: str = "", **extra) -> dict:
    p = sum(r.prompt_len for r in reqs)
    o = sum(r.output_len for r in reqs)
    return {"system": system, "requests": len(reqs), "batch": batch, "prompt_tokens": p, "output_tokens": o,
            "elapsed_s": elapsed, "requests_per_s": len(reqs) / elapsed, "output_tokens_per_s": o / elapsed,
            "total_tokens_per_s": (p + o) / elapsed, "note": note, **extra}


# ----- jaxllm -----------------------------------------------------------------------
def build_llm(args):
    import msgspec

    from jaxllm.generate import engine_config_from_args
    from jaxllm.llm import LLM

    t0 = time.perf_counter()
    llm = LLM(**msgspec.structs.asdict(engine_config_from_args(args)))
    return llm, time.perf_counter() - t0


def sampling_params(r: BenchRequest, temperature: float, seed: int | None = None):
    from jaxllm.sampling_params import SamplingParams

    return SamplingParams(max_tokens=r.output_len, min_tokens=0, ignore_eos=True, temperature=temperature,
                          seed=seed)


def run_jaxllm(llm, reqs: list[BenchRequest], temperature: float) -> tuple[float, list]:
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in reqs]
    params = [sampling_params(r, temperature, seed=i) for i, r in enumerate(reqs)]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    for r, o in zip(reqs, outs):
        got = len(o.outputs[0].token_ids)
        if got != r.output_len:
            raise RuntimeError(f"request {o.request_id}: generated {got} tokens, expected {r.output_len} "
                               f"(ignore_eos should force the length)")
    return elapsed, outs


def profile_jaxllm(llm, reqs: list[BenchRequest], temperature: float, log_dir: str, steps: int) -> dict | None:
    """A separate pass (the timed run stays untraced): submit the workload, trace `steps`
    steady-state decode steps, then abort what is left."""
    from jaxllm.profiling import EngineProfiler

    eng = llm.engine
    ids = []
    for i, r in enumerate(reqs):
        rid = f"profile-{i}"
        eng.add_request(rid, {"prompt_token_ids": r.prompt_token_ids}, sampling_params(r, temperature, seed=i))
        ids.append(rid)
    prof = EngineProfiler(eng, log_dir, num_steps=steps)
    try:
        while eng.has_unfinished_requests() and prof.state != "done":
            eng.step()
    finally:
        result = prof.finish()
        eng.abort_request(ids)
    return result


# ----- HF transformers ----------------------------------------------------------------
def load_hf(model: str, dtype: str):
    import torch
    import transformers

    from checkpoints.loader import PACKAGED_MODELS, packaged_model_path

    tdtype = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16,
              "float16": torch.float16}[dtype]
    if model in PACKAGED_MODELS:
        path = packaged_model_path(model)
        m = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                              dtype=tdtype)
    elif model.endswith(".gguf"):
        m = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(model) or ".",
                                                              gguf_file=os.path.basename(model), dtype=tdtype)
    else:
        m = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=tdtype)
    m.eval()
    return m


def hf_generate(model, reqs: list[BenchRequest], batch_size: int, pad_id: int, device: str = "cpu") -> float:
    """Naive static batching: groups of batch_size in order, left-padded, each group runs
    max(output_len) new tokens (everyone waits for the longest). Greedy. Returns seconds."""
    import torch

    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(reqs), batch_size):
            group = reqs[i:i + batch_size]
            width = max(r.prompt_len for r in group)
            ids = torch.full((len(group), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(group), width), dtype=torch.long)
            for j, r in enumerate(group):
                ids[j, width - r.prompt_len:] = torch.tensor(r.prompt_token_ids)
                mask[j, width - r.prompt_len:] = 1
            n_new = max(r.output_len for r in group)
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=n_new,
                                 min_new_tokens=n_new, do_sample=False, pad_token_id=pad_id, use_cache=True)
            if out.shape[1] != width + n_new:
                raise RuntimeError(f"HF generated {out.shape[1] - width} tokens, expected {n_new}")
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def hf_warmup(model, pad_id: int) -> None:
    hf_generate(model, [BenchRequest([pad_id + 1] * 8, 2)], 1, pad_id)


def pick_hf_threads(model, candidates) -> tuple[int, dict]:
    """HF at its best: time a 1-token forward with a 64-token KV cache under each torch thread
    count and keep the fastest. (With the cores oversubscribed by other processes, OpenMP's
    barriers make 2 threads up to 10x slower than 1.)"""
    import torch

    times = {}
    x = torch.full((1, 64), min(1000, model.config.vocab_size - 1), dtype=torch.long)  # tiny vocabularies too
    with torch.inference_mode():
        for n in candidates:
            torch.set_num_threads(n)
            out = model(x, use_cache=True)
            best = float("inf")
            for _ in range(5):
                t0 = time.perf_counter()
                model(x[:, :1], past_key_values=out.past_key_values, use_cache=True)
                best = min(best, time.perf_counter() - t0)
            times[n] = best
    n = min(times, key=times.get)
    torch.set_num_threads(n)
    return n, times


# ----- main -------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from jaxllm.generate import add_engine_args

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(ap)
    ap.add_argument("--dataset", help="JSONL of prompts instead of the synthetic workload")
    ap.add_argument("--workload-seed", type=int, default=0)
    ap.add_argument("--temperature", type=float, default=0.0, help="jaxllm sampling temperature (HF is greedy)")
    ap.add_argument("--baseline", choices=["none", "hf"], default="none")
    ap.add_argument("--hf-batch-size", type=int, default=8, help="naive static batch size")
    ap.add_argument("--hf-batch1-requests", type=int, default=8, help="HF batch-1 subset (first N requests)")
    ap.add_argument("--hf-batched-requests", type=int, default=16, help="HF batched subset (first N requests)")
    ap.add_argument("--hf-threads", default="auto", help="torch threads, or 'auto' (the faster of 1 and torch's "
                    "default, timed on a 1-token forward)")
    ap.add_argument("--output-json", help='write {"rows": [...], "ratios": {...}, "machine": {...}}')
    ap.add_argument("--profile", metavar="DIR", help="after the timed run, trace steady-state decode steps")
    ap.add_argument("--profile-steps", type=int, default=20)
    add_engine_args(ap)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    machine = log_machine()

    llm, startup = build_llm(args)
    vocab = llm.engine.vocab_size
    if args.dataset:
        reqs = jsonl_requests(args.dataset, llm.get_tokenizer(), parse_range(args.output_len), args.workload_seed,
                              args.num_prompts)
    else:
        reqs = workload_from_args(args, vocab, args.workload_seed)
    log(f"workload: {len(reqs)} requests, {sum(r.prompt_len for r in reqs)} prompt / "
        f"{sum(r.output_len for r in reqs)} output tokens; engine built in {startup:.1f}s")

    rows = []
    elapsed, _ = run_jaxllm(llm, reqs, args.temperature)
    stats = llm.engine.get_stats()
    rows.append(make_row("jaxllm", reqs, elapsed, f"<={args.max_num_seqs} (continuous)",
                         note=f"{stats['num_steps']} engine steps, {stats['num_preemptions']} preemptions",
                         engine_start_s=startup, load_after=loadavg()))
    log(f"jaxllm: {rows[-1]['output_tokens_per_s']:.1f} output tok/s ({elapsed:.1f}s)")

    profile = None
    if args.profile:
        profile = profile_jaxllm(llm, reqs, args.temperature, args.profile, args.profile_steps)
    del llm

    if args.baseline == "hf":
        import torch

        if args.dtype not in ("auto", "float32"):
            log(f"note: HF runs in {args.dtype} too")
        t0 = time.perf_counter()
        model = load_hf(args.model, args.dtype)
        pad_id = model.generation_config.pad_token_id
        if pad_id is None:
            eos = model.config.eos_token_id
            pad_id = (eos[0] if isinstance(eos, (list, tuple)) else eos) or 0
        hf_warmup(model, pad_id)
        if args.hf_threads == "auto":
            n_threads, timing = pick_hf_threads(model, sorted({1, torch.get_num_threads()}))
            hf_threads_note = f"torch threads {n_threads} (auto; 1-token forward ms: " + ", ".join(
                f"{k} thr {1e3 * v:.1f}" for k, v in timing.items()) + ")"
        else:
            torch.set_num_threads(int(args.hf_threads))
            hf_threads_note = f"torch threads {args.hf_threads}"
        log(f"HF model loaded in {time.perf_counter() - t0:.1f}s; {hf_threads_note}")
        sub1 = reqs[:args.hf_batch1_requests]
        if sub1:
            secs = hf_generate(model, sub1, 1, pad_id)
            rows.append(make_row("hf generate", sub1, secs, 1, note=f"first {len(sub1)} requests; {hf_threads_note}",
                                 load_after=loadavg()))
            log(f"HF batch 1: {rows[-1]['output_tokens_per_s']:.1f} output tok/s ({secs:.1f}s)")
        subb = reqs[:args.hf_batched_requests]
        if subb:
            secs = hf_generate(model, subb, args.hf_batch_size, pad_id)
            rows.append(make_row("hf generate", subb, secs, args.hf_batch_size,
                                 note=f"first {len(subb)} requests, static batches (left pad, wait for longest); {hf_threads_note}",
                                 load_after=loadavg()))
            log(f"HF batch {args.hf_batch_size}: {rows[-1]['output_tokens_per_s']:.1f} output tok/s ({secs:.1f}s)")

    ratios = {}
    jax_tps = rows[0]["output_tokens_per_s"]
    for r in rows[1:]:
        ratios[f"jaxllm_vs_hf_batch{r['batch']}"] = jax_tps / r["output_tokens_per_s"]

    print()
    print_results(rows, COLUMNS, ratios, ratio_unit=" (output tok/s)")
    print(f"jaxllm engine start (load + warm-up compile): {startup:.1f}s; load average now {loadavg()}")
    if profile:
        print(f"profile: {profile['num_steps']} steps in {profile['log_dir']} "
              f"(mean step {1e3 * (profile['mean_step_s'] or 0):.2f} ms)")
    if args.output_json:
        write_json(args.output_json, {"rows": rows, "ratios": ratios, "machine": machine,
                                      "workload": {"num_prompts": len(reqs), "input_len": args.input_len,
                                                   "output_len": args.output_len, "seed": args.workload_seed,
                                                   "dataset": args.dataset},
                                      "profile": profile})
    return 0


if __name__ == "__main__":
    sys.exit(main())
