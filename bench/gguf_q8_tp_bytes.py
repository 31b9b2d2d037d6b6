"""A Q8_0 GGUF under tensor parallelism: resident weight bytes per device, kept int8 vs the old
host-dequantized fallback, on SmolLM2-135M's shapes and weights.

    python bench/gguf_q8_tp_bytes.py --dir /tmp/smollm2-q8 --tp 3 --output-json /tmp/q8tp.json

Writes (once, under --dir) SmolLM2-135M-Instruct's packaged Q4_1 GGUF dequantized to fp32 as an HF
checkpoint, then that as a Q8_0 GGUF (tests/checkpoints/gguf_tiny.py: llama.cpp's names, rotary
permutation and the gguf package's Q8_0 quantizer; no tokenizer: weights only). Then, in a child
process with 8 fake CPU devices, loads it and builds the f32 model at tp=1 and at --tp
(SmolLM2's 9 heads / 3 kv heads divide by 3, not 2 or 4) twice each:
- `int8`: as loaded (projections int8 + f16 block-32 scales, sharded: jaxllm/parallel/layout.py);
- `dequantized`: the projections dequantized to fp32 on the host first (what build_model did under
  tensor parallelism before, prequantized.dequantize_all).
Reported per variant: bytes on device 0 of every parameter leaf of the built model, and of the four
held projections alone; the max |logit| difference of `int8` at --tp against `int8` at tp=1 on one
prefill of --tokens token ids.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def write(root: str) -> str:
    out = os.path.join(root, "smollm2-q8_0.gguf")
    if os.path.isfile(out):
        return out
    from safetensors.numpy import save_file

    from bench.fp8_checkpoint import hf_tensors
    from checkpoints import load_checkpoint
    from checkpoints.gguf_loader import _hf_config, open_gguf
    from checkpoints.loader import packaged_model_path
    from tests.checkpoints.gguf_tiny import write_gguf_from_hf

    src = packaged_model_path("smollm2-135m")
    ck = load_checkpoint(src)
    cfg = json.loads(json.dumps(_hf_config(open_gguf(src), src), default=lambda o: o.item()))
    hf = os.path.join(root, "hf-f32")
    os.makedirs(hf, exist_ok=True)
    save_file(hf_tensors(ck.config, ck.params), os.path.join(hf, "model.safetensors"))
    with open(os.path.join(hf, "config.json"), "w") as f:
        json.dump(dict(cfg, architectures=["LlamaForCausalLM"]), f)
    return write_gguf_from_hf(hf, out, "Q8_0")


def child(path: str, tp: int, tokens: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from checkpoints import load_checkpoint
    from jaxllm.models import prequantized
    from jaxllm.models.llama import build_model
    from jaxllm.models.quant import QUANT_PARAMS
    from jaxllm.parallel import TPLayout, make_mesh
    from tests.engine_checks import logits_of

    dev0 = jax.devices()[0]

    def on_dev0(leaves):
        return sum(int(s.data.nbytes) for x in leaves for s in x.addressable_shards if s.device == dev0)

    rows, logits = {}, {}
    ids = [list(np.random.default_rng(0).integers(0, 49152, tokens))]
    for t in (1, tp):
        for variant in ("int8", "dequantized"):
            ck = load_checkpoint(path)
            if variant == "dequantized":
                prequantized.dequantize_all(ck.params, "bench", only="int8")
            layout = TPLayout.plan(ck.config, t, make_mesh(t)) if t > 1 else None
            model = build_model(ck.config, ck.params, jnp.float32, layout=layout)
            held = model.layers.arrays()
            proj = on_dev0(jax.tree.leaves([held[n[len("layers."):]] for n in QUANT_PARAMS]))
            rows[f"tp{t}-{variant}"] = {"tp": t, "variant": variant, "quantization": model.quantization,
                                        "device0_weight_bytes": on_dev0(jax.tree.leaves(nnx.state(model))),
                                        "device0_projection_bytes": proj}
            if variant == "int8" and t == 1:
                logits[t] = logits_of(model, ck.config, ids, block_size=16)
            elif variant == "int8" and layout is not None:
                from pallas_kernels import KVCache
                from jaxllm.models.dense_batch import prefill_batch

                mc = model.config
                tok, pos, meta, nb = prefill_batch(ids, 16)
                cache = KVCache.zeros(mc.num_layers, nb + 1, 16, mc.num_kv_heads, mc.head_dim, jnp.float32,
                                      sharding=layout.cache_sharding())
                hidden, _ = model(tok, pos, cache, meta)
                logits[t] = np.asarray(model.compute_logits(hidden))
            del model
    rows["max_abs_logit_diff_tp_vs_tp1"] = float(np.abs(logits[tp] - logits[1]).max())
    rows["max_abs_logit_tp1"] = float(np.abs(logits[1]).max())
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/smollm2-q8")
    ap.add_argument("--tp", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--output-json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.tp, args.tokens)))
        return 0
    os.makedirs(args.dir, exist_ok=True)
    path = write(args.dir)
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip())
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", path, "--tp", str(args.tp),
                          "--tokens", str(args.tokens)], capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode:
        sys.stderr.write(out.stderr[-5000:])
        return out.returncode
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{'variant':<16} {'quant':>6} {'device-0 weights MiB':>21} {'device-0 projections MiB':>25}")
    for k, r in rows.items():
        if isinstance(r, dict):
            print(f"{k:<16} {str(r['quantization']):>6} {r['device0_weight_bytes'] / 2**20:21.2f} "
                  f"{r['device0_projection_bytes'] / 2**20:25.2f}")
    print(f"max |logit| tp=1: {rows['max_abs_logit_tp1']:.2f}; int8 tp={args.tp} vs tp=1 max |dlogit|: "
          f"{rows['max_abs_logit_diff_tp_vs_tp1']:.2e}")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
