"""Perplexity of a model on a held text with full-precision vs int8 vs fp8 weights (issue 17).

    python bench/perplexity.py --model smollm2-135m --output-json /tmp/ppl.json

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
same positions.

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


def logits_for(model, config, ids: list[int], dtype, block_size: int = 16):
    import jax.numpy as jnp
    import numpy as np

    from jaxllm.models.dense_batch import prefill_batch
    from pallas_kernels import KVCache

    tokens, positions, meta, nblocks = prefill_batch([ids], block_size)
    cache = KVCache.zeros(config.num_layers, nblocks + 1, block_size, config.num_kv_heads, config.head_dim,
                          jnp.dtype(dtype))
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
    ap.add_argument("--methods", default="none,int8,fp8")
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
    for method in args.methods.split(","):
        q = None if method == "none" else method
        t0 = time.perf_counter()
        ckpt = load_checkpoint(args.model, dtype=dtype)
        tok = load_tokenizer(ckpt.tokenizer_source, ckpt.config)
        ids = tok.encode(text, add_special_tokens=False)[:args.max_tokens]
        model = build_model(ckpt.config, ckpt.params, dtype, quantization=q)
        logits = logits_for(model, ckpt.config, list(ids), dtype)
        row = {"quantization": method, "checkpoint_format": ckpt.format, "tokens": len(ids), "perplexity": perplexity(logits, list(ids)),
               "seconds": round(time.perf_counter() - t0, 1)}
        if ref is None:
            ref = logits
        else:
            row["max_logit_err"] = float(np.abs(logits - ref).max())
            row["greedy_agreement"] = float((logits.argmax(-1) == ref.argmax(-1)).mean())
            row["ppl_change_pct"] = 100 * (row["perplexity"] / rows[0]["perplexity"] - 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'weights':8} {'ppl':>8} {'Δppl %':>7} {'max|Δlogit|':>11} {'greedy agree':>12}  ({rows[0]['tokens']} tokens)")
    for r in rows:
        print(f"{r['quantization']:8} {r['perplexity']:8.3f} {r.get('ppl_change_pct', 0):7.2f} "
              f"{r.get('max_logit_err', 0):11.3f} {r.get('greedy_agreement', 1):12.4f}")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"model": args.model, "dtype": args.dtype, "text": args.text_file or args.text,
                       "rows": rows, "load": os.getloadavg()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
