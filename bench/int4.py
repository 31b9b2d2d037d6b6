"""SmolLM2-135M's Q4_1 GGUF kept 4-bit vs dequantized to fp32 (today's CPU default), same run:
resident projection bytes, the weights' agreement with the gguf package's dequantization, logits
on a few prompts, and greedy continuations through the engine.

    python bench/int4.py --output-json /tmp/int4.json

Decode speed: bench/quant.py --methods none,int8,int4 (RESULTS.md, "4-bit weights").
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import log_machine  # noqa: E402

PROMPTS = ["The capital of France is", "Write a haiku about the sea.", "def fibonacci(n):",
           "Explain photosynthesis in one sentence."]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--output-json")
    args = ap.parse_args(argv)
    import jax.numpy as jnp
    import numpy as np

    from checkpoints import load_checkpoint, load_tokenizer
    from jaxllm import LLM, SamplingParams
    from jaxllm.config import EngineConfig
    from jaxllm.engine.factory import build_engine
    from jaxllm.models.llama import build_model
    from jaxllm.models.quant import QUANT_PARAMS, QuantWeight, dequantize, weight_bytes
    from tests.engine_checks import logits_of

    machine = log_machine()
    cks = {}
    for mode in ("keep", "fp32"):
        os.environ["JAXLLM_GGUF_Q4"] = mode
        cks[mode] = load_checkpoint(args.model)
    c = cks["keep"].config
    tok = load_tokenizer(cks["keep"].tokenizer_source, c)
    seqs = [tok.encode(p) for p in PROMPTS]
    row = {"weights_exact": True}
    for name, w in cks["keep"].params.items():
        if isinstance(w, QuantWeight):
            d = dequantize(w, 2 if name == "layers.wo" else 1, stacked=True, dtype=np.float32, xp=np)
            row["weights_exact"] &= bool(np.array_equal(d, cks["fp32"].params[name]))
    models = {m: build_model(c, dict(ck.params), jnp.float32, layer_loop="scan") for m, ck in cks.items()}
    held = {m: sum(weight_bytes(mdl.layers.arrays()[n.split(".")[1]]) for n in QUANT_PARAMS)
            for m, mdl in models.items()}
    row.update({f"projection_MiB_{m}": round(b / 2**20, 1) for m, b in held.items()})
    lg = {m: logits_of(mdl, c, seqs) for m, mdl in models.items()}
    diff = np.abs(lg["keep"] - lg["fp32"])
    row.update(max_abs_dlogit=float(diff.max()), max_abs_logit=float(np.abs(lg["fp32"]).max()),
               prompt_argmax_equal=float((lg["keep"].argmax(-1) == lg["fp32"].argmax(-1)).mean()))
    del models
    outs = {}
    for mode in ("keep", "fp32"):
        os.environ["JAXLLM_GGUF_Q4"] = mode
        e = build_engine(EngineConfig(model=args.model, max_model_len=256, max_num_seqs=4, max_num_batched_tokens=256),
                         compile_cache=True, warmup=False)
        params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
        outs[mode] = [o.outputs[0].token_ids for o in LLM(args.model, engine=e).generate(
            [{"prompt_token_ids": s} for s in seqs], params, use_tqdm=False)]
        row[f"quantization_{mode}"] = e.config.quantization
    row["greedy_equal"] = [a == b for a, b in zip(outs["keep"], outs["fp32"])]
    row["greedy_first_diff"] = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
                                for a, b in zip(outs["keep"], outs["fp32"])]
    print(json.dumps(row, indent=1))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"row": row, "machine": machine, "args": vars(args), "load_after": os.getloadavg()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
