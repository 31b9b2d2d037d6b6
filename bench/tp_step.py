"""Tensor parallelism's cost per decode step: tp=N vs tp=1, and vs the KV cache's size, in one run.

    python bench/tp_step.py                         # SmolLM2, tp 1 and 3 on 4 forced CPU devices,
                                                    # caches of 32 and 256 MiB per device
    python bench/tp_step.py --tp 1 2 --cache-mib 64 --model dummy:tiny-llama --load-format dummy

For each (tp, cache size) it builds an engine on forced CPU devices (`XLA_FLAGS=
--xla_force_host_platform_device_count`, set here before jax starts unless already set), decodes one
request (greedy, ignore_eos) and reports ms per decode token = (time of a --tokens-token run -
time of a 1-token run) / (tokens - 1), the best of --repeats. From the compiled decode step of the
smallest bucket it reports XLA's memory analysis (temp vs one device's cache shard, aliased bytes)
and the collectives per step (op, shape, bytes; ops in the layer loop's body count once per layer
under the scan loop). The step time must not grow with the cache (issue 18: at tp=3 it did, 444 ->
5,151 ms per token from 16 to 256 MiB, because every layer copied the whole cache).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import HLO_DTYPE_BYTES, hlo_elements, hlo_instructions  # noqa: E402

_COLLECTIVE = re.compile(r"= (\w+)\[([\d,]*)\]\{[^}]*\} (all-reduce|all-gather|reduce-scatter|all-to-all|"
                         r"collective-permute)(?:-start)?\(")


def collectives(hlo: str, num_layers: int, scan: bool) -> list[dict]:
    """Collectives of a compiled step: [{op, shape, bytes, per_step}] (per_step: times it runs)."""
    out = []
    for comp, ln in hlo_instructions(hlo):
        m = _COLLECTIVE.search(ln)
        if not m:
            continue
        n = hlo_elements(m.group(2))
        out.append({"op": m.group(3), "shape": f"{m.group(1)}[{m.group(2)}]",
                    "bytes": n * HLO_DTYPE_BYTES.get(m.group(1), 4),
                    "per_step": num_layers if scan and comp != "ENTRY" else 1})
    return out


def measure(args, tp: int, cache_mib: int) -> dict:
    from jaxllm.config import EngineConfig
    from jaxllm.engine.factory import build_engine
    from jaxllm.llm import LLM
    from jaxllm.models.llama import layer_loop_mode
    from jaxllm.runner.inputs import build_inputs
    from jaxllm.sampling_params import SamplingParams

    engine = build_engine(EngineConfig(model=args.model, load_format=args.load_format, tensor_parallel_size=tp,
                                       kv_cache_memory_bytes=cache_mib << 20, max_model_len=args.max_model_len,
                                       max_num_seqs=8, max_num_batched_tokens=args.max_num_batched_tokens))
    r = engine.runner
    llm = LLM(args.model, engine=engine)
    prompt = {"prompt_token_ids": list(range(100, 100 + args.input_len))}

    def run(n: int) -> float:
        t = time.perf_counter()
        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
        return time.perf_counter() - t

    run(2)  # first touch
    per_token = min((run(args.tokens) - run(1)) / (args.tokens - 1) for _ in range(args.repeats))
    inp = build_inputs([], [], r.num_rows, r.eos_ids, 8, 8, True, r.block_size, r.max_blocks_per_seq, r.max_model_len,
                       vocab_size=r.vocab_size)
    exe = r._step_lowering(inp).compile()
    ma = exe.memory_analysis()
    shard_bytes = r.kv_cache.k.addressable_shards[0].data.nbytes
    scan = layer_loop_mode() == "scan"  # what build_engine resolved
    colls = collectives(exe.as_text(), r.model_config.num_layers, scan)
    row = {"tp": tp, "cache_mib": cache_mib, "num_blocks": r.num_blocks, "ms_per_token": 1000 * per_token,
           "temp_mib": ma.temp_size_in_bytes / 2**20, "alias_mib": ma.alias_size_in_bytes / 2**20,
           "cache_shard_mib": shard_bytes / 2**20, "collectives": colls,
           "collective_bytes_per_step": sum(c["bytes"] * c["per_step"] for c in colls)}
    return row  # the engine goes with this frame (before the next tp builds its own)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 3], help="tensor-parallel sizes to compare")
    ap.add_argument("--cache-mib", type=int, nargs="+", default=[32, 256], help="KV cache per device, MiB")
    ap.add_argument("--devices", type=int, default=4, help="forced CPU devices (if XLA_FLAGS does not set them)")
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=17, help="tokens of the timed run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-model-len", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=256,
                    help="the engine's step budget (mixed buckets 64..this); the measured step is the 8-seq decode")
    ap.add_argument("--output-json")
    args = ap.parse_args(argv)
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.devices}").strip()
    from bench.common import log_machine, write_json

    machine = log_machine()
    rows = [measure(args, tp, mib) for tp in args.tp for mib in args.cache_mib]
    base = {r["cache_mib"]: r["ms_per_token"] for r in rows if r["tp"] == 1}
    print(f"\n{'tp':>3} {'cache MiB/dev':>13} {'blocks':>7} {'ms/token':>9} {'vs tp=1':>8} {'temp MiB':>9} "
          f"{'alias MiB':>10} {'collective KiB/step':>20}")
    for r in rows:
        ratio = r["ms_per_token"] / base[r["cache_mib"]] if r["cache_mib"] in base else float("nan")
        r["vs_tp1"] = ratio
        print(f"{r['tp']:>3} {r['cache_mib']:>13} {r['num_blocks']:>7} {r['ms_per_token']:>9.1f} {ratio:>8.2f} "
              f"{r['temp_mib']:>9.1f} {r['alias_mib']:>10.1f} {r['collective_bytes_per_step'] / 1024:>20.1f}")
    for r in rows:
        if r["tp"] > 1 and r is next(x for x in rows if x["tp"] == r["tp"]):
            kinds = {}
            for c in r["collectives"]:
                k = (c["op"], c["shape"])
                kinds[k] = kinds.get(k, 0) + c["per_step"]
            print(f"tp={r['tp']} decode step (S=8) collectives per step: "
                  + ", ".join(f"{n} x {op} {shape}" for (op, shape), n in sorted(kinds.items())))
    if args.output_json:
        write_json(args.output_json, {"rows": rows, "machine": machine})
    return 0


if __name__ == "__main__":
    sys.exit(main())
