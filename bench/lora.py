"""Multi-LoRA throughput: 0, 1 and 4 adapters mixed in one batch, one engine, same run (issue 15).

    python bench/lora.py --model smollm2-135m --output-json /tmp/lora.json
    python bench/lora.py --dry-run --model dummy:tiny-llama   # writes and checks the adapters only
    # the GPU phase of bench/device_check.sh (Llama-2-13B shapes, dummy bf16 weights, rank-16 adapters):
    python bench/lora.py --model llama-2-13b --load-format dummy --dtype bfloat16 --plain-baseline \
        --kv-cache-memory-bytes 2147483648 --json OUT.json --json-key lora

One engine is built with ``enable_lora=True, max_loras=4`` (warm). ``--num-adapters`` random PEFT
adapters (rank ``--rank``, every projection q/k/v/o/gate/up/down, non-zero A and B) are written
to a temporary directory with numpy + safetensors + json directly (no peft/torch needed) and added
with ``add_lora``. Then, per mode, ``--batch`` requests (``--input-len`` random prompt tokens,
``--output-len`` greedy tokens, ignore_eos) are added together and stepped to the end:

- ``base``: every request on the base model (LoRA engine, adapters loaded, slots idle: its steps run
  the base-only program, the plain engine's, since the runner picks it per step);
- ``1 adapter``: every request on adapter 1;
- ``4 adapters``: request i on adapter i % 4, all four in one batch.

- ``plain`` (``--plain-baseline``): every request on a second engine built without ``enable_lora``
  (what enabling LoRA costs a step with no adapter: ~0 once the base-only program runs).

Modes run in rotated order ``--repeats`` times (median reported): output tokens/s over the whole
batch, and the decode step time (ms per step, steps with every request decoding). The overhead per
adapter is (mode step time - base step time) / base. ``compiles_after_warmup`` must be 0: mixing
adapters compiles nothing. Machine load is printed and stored (CPU numbers are noisy).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODES = (("base", 0), ("1 adapter", 1), ("4 adapters", 4))


def projection_shapes(mc) -> dict[str, tuple[int, int]]:
    """PEFT module name -> (in_features, out_features) of one layer's projections."""
    q, kv = mc.num_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim
    h, i = mc.hidden_size, mc.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def write_random_adapter(path: str, mc, rank: int, seed: int, alpha: float | None = None,
                         targets=TARGETS, scale: float = 0.02) -> str:
    """A PEFT LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``) with
    random, non-zero A and B for ``targets`` in every layer of a Llama-family model ``mc``."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    shapes = projection_shapes(mc)
    tensors = {}
    for layer in range(mc.num_layers):
        for t in targets:
            fan_in, fan_out = shapes[t]
            part = "self_attn" if t in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{t}"
            tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((rank, fan_in)) * scale).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = (rng.standard_normal((fan_out, rank)) * scale).astype(np.float32)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank,
              "lora_alpha": alpha if alpha is not None else 2 * rank, "lora_dropout": 0.0,
              "target_modules": list(targets), "bias": "none", "use_rslora": False,
              "fan_in_fan_out": False, "base_model_name_or_path": None}
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return path


def check_adapter(path: str, mc, rank: int) -> int:
    """Read an adapter back (the dry run): every tensor's shape, non-zero; returns the tensor count."""
    from safetensors.numpy import load_file

    with open(os.path.join(path, "adapter_config.json")) as f:
        cfg = json.load(f)
    tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
    shapes = projection_shapes(mc)
    assert cfg["r"] == rank and len(tensors) == 2 * mc.num_layers * len(cfg["target_modules"]), path
    for name, arr in tensors.items():
        module = name.split(".")[-3]
        fan_in, fan_out = shapes[module]
        want = (rank, fan_in) if ".lora_A." in name else (fan_out, rank)
        assert arr.shape == want and arr.any(), (name, arr.shape, want)
    return len(tensors)


def run_batch(engine, mode: int, loras: list, batch: int, input_len: int, output_len: int, vocab: int, rng) -> dict:
    """``batch`` requests added together (request i on adapter i % mode, none when mode == 0), run to
    the end: output tokens/s and the median decode step (every request decoding)."""
    from jaxllm.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0)
    t0 = time.perf_counter()
    for i in range(batch):
        prompt = {"prompt_token_ids": rng.integers(10, vocab, input_len).tolist()}
        lora = loras[i % mode] if mode else None
        if lora is None:
            engine.add_request(f"m{mode}-{i}", prompt, params)
        else:
            engine.add_request(f"m{mode}-{i}", prompt, params, lora_request=lora)
    steps, n_out = [], 0
    while engine.has_unfinished_requests():
        sched = engine.scheduler
        decode_only = sched.num_waiting == 0 and all(r.num_computed_tokens >= r.num_prompt_tokens
                                                     for r in sched.running)
        s0 = time.perf_counter()
        outs = engine.step()
        if decode_only:
            steps.append(time.perf_counter() - s0)
        n_out += sum(len(o.outputs[0].token_ids) for o in outs if o.finished)
    secs = time.perf_counter() - t0
    return {"tok_s": n_out / secs, "step_ms": 1e3 * statistics.median(steps) if steps else float("nan")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--rank", type=int, default=16, help="adapter rank (also max_lora_rank)")
    ap.add_argument("--num-adapters", type=int, default=4, help="adapters written and loaded (>= 4)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                    help="KV cache per engine (default: the engine's, 1 GiB on CPU)")
    ap.add_argument("--adapter-dir", default=None, help="write the adapters here (default: a temp dir)")
    ap.add_argument("--dry-run", action="store_true", help="write and check the adapters, build no engine")
    ap.add_argument("--plain-baseline", action="store_true",
                    help="also time a second engine built without enable_lora (mode 'plain')")
    ap.add_argument("--output-json")
    ap.add_argument("--json", help="merge the result into this JSON file under --json-key (device_check.sh)")
    ap.add_argument("--json-key", default="lora")
    args = ap.parse_args(argv)
    if args.num_adapters < 4:
        ap.error(f"--num-adapters={args.num_adapters} is invalid: the 4-adapter mode needs >= 4")

    from checkpoints import load_config

    mc, _ = load_config(args.model, args.load_format)
    tmp = None if args.adapter_dir else tempfile.TemporaryDirectory(prefix="jaxllm-lora-bench-")
    root = args.adapter_dir or tmp.name
    paths = [write_random_adapter(os.path.join(root, f"a{i + 1}"), mc, args.rank, seed=i + 1)
             for i in range(args.num_adapters)]
    if args.dry_run:
        n = sum(check_adapter(p, mc, args.rank) for p in paths)
        print(f"dry run: {len(paths)} adapters of rank {args.rank}, {n} tensors, under {root}")
        if tmp is not None:
            tmp.cleanup()
        return 0

    import numpy as np

    from bench.common import log_machine
    from jaxllm.config import EngineConfig
    from jaxllm.engine.factory import build_engine
    from jaxllm.lora import LoRARequest

    machine = log_machine()
    common = dict(model=args.model, load_format=args.load_format, dtype=args.dtype,
                  max_model_len=args.input_len + args.output_len + 16, max_num_seqs=args.batch,
                  max_num_batched_tokens=1024, kv_cache_memory_bytes=args.kv_cache_memory_bytes)
    engine = build_engine(EngineConfig(**common, enable_lora=True, max_loras=4, max_lora_rank=args.rank,
                                       max_cpu_loras=max(4, args.num_adapters)))
    plain = build_engine(EngineConfig(**common)) if args.plain_baseline else None
    loras = [LoRARequest(f"a{i + 1}", i + 1, p) for i, p in enumerate(paths)]
    for lora in loras:
        engine.add_lora(lora)
    vocab = engine.vocab_size
    rng = np.random.default_rng(0)
    modes = MODES + ((("plain", 0),) if plain is not None else ())
    for name, mode in modes:  # warm every path (slot loads, host caches) outside the timing
        run_batch(plain if name == "plain" else engine, mode, loras, min(args.batch, 4), 8, 4, vocab, rng)
    results: dict[str, list[dict]] = {name: [] for name, _ in modes}
    for rep in range(args.repeats):
        order = modes[rep % len(modes):] + modes[:rep % len(modes)]
        for name, mode in order:
            eng = plain if name == "plain" else engine
            r = run_batch(eng, mode, loras, args.batch, args.input_len, args.output_len, vocab, rng)
            results[name].append(r)
            print(json.dumps({"repeat": rep, "mode": name, **{k: round(v, 2) for k, v in r.items()}}), flush=True)
    compiles = sum(getattr(e.runner, "compile_count", 0) - e.compiles_at_warmup
                   for e in (engine, plain) if e is not None)
    rows = []
    base_ms = statistics.median(r["step_ms"] for r in results["base"])
    for name, mode in modes:
        ms = statistics.median(r["step_ms"] for r in results[name])
        rows.append({"mode": name, "adapters": mode,
                     "tok_s": round(statistics.median(r["tok_s"] for r in results[name]), 1),
                     "decode_step_ms": round(ms, 2),
                     "overhead_vs_base_pct": round(100 * (ms - base_ms) / base_ms, 1)})
    print(f"\nload {os.getloadavg()}, compiles after warm-up: {compiles}")
    for r in rows:
        print("  ".join(f"{k}={v}" for k, v in r.items()))
    doc = {"rows": rows, "compiles_after_warmup": compiles, "machine": machine, "args": vars(args),
           "load_after": os.getloadavg(), "engine_start_s": {"lora": engine.startup_seconds,
                                                             "plain": getattr(plain, "startup_seconds", None)}}
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(doc, f, indent=1)
    if args.json:
        from bench.common import merge_json

        merge_json(args.json, args.json_key, doc)
    if tmp is not None:
        tmp.cleanup()
    return 0 if compiles == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
