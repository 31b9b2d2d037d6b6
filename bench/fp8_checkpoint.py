"""A pre-quantized fp8 checkpoint vs `--quantization fp8` at load, on SmolLM2-135M's shapes and weights.

    python bench/fp8_checkpoint.py --dir /tmp/smollm2-fp8ckpt --output-json /tmp/fp8ckpt.json

Writes (once, under --dir) two HF checkpoints made from SmolLM2-135M-Instruct's packaged Q4_1 GGUF
(dequantized to fp32 by the loader, then rounded to bf16: the dtype of SmolLM2's own HF release):
- `bf16/`: a plain HF checkpoint (config.json + model.safetensors, bf16);
- `fp8/`: the same weights in llm-compressor's compressed-tensors "FP8_DYNAMIC" layout, quantized
  here with numpy/ml_dtypes: the seven per-layer projections float8_e4m3fn with one f32 scale per
  output row (`weight_scale` [out, 1] = absmax / 448), everything else bf16 (`ignore: ["lm_head"]`;
  SmolLM2 ties it to the embedding).
Then loads, each in a fresh process (--rounds times, the min kept: later rounds read from the page
cache), and builds the f32 model (the CPU default dtype):
- `bf16`: the plain checkpoint, no quantization (the reference);
- `fp8-at-load`: the plain checkpoint with `--quantization fp8` (per-channel scale search at load);
- `fp8-ckpt`: the fp8 checkpoint, no flag (its projections placed as stored).
Reported: load seconds (read + assemble on the host: load_checkpoint), build seconds (place,
quantize, fuse: build_model until the arrays are ready), resident weight bytes (every parameter
leaf of the built model; and the four held projections alone), and the max |logit| difference of
each against `bf16` on --tokens tokens of bench/data/coriolanus_act1.txt (one prefill).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

VARIANTS = {"bf16": ("bf16", None), "fp8-at-load": ("bf16", "fp8"), "fp8-ckpt": ("fp8", None)}
TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "coriolanus_act1.txt")


def hf_tensors(config, params: dict) -> dict[str, np.ndarray]:
    """jaxllm's stacked params (checkpoints/assemble.py's layout) → HF-named [out, in] tensors."""
    c = config
    E, HD, KD = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    t = {"model.embed_tokens.weight": params["embed"], "model.norm.weight": params["final_norm"]}
    if "lm_head" in params:
        t["lm_head.weight"] = params["lm_head"].T
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = params["layers.input_norm"][i]
        t[p + "post_attention_layernorm.weight"] = params["layers.post_norm"][i]
        t[p + "self_attn.q_proj.weight"] = params["layers.wq"][i].reshape(E, HD).T
        t[p + "self_attn.k_proj.weight"] = params["layers.wk"][i].reshape(E, KD).T
        t[p + "self_attn.v_proj.weight"] = params["layers.wv"][i].reshape(E, KD).T
        t[p + "self_attn.o_proj.weight"] = params["layers.wo"][i].reshape(HD, E).T
        t[p + "mlp.gate_proj.weight"] = params["layers.w_gate"][i].T
        t[p + "mlp.up_proj.weight"] = params["layers.w_up"][i].T
        t[p + "mlp.down_proj.weight"] = params["layers.w_down"][i].T
    return {k: np.ascontiguousarray(v) for k, v in t.items()}


def write(root: str) -> None:
    import ml_dtypes
    from safetensors.numpy import save_file

    from checkpoints import load_checkpoint
    from checkpoints.gguf_loader import _hf_config, open_gguf
    from checkpoints.loader import packaged_model_path

    if os.path.isfile(os.path.join(root, "fp8", "config.json")):
        return
    gguf = packaged_model_path("smollm2-135m")
    ck = load_checkpoint(gguf)
    cfg = json.loads(json.dumps(_hf_config(open_gguf(gguf), gguf), default=lambda o: o.item()))
    cfg = dict(cfg, architectures=["LlamaForCausalLM"], torch_dtype="bfloat16")
    bf = {k: v.astype(ml_dtypes.bfloat16) for k, v in hf_tensors(ck.config, ck.params).items()}
    fp8 = {}
    for name, w in bf.items():
        if name.endswith(("_proj.weight",)):
            wf = w.astype(np.float32)  # [out, in]
            s = np.abs(wf).max(axis=1, keepdims=True) / 448.0  # [out, 1]
            s = np.where(s > 0, s, 1.0).astype(np.float32)
            fp8[name] = (wf / s).astype(ml_dtypes.float8_e4m3fn)
            fp8[name[:-len("weight")] + "weight_scale"] = s
        else:
            fp8[name] = w
    qc = {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
          "config_groups": {"group_0": {"targets": ["Linear"], "output_activations": None,
                                        "weights": {"num_bits": 8, "type": "float", "symmetric": True,
                                                    "dynamic": False, "strategy": "channel"},
                                        "input_activations": {"num_bits": 8, "type": "float", "symmetric": True,
                                                              "dynamic": True, "strategy": "token"}}},
          "ignore": ["lm_head"], "kv_cache_scheme": None}
    for sub, tensors, c in (("bf16", bf, cfg), ("fp8", fp8, dict(cfg, quantization_config=qc))):
        d = os.path.join(root, sub)
        os.makedirs(d, exist_ok=True)
        save_file(tensors, os.path.join(d, "model.safetensors"))
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(c, f)


def one(root: str, variant: str, tokens: int, out_npy: str) -> dict:
    """Runs in a child process: load, build, weight bytes, logits saved to `out_npy`."""
    import jax
    import jax.numpy as jnp

    from checkpoints import load_checkpoint
    from jaxllm.models.llama import build_model
    from jaxllm.models.quant import QUANT_PARAMS
    from jaxllm.tokenizer import Tokenizer
    from tests.engine_checks import logits_of

    sub, quantization = VARIANTS[variant]
    t0 = time.perf_counter()
    ck = load_checkpoint(os.path.join(root, sub))
    t1 = time.perf_counter()
    model = build_model(ck.config, ck.params, jnp.float32, quantization=quantization)
    jax.block_until_ready(jax.tree.leaves(model.layers.arrays()))
    t2 = time.perf_counter()
    held = model.layers.arrays()
    proj = sum(int(x.nbytes) for n in QUANT_PARAMS for x in jax.tree.leaves(held[n[len("layers."):]]))
    from flax import nnx

    total = sum(int(x.nbytes) for x in jax.tree.leaves(nnx.state(model)))
    from checkpoints.loader import packaged_model_path

    with open(TEXT) as f:
        ids = Tokenizer.from_gguf(packaged_model_path("smollm2-135m")).encode(f.read())[:tokens]
    np.save(out_npy, logits_of(model, ck.config, [list(ids)], block_size=16))
    return {"variant": variant, "load_s": t1 - t0, "build_s": t2 - t1, "weight_bytes": total,
            "projection_bytes": proj, "quantization": model.quantization}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/smollm2-fp8ckpt")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--output-json")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.dir, args.one, args.tokens, os.path.join(args.dir, f"{args.one}.npy"))))
        return 0
    t = time.perf_counter()
    write(args.dir)
    print(f"checkpoints under {args.dir} ({time.perf_counter() - t:.1f}s): "
          + ", ".join(f"{s} {os.path.getsize(os.path.join(args.dir, s, 'model.safetensors')) / 2**20:.0f} MiB"
                      for s in ("bf16", "fp8")))
    rows = {}
    for _ in range(args.rounds):
        for v in VARIANTS:
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--dir", args.dir, "--one", v,
                                  "--tokens", str(args.tokens)], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            if v in rows:
                r["load_s"], r["build_s"] = min(r["load_s"], rows[v]["load_s"]), min(r["build_s"], rows[v]["build_s"])
            rows[v] = r
    ref = np.load(os.path.join(args.dir, "bf16.npy"))
    print(f"{'variant':<12} {'load s':>7} {'build s':>8} {'weights MiB':>12} {'proj MiB':>9} {'max|dlogit|':>12} "
          f"{'mean|dlogit|':>13}")
    for v, r in rows.items():
        d = np.abs(np.load(os.path.join(args.dir, f"{v}.npy")) - ref)
        r["max_abs_logit_diff_vs_bf16"], r["mean_abs_logit_diff_vs_bf16"] = float(d.max()), float(d.mean())
        print(f"{v:<12} {r['load_s']:7.2f} {r['build_s']:8.2f} {r['weight_bytes'] / 2**20:12.1f} "
              f"{r['projection_bytes'] / 2**20:9.1f} {d.max():12.4f} {d.mean():13.4f}")
    a, b = (np.load(os.path.join(args.dir, f"{v}.npy")) for v in ("fp8-ckpt", "fp8-at-load"))
    print(f"max |logit| (bf16 reference): {np.abs(ref).max():.2f}; fp8-ckpt vs fp8-at-load: {np.abs(a - b).max():.4f}; "
          f"greedy agreement with bf16 over {ref.shape[0]} positions: "
          + ", ".join(f"{v} {np.mean(np.load(os.path.join(args.dir, f'{v}.npy')).argmax(-1) == ref.argmax(-1)):.3f}"
                      for v in ("fp8-at-load", "fp8-ckpt")))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
