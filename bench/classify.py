"""What the classifier head costs: ``LLM.classify`` vs ``LLM.embed`` on one model in the same run.

    python bench/classify.py --num-prompts 64 --input-len 16..128 --repeats 5 --output-json /tmp/classify.json

One checkpoint (default the dummy preset ``tiny-llama-classifier``: tiny-llama's decoder plus a
3-label ``score`` head; ``--model`` takes any *ForSequenceClassification directory, with
``--load-format dummy`` its config.json alone) is built twice, as
``task="classify"`` (the step gathers each sequence's last hidden state and multiplies it by the
[hidden, num_labels] head on device, [S, num_labels] f32 back to the host) and as ``task="embed"``
(LAST pooling: the step's per-sequence sums and last states, [S, hidden] f32 each, back to the host),
with the same engine arguments; the same prompts run through each --repeats times, alternating, each
timed after a warm run; the best and the median prompt tok/s of each are reported, and their ratio.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import log, log_machine, parse_range, synthetic_requests, write_json  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dummy:tiny-llama-classifier")
    ap.add_argument("--load-format", default="auto", help="dummy: random weights for a config.json directory")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=parse_range, default=(16, 128), help="prompt lengths, uniform in LO..HI")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output-json")
    args = ap.parse_args(argv)

    from jaxllm.llm import LLM

    machine = log_machine()
    kw = dict(max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
              max_model_len=args.input_len[1] + 16, kv_cache_memory_bytes=256 << 20, seed=args.seed,
              load_format=args.load_format)
    llms = {"classify": LLM(args.model, task="classify", **kw), "embed": LLM(args.model, task="embed", **kw)}
    vocab = llms["classify"].engine.vocab_size
    prompts = [r.prompt_token_ids for r in synthetic_requests(args.num_prompts, args.input_len, (1, 1), vocab,
                                                              args.seed)]
    n_tok = sum(len(p) for p in prompts)
    run = {"classify": lambda: llms["classify"].classify(prompts, use_tqdm=False),
           "embed": lambda: llms["embed"].embed(prompts, use_tqdm=False)}
    for f in run.values():
        f()  # warm run, untimed
    secs = {k: [] for k in run}
    for _ in range(args.repeats):
        for k, f in run.items():
            t0 = time.perf_counter()
            f()
            secs[k].append(time.perf_counter() - t0)
    rows = [{"task": k, "best_s": min(v), "median_s": statistics.median(v), "best_prompt_tok_per_s": n_tok / min(v),
             "median_prompt_tok_per_s": n_tok / statistics.median(v)} for k, v in secs.items()]
    log(f"{args.model}: {args.num_prompts} prompts, {n_tok} tokens ({args.input_len[0]}..{args.input_len[1]}), "
        f"{args.repeats} timed runs each, alternating")
    for r in rows:
        log(f"{r['task']:9s} best {r['best_s'] * 1e3:8.1f} ms ({r['best_prompt_tok_per_s']:9.1f} prompt tok/s)  "
            f"median {r['median_s'] * 1e3:8.1f} ms ({r['median_prompt_tok_per_s']:9.1f} prompt tok/s)")
    ratio = rows[0]["median_s"] / rows[1]["median_s"]
    log(f"classify / embed median time: {ratio:.3f}x; load after: {os.getloadavg()}")
    if args.output_json:
        write_json(args.output_json, {"machine": machine, "args": vars(args) | {"input_len": list(args.input_len)},
                                      "rows": rows, "classify_over_embed_median_time": ratio})
    return 0


if __name__ == "__main__":
    sys.exit(main())
