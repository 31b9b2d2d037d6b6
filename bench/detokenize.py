"""Incremental detokenization per token: tokenizers' DecodeStream (the engine's path when the
tokenizer has a Rust backend) against the two window decodes it replaced, on the same ids.

    JAX_PLATFORMS=cpu python bench/detokenize.py                 # SmolLM2's tokenizer, README text
    JAX_PLATFORMS=cpu python bench/detokenize.py --tokens 20000

Both must give the full decode's text (checked); the engine runs one such add per generated token
on its thread, so this is per-sequence host time per step."""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="whose tokenizer")
    ap.add_argument("--tokens", type=int, default=3000)
    ap.add_argument("--repeats", type=int, default=5, help="best of")
    args = ap.parse_args(argv)

    from checkpoints import load_checkpoint, load_tokenizer
    from jaxllm.tokenizer import IncrementalDetokenizer

    ckpt = load_checkpoint(args.model, "auto")
    tok = load_tokenizer(ckpt.tokenizer_source, ckpt.config)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "README.md"), encoding="utf-8").read()
    ids = tok.encode(text, add_special_tokens=False)
    while len(ids) < args.tokens:
        ids = ids + ids
    ids = ids[:args.tokens]
    window = copy.copy(tok)
    window.stream_backend = None  # IncrementalDetokenizer's window decodes
    full = tok.decode(ids)
    for name, t in (("DecodeStream", tok), ("window decodes", window)):
        best = float("inf")
        for _ in range(args.repeats):
            d = IncrementalDetokenizer(t, [])
            t0 = time.perf_counter()
            out = "".join(d.add([i]) for i in ids)
            best = min(best, time.perf_counter() - t0)
            assert out == full, name
        print(f"{name:15s} {1e6 * best / len(ids):6.2f} us per token ({len(ids)} tokens, {args.model})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
