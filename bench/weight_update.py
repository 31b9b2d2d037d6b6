"""Weight update cost: how long ``LLM.load_weights`` takes to write a full HF state dict (numpy arrays,
float32 or bfloat16) and a partial one (one layer's q_proj) into a SmolLM2-135M-shaped engine with
dummy weights, and that nothing compiles (the runner's executables and traces, JAX's backend compiles).

    python bench/weight_update.py [--model smollm2-135m] [--dtype float32|bfloat16] [--repeats 3]

The pushed state dict is the engine's own dummy weights written back in HF layout (read from the
checkpoint the engine was built from), so the greedy output after each push must equal the one before.
Prints one line per measurement.
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
from jax._src import monitoring  # noqa: E402

from jaxllm import LLM, SamplingParams  # noqa: E402


def hf_state_dict(params: dict, config) -> dict[str, np.ndarray]:
    """Checkpoint params (stacked, [in, out]) → HF names and layouts (the loader's inverse)."""
    c = config
    E, H, K, D = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    sd = {"model.embed_tokens.weight": params["embed"], "model.norm.weight": params["final_norm"]}
    if "lm_head" in params:
        sd["lm_head.weight"] = params["lm_head"].T
    per = {"input_norm": ("input_layernorm.weight", lambda w: w),
           "post_norm": ("post_attention_layernorm.weight", lambda w: w),
           "wq": ("self_attn.q_proj.weight", lambda w: w.reshape(E, H * D).T),
           "wk": ("self_attn.k_proj.weight", lambda w: w.reshape(E, K * D).T),
           "wv": ("self_attn.v_proj.weight", lambda w: w.reshape(E, K * D).T),
           "wo": ("self_attn.o_proj.weight", lambda w: w.reshape(H * D, E).T),
           "w_gate": ("mlp.gate_proj.weight", lambda w: w.T), "w_up": ("mlp.up_proj.weight", lambda w: w.T),
           "w_down": ("mlp.down_proj.weight", lambda w: w.T)}
    for i in range(c.num_layers):
        for short, (name, f) in per.items():
            sd[f"model.layers.{i}.{name}"] = np.ascontiguousarray(f(params[f"layers.{short}"][i]))
    return sd


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    from checkpoints import load_checkpoint

    llm = LLM(a.model, load_format="dummy", max_model_len=512, max_num_seqs=4, max_num_batched_tokens=64,
              kv_cache_memory_bytes=64 * 2**20)
    runner = llm.engine.runner
    ckpt = load_checkpoint(a.model, "dummy", dtype=runner.state_dtype, seed=llm.engine.config.seed)
    host = {k: np.asarray(jax.device_get(v)) for k, v in ckpt.params.items()}
    sd = hf_state_dict(host, ckpt.config)
    if a.dtype == "bfloat16":
        import ml_dtypes

        sd = {k: v.astype(ml_dtypes.bfloat16) for k, v in sd.items()}
    nbytes = sum(v.nbytes for v in sd.values())
    prompt = [{"prompt_token_ids": list(range(10, 60))}]
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    ref = llm.generate(prompt, greedy, use_tqdm=False)[0].outputs[0].token_ids
    backend = []
    monitoring.register_event_duration_secs_listener(lambda e, *_a, **_k: backend.append(e) if "backend_compile" in e
                                                     else None)
    print(f"device {jax.devices()[0].platform}; model {a.model} ({np.dtype(runner.state_dtype).name}); "
          f"state dict {len(sd)} tensors, {nbytes / 2**20:.1f} MiB {a.dtype}")
    q = "model.layers.3.self_attn.q_proj.weight"
    for what, items in (("full", list(sd.items())), ("partial (one q_proj)", [(q, sd[q])])):
        times = []
        for _ in range(a.repeats):
            compiled = (runner.compile_count, runner.num_traces, len(backend))
            t0 = time.perf_counter()
            llm.load_weights(items)
            jax.block_until_ready(runner.state)
            times.append(time.perf_counter() - t0)
            assert (runner.compile_count, runner.num_traces, len(backend)) == compiled, "compiled after load_weights"
            out = llm.generate(prompt, greedy, use_tqdm=False)[0].outputs[0].token_ids
            if a.dtype == "float32":
                assert out == ref, (out, ref)
        print(f"load_weights {what}: median {statistics.median(times) * 1e3:.0f} ms of {a.repeats} "
              f"(min {min(times) * 1e3:.0f}, max {max(times) * 1e3:.0f}); compiles after: 0")


if __name__ == "__main__":
    main()
