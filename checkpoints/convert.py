"""python -m checkpoints.convert SRC DST: convert any loadable checkpoint to an Orbax directory
(params + config + tokenizer, and an HF source's generation_config.json) that loads much faster than
GGUF dequantization."""
from __future__ import annotations

import argparse
import os
import shutil
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
        copy_generation_config(ckpt.format, ckpt.path, args.dst)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst} ({ckpt.config.num_params / 1e6:.1f}M params) in {time.perf_counter() - t:.1f}s")
    return 0


def copy_generation_config(fmt: str, src: str, dst: str) -> bool:
    """An HF source's generation_config.json goes along (`--generation-config auto` reads it from an
    Orbax directory too: default sampling parameters and eos ids, jaxllm/generation_config.py)."""
    from jaxllm.generation_config import FILE

    own = os.path.join(src, FILE)
    if fmt != "hf" or not os.path.isfile(own):
        return False
    shutil.copyfile(own, os.path.join(dst, FILE))
    return True


if __name__ == "__main__":
    sys.exit(main())
