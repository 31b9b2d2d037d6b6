"""The chat, tool-calling and reasoning flags (vLLM's names), shared by ``python -m serving`` and
``python -m serving.run_batch`` (argparse only, no jax): they fill ServerConfig's chat fields."""

from __future__ import annotations

import argparse

from serving.openai_tools import load_chat_template


def add_chat_args(p: argparse.ArgumentParser) -> None:
    c = p.add_argument_group("chat and tool calling (OpenAI HTTP API; vLLM's flags)")
    c.add_argument("--chat-template", default=None,
                   help="chat template for /v1/chat/completions and /tokenize: a file path or the Jinja "
                        "template itself (default: the model's); on a cross-encoder (--task classify) the "
                        "score template of /score, /rerank and Score: rendered on messages with roles "
                        "'query' and 'document' (default: the pair encoding)")
    c.add_argument("--trust-request-chat-template", action="store_true",
                   help="let a request's chat_template field replace the template (default: refused)")
    c.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="serve tool_choice 'auto' (the default when a request has tools): the model's "
                        "text is split into content and tool calls by --tool-call-parser (default: off, "
                        "such requests get 400)")
    c.add_argument("--tool-call-parser", default=None,
                   help="parser of the model's tool calls for tool_choice 'auto' (e.g. hermes; default: none)")
    c.add_argument("--reasoning-parser", default=None,
                   help="split a thinking model's reasoning out of chat answers into the message's "
                        f"'reasoning' field; one of {', '.join(_reasoning_parsers())} (default: none)")


def chat_fields_from_args(args: argparse.Namespace) -> dict:
    """ServerConfig's chat fields from the flags above (the template file is read here)."""
    return dict(chat_template=load_chat_template(args.chat_template) if args.chat_template else None,
                trust_request_chat_template=args.trust_request_chat_template,
                enable_auto_tool_choice=args.enable_auto_tool_choice, tool_call_parser=args.tool_call_parser,
                reasoning_parser=args.reasoning_parser)


def _reasoning_parsers() -> list[str]:
    from serving.reasoning_parsers import PARSERS  # no jax

    return sorted(PARSERS)
