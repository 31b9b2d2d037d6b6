"""python -m jaxllm.generate: offline batch generation on the continuous-batching engine.

    python -m jaxllm.generate --model smollm2-135m --chat --prompt "What is the capital of France?" \\
        --max-tokens 16 --temperature 0
    python -m jaxllm.generate --input prompts.jsonl --output out.jsonl   # {"prompt": ...} or {"messages": [...]}
"""
from __future__ import annotations

import argparse
import sys
import time

import msgspec

from jaxllm.config import EngineConfig
from jaxllm.parallel.cli import add_distributed_args, run_follower, start_distributed
from jaxllm.sampling_params import SamplingParams


def add_engine_args(ap: argparse.ArgumentParser) -> None:
    """Engine flags, named like vLLM's (shared with the gRPC server and the benches)."""
    d = EngineConfig()
    g = ap.add_argument_group("engine")
    g.add_argument("--model", default="smollm2-135m",
                   help="model name (smollm2-135m), HF directory, .gguf file, Orbax directory, or dummy preset")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    g.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
    g.add_argument("--block-size", type=int, default=d.block_size)
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    g.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization)
    g.add_argument("--tensor-parallel-size", type=int, default=1)
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "gguf", "dummy", "orbax"])
    g.add_argument("--seed", type=int, default=0, help="engine seed (requests without a seed draw from it)")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=d.async_scheduling,
                   help="dispatch step N+1 before reading step N's tokens back (overlaps host and device)")


def engine_config_from_args(args) -> EngineConfig:
    return EngineConfig(model=args.model, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                        max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
                        enable_prefix_caching=args.enable_prefix_caching,
                        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
                        gpu_memory_utilization=args.gpu_memory_utilization,
                        tensor_parallel_size=args.tensor_parallel_size, dtype=args.dtype,
                        load_format=args.load_format, seed=args.seed,
                        async_scheduling=args.async_scheduling)


def add_sampling_args(ap: argparse.ArgumentParser) -> None:
    d = SamplingParams()
    g = ap.add_argument_group("sampling")
    g.add_argument("--n", type=int, default=d.n)
    g.add_argument("--temperature", type=float, default=d.temperature)
    g.add_argument("--top-p", type=float, default=d.top_p)
    g.add_argument("--top-k", type=int, default=d.top_k)
    g.add_argument("--min-p", type=float, default=d.min_p)
    g.add_argument("--presence-penalty", type=float, default=d.presence_penalty)
    g.add_argument("--frequency-penalty", type=float, default=d.frequency_penalty)
    g.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty)
    g.add_argument("--sampling-seed", type=int, default=None, help="per-request seed")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--stop-token-ids", type=int, nargs="+", default=None)
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--max-tokens", type=int, default=d.max_tokens)
    g.add_argument("--min-tokens", type=int, default=d.min_tokens)
    g.add_argument("--logprobs", type=int, default=None)
    g.add_argument("--skip-special-tokens", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--allowed-token-ids", type=int, nargs="+", default=None, help="sample only among these ids")
    g.add_argument("--logit-bias", type=_logit_bias, default=None, metavar="JSON",
                   help='token id -> bias added to its logit, e.g. \'{"50256": -100}\'')
    g.add_argument("--truncate-prompt-tokens", type=int, default=None, help="keep each prompt's last K tokens")


def sampling_params_from_args(args) -> SamplingParams:
    return SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          min_p=args.min_p, presence_penalty=args.presence_penalty,
                          frequency_penalty=args.frequency_penalty, repetition_penalty=args.repetition_penalty,
                          seed=args.sampling_seed, stop=args.stop, stop_token_ids=args.stop_token_ids,
                          ignore_eos=args.ignore_eos, max_tokens=args.max_tokens, min_tokens=args.min_tokens,
                          logprobs=args.logprobs, skip_special_tokens=args.skip_special_tokens,
                          allowed_token_ids=args.allowed_token_ids, logit_bias=args.logit_bias,
                          truncate_prompt_tokens=args.truncate_prompt_tokens)


def _logit_bias(text: str) -> dict[int, float]:
    try:
        return msgspec.json.decode(text, type=dict[int, float])
    except msgspec.DecodeError as e:
        raise argparse.ArgumentTypeError(f"--logit-bias {text!r} is invalid: need a JSON object of "
                                         f"token id -> number ({e})") from None


def read_inputs(path: str, chat: bool) -> list[tuple[str, object]]:
    """→ [(kind, payload)] with kind "text" | "chat" | "ids"; lines are plain text or JSON objects
    with "prompt", "messages" or "prompt_token_ids"."""
    items = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                try:
                    obj = msgspec.json.decode(line)
                except msgspec.DecodeError as e:
                    raise ValueError(f"{path}:{lineno}: invalid JSON ({e})") from None
                if "messages" in obj:
                    items.append(("chat", obj["messages"]))
                elif "prompt_token_ids" in obj:
                    items.append(("ids", obj["prompt_token_ids"]))
                elif "prompt" in obj:
                    items.append(("chat" if chat else "text", _user(obj["prompt"]) if chat else obj["prompt"]))
                else:
                    raise ValueError(f"{path}:{lineno}: a JSON line needs 'prompt', 'messages' or 'prompt_token_ids'")
            else:
                items.append(("chat", _user(line)) if chat else ("text", line))
    return items


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jaxllm.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", action="append", default=[], help="prompt (repeatable)")
    ap.add_argument("--chat-prompt", action="append", default=[],
                    help="a user message sent through the chat template (repeatable)")
    ap.add_argument("--input", help="file of prompts: text lines or JSONL")
    ap.add_argument("--output", help="write one JSON RequestOutput per line")
    ap.add_argument("--chat", action="store_true", help="send --prompt/--input text through the chat template")
    ap.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    ap.add_argument("--profile", metavar="DIR", help="trace steady-state decode steps with jax.profiler into DIR "
                    "(summarise with bench/profile_report.py DIR)")
    ap.add_argument("--profile-steps", type=int, default=20, help="number of engine steps to trace")
    add_engine_args(ap)
    add_sampling_args(ap)
    add_distributed_args(ap)
    args = ap.parse_args(argv)
    try:
        leader = start_distributed(args)  # multi-host: jax.distributed.initialize; process 0 leads
        if not leader:  # other processes execute process 0's steps on their devices, then exit
            run_follower(engine_config_from_args(args))
            return 0
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from checkpoints import CheckpointError
    from jaxllm.llm import LLM

    items = [("chat", _user(p)) if args.chat else ("text", p) for p in args.prompt]
    items += [("chat", _user(p)) for p in args.chat_prompt]
    try:
        if args.input:
            items += read_inputs(args.input, args.chat)
        if not items:
            ap.error("no prompts: give --prompt, --chat-prompt or --input")
        params = sampling_params_from_args(args).validate()
        t0 = time.perf_counter()
        llm = LLM(**msgspec.structs.asdict(engine_config_from_args(args)))
        tok = llm.get_tokenizer()
        prompts = []
        for kind, payload in items:
            if kind == "chat":
                prompts.append(tok.chat_prompt(payload))
            elif kind == "ids":
                prompts.append({"prompt_token_ids": list(payload)})
            else:
                prompts.append(payload)
        prof = None
        if args.profile:
            from jaxllm.profiling import EngineProfiler
            prof = EngineProfiler(llm.engine, args.profile, num_steps=args.profile_steps)
        t1 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=not args.no_progress)
        secs = time.perf_counter() - t1
        llm.engine.runner.stop_followers()  # multi-host: release processes > 0 (no-op on one host)
        if prof is not None and prof.finish() is None:
            print(f"warning: --profile: no steady-state decode steps to trace (the run had fewer than "
                  f"{prof.skip + 1} decode-only steps)", file=sys.stderr)
    except (ValueError, CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_prompt = sum(len(o.prompt_token_ids) for o in outs)
    n_out = sum(len(c.token_ids) for o in outs for c in o.outputs)
    for (kind, payload), o in zip(items, outs):
        shown = payload[-1]["content"] if kind == "chat" else payload
        print(f"\n>>> {shown!r}" if kind != "ids" else f"\n>>> {len(payload)} token ids")
        for c in o.outputs:
            tag = f"[{c.index}] " if len(o.outputs) > 1 else ""
            print(f"{tag}{c.text}\n    (finish_reason={c.finish_reason}, {len(c.token_ids)} tokens)")
    if args.output:
        with open(args.output, "wb") as f:
            for o in outs:
                f.write(msgspec.json.encode(o) + b"\n")
    print(f"\n{len(outs)} requests, {n_prompt} prompt tokens, {n_out} output tokens in {secs:.2f}s: "
          f"{n_out / secs:.1f} output tok/s (engine start {t1 - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
