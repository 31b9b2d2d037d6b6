"""Embedding throughput (prompt tokens/s): jaxllm ``LLM.embed`` vs HF transformers ``AutoModel``
forward + pooling on the same random checkpoint in the same run.

    python bench/embed.py --num-prompts 32 --input-len 32..256 --output-json /tmp/embed.json

The checkpoint is a random LlamaModel (a base model, no LM head: what e5-mistral ships) with
SmolLM2-135M's shapes (``--shape smollm2``, 30 layers, hidden 576) or the tiny test shape
(``--shape tiny``), saved by transformers into --model-dir (reused when present). jaxllm: every
prompt submitted at once (continuous batching, chunked prefill under --max-num-batched-tokens),
the clock starts after build and warm-up. HF (one untimed warm-up call): fp32, eager attention, batches of --hf-batch-size
prompts in order, right-padded with an attention mask, LAST = the last real token's state (or the
masked MEAN), L2-normalised; the same prompts. The bench also reports the smallest cosine between
the two systems' vectors (parity on a bigger model than the tests').
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import log, log_machine, parse_range, synthetic_requests, write_json  # noqa: E402

SHAPES = {
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                    rope_theta=100000.0, rms_norm_eps=1e-5, initializer_range=0.02),
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6, initializer_range=0.1),
}


def make_checkpoint(shape: str, root: str) -> str:
    import torch
    import transformers

    path = os.path.join(root, f"llama-model-{shape}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(**SHAPES[shape], tie_word_embeddings=False)
        transformers.AutoModel.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    return path


def hf_embed(path: str, prompts: list[list[int]], batch: int, pooling: str):
    import torch
    import transformers

    model = transformers.AutoModel.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    out = []
    with torch.no_grad():
        model(input_ids=torch.tensor([prompts[0][:8]]))  # first-call overheads, untimed
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            chunk = prompts[i:i + batch]
            n = max(len(p) for p in chunk)
            ids = torch.tensor([p + [0] * (n - len(p)) for p in chunk])
            mask = torch.tensor([[1] * len(p) + [0] * (n - len(p)) for p in chunk])
            h = model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, n, E]
            if pooling == "LAST":
                v = h[torch.arange(len(chunk)), mask.sum(1) - 1]
            else:
                v = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            out.extend(torch.nn.functional.normalize(v, dim=-1).numpy())
    return out, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    ap.add_argument("--model-dir", default="/tmp/jaxllm-bench-embed", help="where the random checkpoint is saved")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-len", type=parse_range, default=(32, 256), help="prompt lengths, uniform in LO..HI")
    ap.add_argument("--pooling-type", choices=("LAST", "MEAN"), default="LAST")
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--hf-batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output-json")
    args = ap.parse_args(argv)
    import numpy as np

    from jaxllm.llm import LLM
    from jaxllm.pooling_params import PoolingParams

    machine = log_machine()
    path = make_checkpoint(args.shape, args.model_dir)
    vocab = SHAPES[args.shape]["vocab_size"]
    prompts = [r.prompt_token_ids for r in synthetic_requests(args.num_prompts, args.input_len, (1, 1), vocab, args.seed)]
    n_tok = sum(len(p) for p in prompts)
    t0 = time.perf_counter()
    llm = LLM(path, max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
              max_model_len=max(len(p) for p in prompts) + 16, kv_cache_memory_bytes=256 << 20)
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    outs = llm.embed(prompts, PoolingParams(pooling_type=args.pooling_type), use_tqdm=False)
    ours = time.perf_counter() - t0
    ref, hf_secs = hf_embed(path, prompts, args.hf_batch_size, args.pooling_type)
    cos = min(float(np.dot(o.outputs.embedding, r) / np.linalg.norm(o.outputs.embedding) / np.linalg.norm(r))
              for o, r in zip(outs, ref))
    rows = [{"system": "jaxllm LLM.embed", "batch": f"continuous, {args.max_num_batched_tokens} tok/step",
             "secs": ours, "prompt_tok_per_s": n_tok / ours},
            {"system": "HF AutoModel", "batch": f"static {args.hf_batch_size}, padded", "secs": hf_secs,
             "prompt_tok_per_s": n_tok / hf_secs}]
    log(f"{args.num_prompts} prompts, {n_tok} tokens ({args.input_len[0]}..{args.input_len[1]}), shape {args.shape}, "
        f"pooling {args.pooling_type}; jaxllm build + warm-up {build:.1f}s")
    for r in rows:
        log(f"{r['system']:18s} {r['batch']:28s} {r['secs']:7.2f}s  {r['prompt_tok_per_s']:8.1f} prompt tok/s")
    log(f"jaxllm / HF: {rows[0]['prompt_tok_per_s'] / rows[1]['prompt_tok_per_s']:.2f}x; min cosine {cos:.6f}; "
        f"load after: {os.getloadavg()}")
    if args.output_json:
        write_json(args.output_json, {"machine": machine, "args": vars(args) | {"input_len": list(args.input_len)},
                                      "rows": rows, "min_cosine": cos, "build_s": build})
    return 0


if __name__ == "__main__":
    sys.exit(main())
