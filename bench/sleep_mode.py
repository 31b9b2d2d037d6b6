"""Sleep mode cost: how long ``sleep(level)`` and ``wake_up()`` take and how many device bytes a sleep
frees (``jax.live_arrays()`` before vs asleep), on a SmolLM2-135M-shaped engine with dummy weights.

    python bench/sleep_mode.py [--model smollm2-135m] [--kv-cache-memory-bytes 256M] [--repeats 3]

Level 2's wake-up reads no checkpoint (it maps the memory back: zeros, the weights marked discarded);
the RLHF loop's next call, a full ``load_weights`` of the model's own weights as an HF state dict
(bench/weight_update.py's), is timed on its own line. Also checks that the greedy output after each
wake-up (level 2: after the load) equals the one before the sleep and that nothing compiled after the
first wake-up of each level (the runner's executables and traces). Prints one line per measurement.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `python bench/x.py` from the root

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxllm import LLM, SamplingParams  # noqa: E402
from jaxllm.cli_args import human_int  # noqa: E402
from weight_update import hf_state_dict  # noqa: E402  (bench/weight_update.py)


def live_bytes() -> int:
    return sum(a.nbytes for a in jax.live_arrays())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--kv-cache-memory-bytes", type=human_int, default=256 * 2**20)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    llm = LLM(a.model, load_format="dummy", enable_sleep_mode=True, max_model_len=512, max_num_seqs=4,
              max_num_batched_tokens=64, kv_cache_memory_bytes=a.kv_cache_memory_bytes)
    runner = llm.engine.runner
    prompt = [{"prompt_token_ids": list(range(10, 60))}]
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    ref = llm.generate(prompt, greedy, use_tqdm=False)[0].outputs[0].token_ids
    weights = sum(x.nbytes for x in jax.tree.leaves(runner.state))
    cache = runner.kv_cache.k.nbytes + runner.kv_cache.v.nbytes
    print(f"device {jax.devices()[0].platform}; weights {weights / 2**20:.1f} MiB, KV cache {cache / 2**20:.1f} MiB")
    from checkpoints import load_checkpoint

    ckpt = load_checkpoint(a.model, "dummy", dtype=runner.state_dtype, seed=llm.engine.config.seed)
    sd = list(hf_state_dict({k: np.asarray(jax.device_get(v)) for k, v in ckpt.params.items()}, ckpt.config).items())
    del ckpt
    for level in (1, 2):
        llm.sleep(level)  # the first wake-up of a level may compile its allocation (level 2: the weights' zeros)
        llm.wake_up()
        if level == 2:
            llm.load_weights(sd)
        sleeps, wakes, loads = [], [], []
        for _ in range(a.repeats):
            compiled = (runner.compile_count, runner.num_traces)
            before = live_bytes()
            t0 = time.perf_counter()
            llm.sleep(level)
            t1 = time.perf_counter()
            freed = before - live_bytes()
            llm.wake_up()
            jax.block_until_ready(runner.state)
            t2 = time.perf_counter()
            if level == 2:
                assert llm.engine.weights_discarded
                llm.load_weights(sd)
                jax.block_until_ready(runner.state)
                loads.append(time.perf_counter() - t2)
            out = llm.generate(prompt, greedy, use_tqdm=False)[0].outputs[0].token_ids
            assert out == ref, (out, ref)
            assert (runner.compile_count, runner.num_traces) == compiled, "compiled after wake-up"
            sleeps.append(t1 - t0)
            wakes.append(t2 - t1)
        print(f"level {level}: sleep {statistics.median(sleeps) * 1e3:.0f} ms, wake_up {statistics.median(wakes) * 1e3:.0f} "
              f"ms (median of {a.repeats}{'; no checkpoint read' if level == 2 else ''}); device bytes freed "
              f"{freed / 2**20:.1f} MiB; output after wake-up{' + load' if level == 2 else ''} equal, 0 compiles")
        if loads:
            print(f"level 2, then load_weights of the full model ({len(sd)} tensors): "
                  f"{statistics.median(loads) * 1e3:.0f} ms (median of {a.repeats})")

if __name__ == "__main__":
    main()
