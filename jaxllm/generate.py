"""python -m jaxllm.generate: offline batch generation on the continuous-batching engine.

    python -m jaxllm.generate --model smollm2-135m --chat --prompt "What is the capital of France?" \\
        --max-tokens 16 --temperature 0
    python -m jaxllm.generate --input prompts.jsonl --output out.jsonl
        # lines: text, or {"prompt": ...} / {"messages": [...]} / {"prompt_token_ids": [...]}
        # plus SamplingParams fields for that line, e.g. {"prompt": "Hi", "max_tokens": 3}, and its
        # "priority" (with --scheduling-policy priority)
    python -m jaxllm.generate --task embed --model DIR --input texts.txt --output emb.jsonl
        # one {"request_id", "prompt", "prompt_token_ids", "embedding"} line per prompt
"""
from __future__ import annotations

import sys
import time

import msgspec

from jaxllm.cli_args import (ArgumentParser, add_engine_args, add_log_level_arg, configure_logging,
                             engine_config_from_args, parse_lora_module)
from jaxllm.logprobs_table import format_table, rows_from_logprobs
from jaxllm.metrics.loggers import validate_interval
from jaxllm.outputs import output_json
from jaxllm.parallel.cli import add_distributed_args, run_follower, start_distributed
from jaxllm.prompt_inputs import cli_items, read_inputs, validate_items
from jaxllm.sampling_args import add_sampling_args, sampling_fields_from_args, sampling_params_from_args
from jaxllm.sampling_params import SamplingParams

__all__ = ["add_engine_args", "engine_config_from_args", "add_sampling_args", "sampling_params_from_args",
           "build_parser", "main"]


def build_parser() -> ArgumentParser:
    ap = ArgumentParser(prog="python -m jaxllm.generate", description=__doc__)
    ap.add_argument("--prompt", action="append", default=[], help="a prompt, repeatable (default: none)")
    ap.add_argument("--chat-prompt", action="append", default=[],
                    help="a user message sent through the chat template, repeatable (default: none)")
    ap.add_argument("--input", help="file of prompts: text lines, or JSONL lines with prompt, messages or "
                    "prompt_token_ids, per-line SamplingParams fields and priority (default: none)")
    ap.add_argument("--output", help="write one JSON RequestOutput per line to this file (default: none)")
    ap.add_argument("--chat", action="store_true",
                    help="send --prompt and --input text through the chat template (default: off)")
    ap.add_argument("--no-progress", action="store_true", help="hide the progress bar (default: shown)")
    ap.add_argument("--profile", metavar="DIR", help="trace steady-state decode steps with jax.profiler into "
                    "DIR; summarise with bench/profile_report.py DIR (default: off)")
    ap.add_argument("--profile-steps", type=int, default=20, help="number of engine steps to trace")
    ap.add_argument("--log-stats", action="store_true",
                    help="log a stats line (prompt/generation throughput, running/waiting requests, KV cache "
                    "usage, prefix cache hit rate) every --log-stats-interval seconds and at the end (default: off)")
    ap.add_argument("--log-stats-interval", type=float, default=10.0, help="seconds between stats lines")
    ap.add_argument("--lora", type=parse_lora_module, default=None, metavar="NAME=PATH",
                    help="run every prompt with this LoRA adapter (a PEFT directory); implies --enable-lora "
                         "(default: the base model)")
    add_log_level_arg(ap)
    add_engine_args(ap)
    add_sampling_args(ap, model_defaults=True)
    add_distributed_args(ap)
    return ap


def load_prompts(args) -> list:
    """Every prompt with its SamplingParams, tokenized and checked with the tokenizer and the model
    config alone (seconds), so a bad line fails before the engine is built and compiled."""
    from checkpoints import load_config, load_tokenizer
    from jaxllm.tokenizer import TokenIdsOnlyTokenizer

    params = model_sampling_params(args)
    items = cli_items(args.prompt, args.chat_prompt, args.chat, params)
    if args.input:
        items += read_inputs(args.input, args.chat, params, args.scheduling_policy)
    if not items:
        raise ValueError("no prompts: give --prompt, --chat-prompt or --input")
    mc, source = load_config(args.model, args.load_format, getattr(args, "hf_overrides", None))
    max_model_len = args.max_model_len or mc.max_model_len_limit
    if max_model_len > mc.max_model_len_limit:
        raise ValueError(f"max_model_len={max_model_len} is invalid: the model supports at most "
                         f"{mc.max_model_len_limit} positions")
    tok = load_tokenizer(source, mc) or TokenIdsOnlyTokenizer(mc.vocab_size, mc.eos_token_ids)
    from jaxllm.engine.factory import resolve_task

    task = resolve_task(engine_config_from_args(args), mc, source[1] if source and source[0] == "dir" else None).task
    validate_items(items, tok, mc.vocab_size, max_model_len, task=task)
    return items


def model_sampling_params(args) -> SamplingParams:
    """The sampling flags as SamplingParams; the flags not given take the model's generation config
    (--generation-config, --override-generation-config), as vLLM's LLM does, and a line says which."""
    from jaxllm.engine.factory import _info, generation_defaults

    gen = generation_defaults(engine_config_from_args(args), flags=True)
    given = {k: v for k, v in sampling_fields_from_args(args).items() if v is not None}
    taken = {k: v for k, v in gen.sampling.items() if k not in given}
    if taken:
        _info(f"sampling defaults from {gen.source}: {taken} (flags given on the command line win)")
    return SamplingParams(**gen.fill(given, cap=False)).validate()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        leader = start_distributed(args)  # multi-host: jax.distributed.initialize; process 0 leads
        if not leader:  # other processes execute process 0's steps on their devices, then exit
            run_follower(engine_config_from_args(args))
            return 0
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from checkpoints import CheckpointError
    from jaxllm.engine.gc_heap import freeze_startup_heap
    from jaxllm.llm import LLM

    try:
        engine_config_from_args(args).validate()
        validate_interval(args.log_stats_interval)
        items = load_prompts(args)
        llm = LLM(**msgspec.structs.asdict(engine_config_from_args(args)), disable_log_stats=not args.log_stats,
                  log_stats_interval=args.log_stats_interval)
        freeze_startup_heap()  # full collections then skip the start-up heap (engine/gc_heap.py)
        prof = None
        if args.profile:
            from jaxllm.profiling import EngineProfiler
            prof = EngineProfiler(llm.engine, args.profile, num_steps=args.profile_steps)
        if llm.engine.task in ("embed", "classify"):
            return _embed(llm, items, args)
        t1 = time.perf_counter()
        lora = None
        if args.lora is not None:
            from jaxllm.lora import LoRARequest

            lora = LoRARequest(args.lora[0], 1, args.lora[1])
        outs = llm.generate([it.prompt for it in items], [it.params for it in items],
                            use_tqdm=not args.no_progress, lora_request=lora,
                            priority=[it.priority for it in items])
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
    for it, o in zip(items, outs):
        print(f"\n>>> {it.shown}")
        if o.prompt_logprobs is not None:
            k = it.params.prompt_logprobs
            print(format_table(rows_from_logprobs(o.prompt_token_ids, o.prompt_logprobs, k), k,
                               "prompt logprobs (position 0 has none):"))
        for c in o.outputs:
            tag = f"[{c.index}] " if len(o.outputs) > 1 else ""
            print(f"{tag}{c.text}\n    (finish_reason={c.finish_reason}, {len(c.token_ids)} tokens)")
            if c.logprobs is not None:
                print(format_table(rows_from_logprobs(c.token_ids, c.logprobs, it.params.logprobs), it.params.logprobs,
                                   f"{tag}logprobs of the generated tokens:"))
    if args.output:
        with open(args.output, "wb") as f:
            for o in outs:
                f.write(output_json(o) + b"\n")  # logprobs as {"token_id": logprob}
    startup = getattr(llm.engine, "startup_seconds", None)
    print(f"\n{len(outs)} requests, {n_prompt} prompt tokens, {n_out} output tokens in {secs:.2f}s: "
          f"{n_out / secs:.1f} output tok/s" + (f" (engine start {startup:.1f}s)" if startup is not None else ""))
    return 0


def _embed(llm, items, args) -> int:
    """--task embed / classify (or such a checkpoint): embed or classify every prompt, print a summary
    per prompt, write one JSON line each to --output (``embedding``, or ``probs`` and ``label``)."""
    classify = llm.engine.task == "classify"
    labels = llm.engine.runner.model_config.labels if classify else ()
    t1 = time.perf_counter()
    run = llm.classify if classify else llm.embed
    outs = run([it.prompt for it in items], use_tqdm=not args.no_progress)
    secs = time.perf_counter() - t1
    for it, o in zip(items, outs):
        v = o.outputs.probs if classify else o.outputs.embedding
        label = f", label {labels[max(range(len(v)), key=v.__getitem__)]}" if classify else ""
        print(f"\n>>> {it.shown}\n    {'probs' if classify else 'embedding'}[{len(v)}] = "
              f"[{', '.join(f'{x:.4f}' for x in v[:4])}{', ...' if len(v) > 4 else ''}] "
              f"({len(o.prompt_token_ids)} tokens{label})")
    if args.output:
        with open(args.output, "wb") as f:
            for o in outs:
                res = ({"probs": o.outputs.probs, "label": labels[max(range(len(o.outputs.probs)),
                                                                       key=o.outputs.probs.__getitem__)]}
                       if classify else {"embedding": o.outputs.embedding})
                f.write(msgspec.json.encode({"request_id": o.request_id, "prompt": o.prompt,
                                             "prompt_token_ids": o.prompt_token_ids, **res}) + b"\n")
    n_prompt = sum(len(o.prompt_token_ids) for o in outs)
    startup = getattr(llm.engine, "startup_seconds", None)
    print(f"\n{len(outs)} {'classifications' if classify else 'embeddings'}, {n_prompt} prompt tokens in "
          f"{secs:.2f}s: {n_prompt / secs:.1f} prompt tok/s"
          + (f" (engine start {startup:.1f}s)" if startup is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
