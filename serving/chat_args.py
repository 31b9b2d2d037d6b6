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


    c.add_argument("--exclude-tools-when-tool-choice-none", action="store_true",
                   help="a request with tool_choice 'none' renders its template without the tools (default: off, "
                        "the tools are shown to the model, which may not call them)")
    c.add_argument("--default-chat-template-kwargs", type=_json_object, default=None, metavar="JSON",
                   help="chat template variables for every request, under the request's own chat_template_kwargs "
                        "(e.g. '{\"enable_thinking\": false}'; default: none)")
    c.add_argument("--response-role", default="assistant",
                   help="role of the chat answer when the request has add_generation_prompt (true unless "
                        "set); otherwise the answer keeps the last message's role")
    a = p.add_argument_group("answers (OpenAI HTTP API; vLLM's flags)")
    a.add_argument("--return-tokens-as-token-ids", action="store_true",
                   help="logprob tokens as 'token_id:N' unless a request sets return_tokens_as_token_ids "
                        "(default: off, their text)")
    a.add_argument("--enable-prompt-tokens-details", action="store_true",
                   help="usage carries prompt_tokens_details.cached_tokens: the prompt tokens served from the "
                        "prefix cache (default: off)")
    a.add_argument("--enable-force-include-usage", action="store_true",
                   help="every stream ends with a usage chunk, as if stream_options.include_usage were true "
                        "(default: off)")
    lg = a.add_mutually_exclusive_group()
    lg.add_argument("--enable-log-requests", action="store_true", dest="enable_log_requests",
                    help="one INFO line per admitted request: id, prompt (clipped to --max-log-len), sampling "
                         "parameters (default: off)")
    lg.add_argument("--disable-log-requests", action="store_false", dest="enable_log_requests", default=False,
                    help="no line per request (vLLM's older spelling; the default: off)")
    a.add_argument("--max-log-len", type=int, default=None,
                   help="prompt characters (or token ids) shown in a request's log line (default: all)")


def chat_fields_from_args(args: argparse.Namespace) -> dict:
    """ServerConfig's chat and answer fields from the flags above (the template file is read here)."""
    return dict(chat_template=load_chat_template(args.chat_template) if args.chat_template else None,
                trust_request_chat_template=args.trust_request_chat_template,
                enable_auto_tool_choice=args.enable_auto_tool_choice, tool_call_parser=args.tool_call_parser,
                reasoning_parser=args.reasoning_parser,
                exclude_tools_when_tool_choice_none=args.exclude_tools_when_tool_choice_none,
                default_chat_template_kwargs=args.default_chat_template_kwargs, response_role=args.response_role,
                return_tokens_as_token_ids=args.return_tokens_as_token_ids,
                enable_prompt_tokens_details=args.enable_prompt_tokens_details,
                enable_force_include_usage=args.enable_force_include_usage,
                enable_log_requests=args.enable_log_requests, max_log_len=args.max_log_len)


def _json_object(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: not JSON ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: must be a JSON object")
    return value


def _reasoning_parsers() -> list[str]:
    from serving.reasoning_parsers import PARSERS  # no jax

    return sorted(PARSERS)
