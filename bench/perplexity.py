"""Perplexity of a model on a held text with full-precision vs int8 vs fp8 weights, and with an
fp8 KV cache (issue 17).

    python bench/perplexity.py --model smollm2-135m --output-json /tmp/ppl.json
    python bench/perplexity.py --methods none --kv-cache-dtype auto,fp8 --kv-scale calibrated,first,1.0,first4

The text (default): bench/data/coriolanus_act1.txt, Shakespeare's Coriolanus (public domain) as it
opens the "tiny shakespeare" corpus: the first 14,593 characters of data/tinyshakespeare/input.txt
in github.com/karpathy/char-rnn (commit 6f9487a), copied byte for byte; scored on its first
--max-tokens tokens (2048: 4314 in all). `--text zen`: the Zen of Python from CPython's `this`
module (203 tokens: too short to tell a 2% change, see bench/RESULTS.md "Quantized weights": any
perturbation of fp8's size moves its perplexity by -18%..+35%). `--text-file` takes any other file.

One forward pass over the whole text (tokenized with the model's tokenizer, BOS-free), through
jaxllm's own model (build_model + the dense prefill batch of tests/models), in --dtype (float32 on
CPU); perplexity = exp(mean next-token NLL) over every position after the first. Each quantization
also reports its max |logit error| and greedy (argmax) agreement against full precision on the
same positions (the first row).

--kv-cache-dtype fp8 stores K/V as float8_e4m3fn with per-layer per-kv-head scales
(pallas_kernels/kv_quant.py); the attention reads the cache, so the forward pass sees quantized K/V
at every position. --kv-scale picks where the scales come from: "calibrated" (the default) = the
engine's: one prefill of its fixed calibration sequence at start (jaxllm/runner/kv_calibration.py:
the Zen of Python through the model's tokenizer, not this text); "first" = the first write (here
the whole text: the best case), "first4" = the text's first 4 tokens written alone first (the
engine's case before calibration when a short prompt came first; the rest may exceed those
scales), or a number = a fixed scale for every layer and head (1.0: vLLM's default without
calibration, the engine's --no-calculate-kv-scales).

The "full precision" baseline is whatever the checkpoint loads as in --dtype. For smollm2-135m that
is the packaged Q4_1 GGUF dequantized to fp32 (no HF safetensors copy on this machine): int8/fp8
then re-quantize those values, per output channel (what the engine does too with --quantization
on a GGUF whose types it dequantizes; a Q8_0 GGUF stays int8 with its block scales).
"""
from __future__ import annotations

import argparse
import codecs
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def zen_of_python() -> str:
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the text
        import this
    return codecs.decode(this.s, "rot13")


def logits_for(model, config, ids: list[int], dtype, block_size: int = 16, kv_cache_dtype: str = "auto",
               kv_scale: str = "first", tokenizer=None):
    import numpy as np

    from jaxllm.models.dense_batch import prefill_batch
    from jaxllm.runner.kv_cache_dtype import cache_dtype
    from pallas_kernels import KVCache

    tokens, positions, meta, nblocks = prefill_batch([ids], block_size)
    fixed = kv_cache_dtype == "fp8" and kv_scale not in ("first", "first4", "calibrated")
    cache = KVCache.zeros(config.num_layers, nblocks + 1, block_size, config.num_kv_heads, config.head_dim,
                          cache_dtype(kv_cache_dtype, dtype), scale_init=float(kv_scale) if fixed else 0.0)
    if kv_cache_dtype == "fp8" and kv_scale == "calibrated":  # the engine's start-up calibration
        from jaxllm.runner.kv_calibration import calibrated_scales, calibration_ids

        cal = calibration_ids(tokenizer, config.vocab_size, config.max_position_embeddings)
        cache = KVCache(cache.k, cache.v, *calibrated_scales(model, cal, block_size))
    if kv_cache_dtype == "fp8" and kv_scale == "first4":  # the first 4 tokens alone set the scales
        t4, p4, m4, _ = prefill_batch([ids[:4]], block_size)
        _, cache = model(t4, p4, cache, m4)
    hidden, _ = model(tokens, positions, cache, meta)
    return np.asarray(model.compute_logits(hidden), dtype=np.float64)  # [T, V]


def perplexity(logits, ids: list[int]) -> float:
    import numpy as np
    from scipy.special import logsumexp

    lp = logits[:-1] - logsumexp(logits[:-1], axis=-1, keepdims=True)
    nll = -lp[np.arange(len(ids) - 1), ids[1:]]
    return float(np.exp(nll.mean()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--text-file", help="held text (default: bench/data/coriolanus_act1.txt)")
    ap.add_argument("--text", choices=("coriolanus", "zen"), default="coriolanus")
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--methods", default="none,int8,fp8", help="weight quantizations (none = full precision)")
    ap.add_argument("--kv-cache-dtype", default="auto", help="comma list of auto, fp8 (each with every method)")
    ap.add_argument("--kv-scale", default="calibrated",
                    help="fp8 KV scales, comma list: calibrated, first, first4, or a number")
    ap.add_argument("--output-json")
    args = ap.parse_args(argv)
    import jax.numpy as jnp
    import numpy as np

    from checkpoints import load_checkpoint, load_tokenizer
    from jaxllm.models.llama import build_model

    if args.text_file:
        text = open(args.text_file).read()
    elif args.text == "zen":
        text = zen_of_python()
    else:
        text = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "coriolanus_act1.txt")).read()
    dtype = jnp.dtype(args.dtype)
    rows, ref = [], None
    for method, kv, kv_scale in [(m, kv, s) for m in args.methods.split(",")
                                 for kv in args.kv_cache_dtype.split(",")
                                 for s in (args.kv_scale.split(",") if kv == "fp8" else ["-"])]:
        q = None if method == "none" else method
        t0 = time.perf_counter()
        ckpt = load_checkpoint(args.model, dtype=dtype)
        tok = load_tokenizer(ckpt.tokenizer_source, ckpt.config)
        ids = tok.encode(text, add_special_tokens=False)[:args.max_tokens]
        model = build_model(ckpt.config, ckpt.params, dtype, quantization=q)
        logits = logits_for(model, ckpt.config, list(ids), dtype, kv_cache_dtype=kv, kv_scale=kv_scale,
                            tokenizer=tok)
        row = {"quantization": method, "kv_cache_dtype": kv, "kv_scale": kv_scale, "checkpoint_format": ckpt.format,
               "tokens": len(ids), "perplexity": perplexity(logits, list(ids)),
               "seconds": round(time.perf_counter() - t0, 1)}
        if ref is None:
            ref = logits
        else:
            row["max_logit_err"] = float(np.abs(logits - ref).max())
            row["greedy_agreement"] = float((logits.argmax(-1) == ref.argmax(-1)).mean())
            row["ppl_change_pct"] = 100 * (row["perplexity"] / rows[0]["perplexity"] - 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'weights':8} {'kv cache':12} {'ppl':>8} {'Δppl %':>7} {'max|Δlogit|':>11} {'greedy agree':>12}  "
          f"({rows[0]['tokens']} tokens)")
    for r in rows:
        kv = r["kv_cache_dtype"] + (f" ({r['kv_scale']})" if r["kv_cache_dtype"] == "fp8" else "")
        print(f"{r['quantization']:8} {kv:12} {r['perplexity']:8.3f} {r.get('ppl_change_pct', 0):7.2f} "
              f"{r.get('max_logit_err', 0):11.3f} {r.get('greedy_agreement', 1):12.4f}")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"model": args.model, "dtype": args.dtype, "text": args.text_file or args.text,
                       "rows": rows, "load": os.getloadavg()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
