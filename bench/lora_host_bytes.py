"""Host bytes of one loaded LoRA adapter in the engine's host cache (what ``max_cpu_loras`` entries cost).

    python bench/lora_host_bytes.py --model smollm2-135m --load-format dummy --rank 8 --max-lora-rank 64

Writes a random PEFT adapter (rank ``--rank``, all seven projections: bench/lora.py's writer), builds
an engine with ``enable_lora=True, max_lora_rank=--max-lora-rank`` (no warm-up: nothing here runs a
step), and loads the adapter the way the engine's loader does (``default_load_fn``: ``load_adapter``
then the runner's ``prepare_lora``). Prints the adapter file's bytes, the ``LoRAAdapter``'s (f32, as
read) and the prepared host-cache entry's (``nbytes`` of what the manager keeps), and, for scale, one
device slot's bytes (``LoRASlots.nbytes / max_loras``: every slot is padded to ``max_lora_rank``).
``sent_bytes``: what one write sends to the device (the entry at its rank bucket: ``LoRASlots.write_arrays``);
``set_lora_ms``: the median of ``--repeats`` writes of the prepared entry into slot 1
(``runner.set_lora``, blocked until done; the first write, which compiles the update, is left out):
the engine thread's part of a cold adapter (wall clock, ``time.perf_counter``; noisy on a busy host);
``write_compile_s``: seconds to lower and compile the slot write of each rank bucket (``rank_buckets``:
what warm-up compiles for LoRA writes; XLA's persistent cache is off here).
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--rank", type=int, default=8, help="the adapter's rank")
    ap.add_argument("--max-lora-rank", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5, help="timed set_lora writes")
    ap.add_argument("--output-json")
    args = ap.parse_args(argv)

    from bench.lora import write_random_adapter
    from checkpoints import load_config
    from jaxllm.config import EngineConfig
    from jaxllm.engine.factory import build_engine
    from jaxllm.lora import LoRARequest
    from jaxllm.lora.manager import default_load_fn
    from jaxllm.lora.peft import load_adapter

    mc, _ = load_config(args.model, args.load_format)
    with tempfile.TemporaryDirectory(prefix="jaxllm-lora-bytes-") as tmp:
        path = write_random_adapter(os.path.join(tmp, "a"), mc, args.rank, seed=1)
        file_bytes = os.path.getsize(os.path.join(path, "adapter_model.safetensors"))
        engine = build_engine(EngineConfig(model=args.model, load_format=args.load_format, dtype=args.dtype,
                                           max_model_len=256, max_num_seqs=2, max_num_batched_tokens=256,
                                           kv_cache_memory_bytes=16 << 20, enable_lora=True, max_loras=2,
                                           max_lora_rank=args.max_lora_rank), compile_cache=False, warmup=False)
        runner = engine.runner
        lora = LoRARequest("a", 1, path)
        raw = load_adapter(path, runner.lora_model_config, args.max_lora_rank, name="a")
        entry = default_load_fn(runner.lora_model_config, args.max_lora_rank, prepare=runner.prepare_lora)(lora)
    import jax

    compile_s = {}  # the slot write's compile per rank bucket (what warm-up adds for LoRA writes)
    for rb in runner.lora.rank_buckets:
        t = time.perf_counter()
        runner.lora.lower(rb).compile()
        compile_s[rb] = round(time.perf_counter() - t, 3)
    times = []
    for _ in range(args.repeats + 1):
        t = time.perf_counter()
        runner.set_lora(1, entry)
        jax.block_until_ready(runner.lora.weights)
        times.append(time.perf_counter() - t)
    row = {"model": args.model, "dtype": str(runner.lora.dtype), "rank": args.rank,
           "max_lora_rank": args.max_lora_rank, "file_bytes": file_bytes, "loaded_f32_bytes": raw.nbytes,
           "host_cache_bytes": entry.nbytes, "device_slot_bytes": runner.lora.nbytes // runner.lora.num_slots,
           "sent_bytes": runner.lora.last_write_nbytes, "set_lora_ms": round(1e3 * statistics.median(times[1:]), 2),
           "write_compile_s": compile_s, "load": os.getloadavg()[0]}
    print(json.dumps(row) + "\n" + "  ".join(f"{k}: {v / 2**20:.2f} MiB" for k, v in row.items()
                                             if k.endswith("_bytes")))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(row, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
