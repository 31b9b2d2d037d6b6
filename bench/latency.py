"""Single-request decode latency: jaxllm vs HF transformers generate() vs the weight-read floor.

    # issue 18 point 7's figure on this CPU (SmolLM2 fp32, one request, 128 prompt + 128 output tokens):
    python bench/latency.py --model smollm2-135m --baseline hf --output-json /tmp/latency.json

In one run on this machine, one request alone (batch 1), greedy, ignore_eos, prompt of --input-len
tokens drawn from the plain vocabulary (seeded), --output-len generated tokens:

- jaxllm: the engine is built and warm (one untimed request first); each of --repeats requests is
  submitted alone and the engine stepped until it finishes, stamping the time each new token comes
  out of LLMEngine.step (the streamed outputs). TTFT = first token - submission; decode ms/token =
  (last token - first token) / (n - 1), i.e. time per output token without the first.
- HF (--baseline hf): the same model through ``generate()`` at batch 1 (fp32 on CPU; the packaged
  GGUF, HF directory or .gguf loads as bench/throughput.py loads it; a --load-format dummy preset
  gets random weights of the same shapes), the same prompts and lengths, timed the same way by a
  streamer that stamps each token as generate() emits it. Torch threads: the faster of 1 and
  torch's default (--hf-threads).
- the weight-read floor: the bytes of weights one decode step must read (every layer's weights,
  the final norm and the LM head; a tied embedding counted once, as the LM head; an untied
  embedding table only by the one row it gathers) at the dtype in use, divided by this machine's
  measured read bandwidth (CPU: bench/cpu_roofline.py's large-array sum, best of numpy and torch;
  GPU: bench/attention_kernels.py's device copy, read + write bytes / time). With tensor parallelism on GPUs
  each device reads 1/tp of the bytes; forced CPU devices share one memory, so the CPU floor stays
  total bytes / bandwidth. KV-cache reads, activations and host time are ignored, so the floor is
  low (a lower bound no engine can beat).

Each figure is the median over the repeats. The table: ms/token, tok/s (1000 / ms), the fraction
of the floor reached (floor ms / ms), and the speed ratio vs HF (HF ms / ms). --output-json writes
{"rows": [...], "floor": {...}, "runs": {...}, "ratios": {...}, "machine": {...}}.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import format_table, log, loadavg, log_machine, synthetic_requests, write_json  # noqa: E402

COLUMNS = [("system", "system", ""), ("ms_per_token", "ms/token", ".2f"), ("tokens_per_s", "tok/s", ".1f"),
           ("ttft_ms", "TTFT ms", ".1f"), ("fraction_of_floor", "of floor", ".2f"),
           ("ratio_vs_hf", "vs HF", ".2f")]


def decode_timing(stamps: list[float], t_submit: float) -> dict:
    """Per-token stamps (one per generated token, perf_counter seconds) → TTFT and decode ms/token
    ((t_last - t_first) / (n - 1)), plus the median and p90 gap between consecutive tokens."""
    n = len(stamps)
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    ms = 1e3 * (stamps[-1] - stamps[0]) / (n - 1) if n > 1 else float("nan")
    return {"output_tokens": n, "ttft_ms": 1e3 * (stamps[0] - t_submit), "ms_per_token": ms,
            "itl_p50_ms": 1e3 * statistics.median(gaps) if gaps else float("nan"),
            "itl_max_ms": 1e3 * max(gaps) if gaps else float("nan")}


def median_run(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in ("ms_per_token", "ttft_ms", "itl_p50_ms")}


# ----- jaxllm -----------------------------------------------------------------------
def jaxllm_one(engine, request_id: str, prompt_ids: list[int], output_len: int) -> dict:
    """One request alone through LLMEngine.step, each new token stamped as it comes out."""
    from jaxllm.sampling_params import SamplingParams

    if engine.has_unfinished_requests():
        raise RuntimeError("the engine must be idle: this bench times one request alone")
    params = SamplingParams(max_tokens=output_len, min_tokens=0, ignore_eos=True, temperature=0.0)
    stamps: list[float] = []
    t_submit = time.perf_counter()
    engine.add_request(request_id, {"prompt_token_ids": prompt_ids}, params)
    finished = False
    while not finished:
        for out in engine.step():
            if out.request_id != request_id:
                continue
            now = time.perf_counter()
            n = len(out.outputs[0].token_ids)
            stamps.extend([now] * (n - len(stamps)))
            finished = out.finished
    if len(stamps) != output_len:
        raise RuntimeError(f"{request_id}: generated {len(stamps)} tokens, expected {output_len} "
                           f"(ignore_eos should force the length)")
    return decode_timing(stamps, t_submit)


def weight_read_bytes(config, dtype_bytes: int) -> dict:
    """Bytes of weights one decode step reads: all parameters, the LM head once (a tied embedding is
    the LM head), an untied embedding table only by its one gathered row."""
    import numpy as np

    from jaxllm.models.llama import param_shapes

    shapes = param_shapes(config)
    total = sum(int(np.prod(s)) for s in shapes.values())
    read = total if config.tie_word_embeddings else total - int(np.prod(shapes["embed"])) + config.hidden_size
    return {"params": total, "read_params": read, "dtype_bytes": dtype_bytes, "bytes": read * dtype_bytes,
            "tied_embeddings": bool(config.tie_word_embeddings)}


def measure_bandwidth(mib: int) -> dict:
    """This machine's read bandwidth: CPU, cpu_roofline's large-array sum (best of numpy and torch);
    GPU, attention_kernels.py's device-to-device copy (read + write bytes / time)."""
    import jax

    backend = jax.default_backend()
    if backend == "cpu":
        from bench.cpu_roofline import measure_read_bandwidth

        bw = measure_read_bandwidth(mib << 20)
        how = f"CPU read, {mib} MiB sum (numpy {bw['numpy'] / 1e9:.1f}, torch {bw['torch'] / 1e9:.1f} GB/s; best)"
        return {"bytes_per_s": max(bw.values()), "how": how, "backend": backend,
                **{f"{k}_bytes_per_s": v for k, v in bw.items()}}
    if backend == "gpu":
        from bench.attention_kernels import copy_bandwidth

        gbs = copy_bandwidth(mib << 20, iters=10)
        return {"bytes_per_s": gbs * 1e9, "how": f"device copy, {mib} MiB (read + write bytes / time)",
                "backend": backend}
    return {"bytes_per_s": None, "how": f"not measured on backend {backend!r}", "backend": backend}


# ----- HF transformers ----------------------------------------------------------------
class _TokenStamps:
    """A generate() streamer (transformers' BaseStreamer protocol) stamping each emitted token;
    generate's first put() is the prompt, not a token."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        now = time.perf_counter()
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.stamps.extend([now] * int(value.numel()))

    def end(self) -> None:
        pass


def hf_model_for(args, dtype: str, device: str):
    """The HF model of the engine's --model: the checkpoint as throughput.py loads it, or random
    weights of a --load-format dummy preset's shapes (device_e2e's builder)."""
    from checkpoints.loader import resolve

    fmt, path = resolve(args.model, args.load_format)
    if fmt == "dummy":
        from bench.device_e2e import hf_model

        return hf_model(path, device, dtype=dtype)
    if fmt == "orbax":
        raise SystemExit(f"--baseline hf: {args.model} is an Orbax directory; HF cannot load it (give the HF "
                         f"directory or .gguf it was converted from)")
    from bench.throughput import load_hf

    return load_hf(args.model, dtype).to(device)


def hf_one(model, prompt_ids: list[int], output_len: int, pad_id: int, device: str) -> dict:
    import torch

    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    streamer = _TokenStamps()
    with torch.inference_mode():
        t_submit = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len,
                             min_new_tokens=output_len, do_sample=False, pad_token_id=pad_id, use_cache=True,
                             streamer=streamer)
    if out.shape[1] != len(prompt_ids) + output_len or len(streamer.stamps) != output_len:
        raise RuntimeError(f"HF generated {out.shape[1] - len(prompt_ids)} tokens ({len(streamer.stamps)} "
                           f"streamed), expected {output_len}")
    return decode_timing(streamer.stamps, t_submit)


def run_hf(args, prompts: list[list[int]], warm_prompt: list[int]) -> tuple[list[dict], str]:
    import jax
    import torch

    from bench.throughput import pick_hf_threads

    on_gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if on_gpu else "float32")  # jaxllm's "auto"
    t0 = time.perf_counter()
    model = hf_model_for(args, dtype, device)
    pad_id = model.generation_config.pad_token_id
    if pad_id is None:
        eos = model.config.eos_token_id
        pad_id = (eos[0] if isinstance(eos, (list, tuple)) else eos) or 0
    hf_one(model, warm_prompt, min(4, args.output_len), pad_id, device)  # warm-up
    note = f"{dtype} on {device}"
    if device == "cpu":
        if args.hf_threads == "auto":
            n, timing = pick_hf_threads(model, sorted({1, torch.get_num_threads()}))
            note += f", torch threads {n} (auto; 1-token forward ms: " + ", ".join(
                f"{k} thr {1e3 * v:.1f}" for k, v in timing.items()) + ")"
        else:
            torch.set_num_threads(int(args.hf_threads))
            note += f", torch threads {args.hf_threads}"
    log(f"HF model loaded and warm in {time.perf_counter() - t0:.1f}s; {note}")
    runs = []
    for i, p in enumerate(prompts):
        runs.append(hf_one(model, p, args.output_len, pad_id, device))
        log(f"HF run {i + 1}/{len(prompts)}: {runs[-1]['ms_per_token']:.2f} ms/token, "
            f"TTFT {runs[-1]['ttft_ms']:.1f} ms")
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return runs, note


# ----- main -------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from jaxllm.generate import add_engine_args

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input-len", type=int, default=128, help="prompt tokens")
    ap.add_argument("--output-len", type=int, default=128, help="generated tokens (ignore_eos, greedy)")
    ap.add_argument("--repeats", type=int, default=3, help="timed requests per system (the median is reported)")
    ap.add_argument("--workload-seed", type=int, default=0, help="seed of the random prompts")
    ap.add_argument("--baseline", choices=["none", "hf"], default="none")
    ap.add_argument("--hf-threads", default="auto", help="torch threads, or 'auto' (the faster of 1 and torch's "
                    "default, timed on a 1-token forward)")
    ap.add_argument("--bandwidth-mib", type=int, default=1024, help="array size of the bandwidth measurement")
    ap.add_argument("--output-json", help='write {"rows": [...], "floor": {...}, "runs": {...}, "machine": {...}}')
    add_engine_args(ap)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.input_len < 1 or args.output_len < 2 or args.repeats < 1:
        raise SystemExit("need --input-len >= 1, --output-len >= 2 (decode ms/token needs two tokens), "
                         "--repeats >= 1")
    machine = log_machine()

    from bench.throughput import build_llm

    llm, startup = build_llm(args)
    engine = llm.engine
    # One prompt per request (the first warms up): no prefix-cache hit between repeats.
    reqs = synthetic_requests(args.repeats + 1, (args.input_len, args.input_len), (args.output_len, args.output_len),
                              engine.vocab_size, args.workload_seed)
    warm, prompts = reqs[0].prompt_token_ids, [r.prompt_token_ids for r in reqs[1:]]
    log(f"engine built in {startup:.1f}s; one request alone: {args.input_len} prompt + {args.output_len} output "
        f"tokens, {args.repeats} repeats")
    jaxllm_one(engine, "latency-warmup", warm, args.output_len)
    runs = {"jaxllm": []}
    for i, p in enumerate(prompts):
        runs["jaxllm"].append(jaxllm_one(engine, f"latency-{i}", p, args.output_len))
        log(f"jaxllm run {i + 1}/{args.repeats}: {runs['jaxllm'][-1]['ms_per_token']:.2f} ms/token, "
            f"TTFT {runs['jaxllm'][-1]['ttft_ms']:.1f} ms")
    import jax

    runner = engine.runner
    dtype_bytes = jax.numpy.dtype(runner.state_dtype).itemsize
    weights = weight_read_bytes(runner.model_config, dtype_bytes)
    tp = getattr(runner, "tensor_parallel_size", 1)
    del llm, engine, runner

    bw = measure_bandwidth(args.bandwidth_mib)
    per_device = weights["bytes"] / tp if bw["backend"] == "gpu" else weights["bytes"]
    floor_ms = 1e3 * per_device / bw["bytes_per_s"] if bw["bytes_per_s"] else None
    floor = {**weights, "tensor_parallel_size": tp, "bytes_per_device_step": per_device,
             "bandwidth_bytes_per_s": bw["bytes_per_s"], "bandwidth": bw["how"], "ms_per_token": floor_ms}
    log(f"weights read per step: {weights['bytes'] / 1e6:.1f} MB ({weights['read_params']} params x "
        f"{dtype_bytes} B); bandwidth {bw['how']}: "
        + (f"{bw['bytes_per_s'] / 1e9:.1f} GB/s -> floor {floor_ms:.2f} ms/token" if floor_ms else "not measured"))

    hf_note = None
    if args.baseline == "hf":
        runs["hf generate"], hf_note = run_hf(args, prompts, warm)

    rows = []
    for system, rs in runs.items():
        med = median_run(rs)
        rows.append({"system": system, **med, "tokens_per_s": 1e3 / med["ms_per_token"], "repeats": len(rs)})
    if floor_ms:
        rows.append({"system": "weight-read floor", "ms_per_token": floor_ms, "tokens_per_s": 1e3 / floor_ms})
    hf_ms = rows[1]["ms_per_token"] if args.baseline == "hf" else None
    for r in rows:
        r["fraction_of_floor"] = floor_ms / r["ms_per_token"] if floor_ms else None
        r["ratio_vs_hf"] = hf_ms / r["ms_per_token"] if hf_ms else None
    ratios = {}
    if hf_ms:
        ratios["jaxllm_vs_hf"] = rows[0]["ratio_vs_hf"]
    if floor_ms:
        ratios["jaxllm_fraction_of_floor"] = rows[0]["fraction_of_floor"]

    print()
    print(f"one request alone: {args.input_len} prompt + {args.output_len} output tokens, greedy; median of "
          f"{args.repeats}; ms/token = (last token - first token) / {args.output_len - 1}")
    print(format_table(rows, COLUMNS))
    print(f"floor: {weights['bytes'] / 1e6:.1f} MB of weights per step"
          + (f" (/{tp} per device)" if per_device != weights["bytes"] else "") + f" at {bw['how']}"
          + (f" = {bw['bytes_per_s'] / 1e9:.1f} GB/s" if bw["bytes_per_s"] else ""))
    if hf_note:
        print(f"HF generate: batch 1, {hf_note}")
    print(f"jaxllm engine start (load + warm-up compile): {startup:.1f}s; load average now {loadavg()}")
    if args.output_json:
        write_json(args.output_json, {
            "rows": rows, "floor": floor, "runs": runs, "ratios": ratios, "machine": machine,
            "workload": {"input_len": args.input_len, "output_len": args.output_len, "repeats": args.repeats,
                         "seed": args.workload_seed, "model": args.model},
            "engine_start_s": startup, "hf": hf_note, "load_after": loadavg()})
    return 0 if all(math.isfinite(r["ms_per_token"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
