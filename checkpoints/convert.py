"""python -m checkpoints.convert SRC DST: convert any loadable checkpoint to an Orbax directory
(params + config + tokenizer) that loads much faster than GGUF dequantization."""
from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m checkpoints.convert", description=__doc__)
    ap.add_argument("src", help="model name, HF directory or .gguf file")
    ap.add_argument("dst", help="output directory (must not hold a checkpoint yet)")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--hf-overrides", default=None, metavar="JSON",
                    help="a JSON object merged into an HF checkpoint's config.json first (vLLM's flag; e.g. an "
                         "unconverted reranker's classifier_from_token: the store keeps the built score head)")
    args = ap.parse_args(argv)
    from jaxllm.hf_overrides import parse_hf_overrides

    try:
        overrides = parse_hf_overrides(args.hf_overrides)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from checkpoints import CheckpointError, load_checkpoint, load_tokenizer
    from checkpoints.orbax_store import save_orbax

    try:
        t = time.perf_counter()
        ckpt = load_checkpoint(args.src, args.load_format, hf_overrides=overrides)
        tok = load_tokenizer(ckpt.tokenizer_source, ckpt.config)
        from jaxllm.models import prequantized

        prequantized.dequantize_all(ckpt.params, "Orbax conversion")  # Q8_0 / fp8 projections: stored fp32
        save_orbax(args.dst, ckpt.config, ckpt.params, tok)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst} ({ckpt.config.num_params / 1e6:.1f}M params) in {time.perf_counter() - t:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
