"""Python clients for jaxllm.v1.Generation (sync and asyncio) and a small CLI.

    from serving.client import GenerationClient
    with GenerationClient("127.0.0.1:50051", api_key=None) as c:
        for text in c.stream_text("The capital of France is", max_tokens=16, temperature=0):
            print(text, end="", flush=True)
        result = c.complete(chat=[{"role": "user", "content": "Hi!"}], max_tokens=32)
        print(result.texts[0], result.finish_reasons[0], result.usage)

    python -m serving.client --target 127.0.0.1:50051 "The three primary colors are"
    python -m serving.client --chat --max-tokens 64 "What is the capital of France?"
"""

from __future__ import annotations

import json
import sys
from typing import AsyncIterator, Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jaxllm.logprobs_table import Alternative, TokenRow, format_table
from serving.client_messages import (FINISH_NAMES, SAMPLING_FIELDS, Completion, build_request,
                                     classify_request, structured_outputs_to_proto)
from serving.proto.jaxllm.v1 import generation_pb2 as pb
from serving.proto.jaxllm.v1 import generation_pb2_grpc as pb_grpc

__all__ = ["GenerationClient", "AsyncGenerationClient", "Completion", "build_request", "classify_request",
           "structured_outputs_to_proto", "FINISH_NAMES", "SAMPLING_FIELDS", "logprob_rows", "main"]


def _metadata(api_key: str | None):
    """api_key None = $JAXLLM_API_KEY, else $VLLM_API_KEY (what the server reads too); "" = send none."""
    if api_key is None:
        from jaxllm.cli_args import api_key_from_env  # argparse and os only: no jax

        api_key = api_key_from_env()
    return (("authorization", f"Bearer {api_key}"),) if api_key else None


def _credentials(tls_ca: str | None, tls: bool, tls_cert: str | None = None,
                 tls_key: str | None = None):
    """None for plaintext; TLS with ``tls_ca`` (else the system roots) as trusted roots, and the
    client certificate ``tls_cert``/``tls_key`` for a server run with --tls-client-ca."""
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("tls_cert/tls_key are invalid: give both or neither")
    if not (tls or tls_ca or tls_cert):
        return None

    def read(path):
        with open(path, "rb") as f:
            return f.read()

    return grpc.ssl_channel_credentials(
        root_certificates=read(tls_ca) if tls_ca else None,
        private_key=read(tls_key) if tls_key else None,
        certificate_chain=read(tls_cert) if tls_cert else None)


class GenerationClient:
    """Blocking client. ``timeout`` (seconds) becomes each call's gRPC deadline; ``api_key=None``
    reads ``$JAXLLM_API_KEY`` (as the server does), ``api_key=""`` sends no key."""

    def __init__(self, target: str = "127.0.0.1:50051", *, api_key: str | None = None,
                 tls: bool = False, tls_ca: str | None = None, timeout: float | None = None,
                 options: list | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None):
        creds = _credentials(tls_ca, tls, tls_cert, tls_key)
        self.channel = (grpc.secure_channel(target, creds, options=options) if creds
                        else grpc.insecure_channel(target, options=options))
        self.stub = pb_grpc.GenerationStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.metadata = _metadata(api_key)
        self.timeout = timeout

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.channel.close()

    def generate(self, prompt: str | None = None, *, timeout: float | None = None,
                 **kw) -> Iterator[pb.GenerateResponse]:
        """Stream the raw responses. Breaking out of the loop cancels the request."""
        call = self.stub.Generate(build_request(prompt, **kw), metadata=self.metadata,
                                  timeout=timeout or self.timeout)
        try:
            yield from call
        finally:
            call.cancel()

    def stream_text(self, prompt: str | None = None, **kw) -> Iterator[str]:
        """Text deltas of sample 0."""
        for resp in self.generate(prompt, **kw):
            for d in resp.outputs:
                if d.index == 0 and d.text:
                    yield d.text

    def complete(self, prompt: str | None = None, **kw) -> Completion:
        result = Completion()
        for resp in self.generate(prompt, **kw):
            result.add(resp)
        return result

    def tokenize(self, text: str | None = None, *, chat: list[dict] | None = None) -> list[int]:
        req = pb.TokenizeRequest(text=text) if chat is None else pb.TokenizeRequest(
            chat=pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in chat]))
        return list(self.stub.Tokenize(req, metadata=self.metadata, timeout=self.timeout).token_ids)

    def detokenize(self, token_ids: list[int], skip_special_tokens: bool | None = None) -> str:
        req = pb.DetokenizeRequest(token_ids=token_ids)
        if skip_special_tokens is not None:
            req.skip_special_tokens = skip_special_tokens
        return self.stub.Detokenize(req, metadata=self.metadata, timeout=self.timeout).text

    def classify(self, prompts: str | list[str] | list[int] | list[list[int]], *, activation: bool | None = None,
                 truncate_prompt_tokens: int | None = None, request_id: str = "",
                 timeout: float | None = None) -> pb.ClassifyResponse:
        """The Classify rpc (a --task classify server): ``prompts`` as ``LLM.classify`` takes them;
        ``results[i].probs`` (softmax / sigmoid; raw logits with ``activation=False``), ``label``."""
        req = classify_request(prompts, activation=activation, truncate_prompt_tokens=truncate_prompt_tokens,
                               request_id=request_id)
        return self.stub.Classify(req, metadata=self.metadata, timeout=timeout or self.timeout)

    def model_info(self) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=self.metadata,
                                      timeout=self.timeout)

    def list_adapters(self) -> pb.ListAdaptersResponse:
        return self.stub.ListAdapters(pb.ListAdaptersRequest(), metadata=self.metadata, timeout=self.timeout)

    def load_adapter(self, name: str, path: str) -> pb.Adapter:
        return self.stub.LoadAdapter(pb.LoadAdapterRequest(name=name, path=path), metadata=self.metadata,
                                     timeout=self.timeout)

    def unload_adapter(self, name: str) -> pb.Adapter:
        return self.stub.UnloadAdapter(pb.UnloadAdapterRequest(name=name), metadata=self.metadata,
                                       timeout=self.timeout)

    def health(self, service: str = "") -> str:
        resp = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service),
                                      timeout=self.timeout or 5.0)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


class AsyncGenerationClient:
    """asyncio client (grpc.aio). Use ``async with``; cancelling the consuming task cancels the RPC.
    ``api_key`` as in :class:`GenerationClient`."""

    def __init__(self, target: str = "127.0.0.1:50051", *, api_key: str | None = None,
                 tls: bool = False, tls_ca: str | None = None, timeout: float | None = None,
                 options: list | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None):
        creds = _credentials(tls_ca, tls, tls_cert, tls_key)
        self.channel = (grpc.aio.secure_channel(target, creds, options=options) if creds
                        else grpc.aio.insecure_channel(target, options=options))
        self.stub = pb_grpc.GenerationStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.metadata = _metadata(api_key)
        self.timeout = timeout

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def generate(self, prompt: str | None = None, *, timeout: float | None = None,
                       **kw) -> AsyncIterator[pb.GenerateResponse]:
        call = self.stub.Generate(build_request(prompt, **kw), metadata=self.metadata,
                                  timeout=timeout or self.timeout)
        try:
            async for resp in call:
                yield resp
        finally:
            call.cancel()

    async def stream_text(self, prompt: str | None = None, **kw) -> AsyncIterator[str]:
        async for resp in self.generate(prompt, **kw):
            for d in resp.outputs:
                if d.index == 0 and d.text:
                    yield d.text

    async def complete(self, prompt: str | None = None, **kw) -> Completion:
        result = Completion()
        async for resp in self.generate(prompt, **kw):
            result.add(resp)
        return result

    async def tokenize(self, text: str | None = None, *, chat: list[dict] | None = None) -> list[int]:
        req = pb.TokenizeRequest(text=text) if chat is None else pb.TokenizeRequest(
            chat=pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in chat]))
        resp = await self.stub.Tokenize(req, metadata=self.metadata, timeout=self.timeout)
        return list(resp.token_ids)

    async def detokenize(self, token_ids: list[int], skip_special_tokens: bool | None = None) -> str:
        req = pb.DetokenizeRequest(token_ids=token_ids)
        if skip_special_tokens is not None:
            req.skip_special_tokens = skip_special_tokens
        resp = await self.stub.Detokenize(req, metadata=self.metadata, timeout=self.timeout)
        return resp.text

    async def classify(self, prompts: str | list[str] | list[int] | list[list[int]], *,
                       activation: bool | None = None, truncate_prompt_tokens: int | None = None,
                       request_id: str = "", timeout: float | None = None) -> pb.ClassifyResponse:
        """As :meth:`GenerationClient.classify`."""
        req = classify_request(prompts, activation=activation, truncate_prompt_tokens=truncate_prompt_tokens,
                               request_id=request_id)
        return await self.stub.Classify(req, metadata=self.metadata, timeout=timeout or self.timeout)

    async def model_info(self) -> pb.ModelInfo:
        return await self.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=self.metadata,
                                            timeout=self.timeout)

    async def list_adapters(self) -> pb.ListAdaptersResponse:
        return await self.stub.ListAdapters(pb.ListAdaptersRequest(), metadata=self.metadata,
                                            timeout=self.timeout)

    async def load_adapter(self, name: str, path: str) -> pb.Adapter:
        return await self.stub.LoadAdapter(pb.LoadAdapterRequest(name=name, path=path),
                                           metadata=self.metadata, timeout=self.timeout)

    async def unload_adapter(self, name: str) -> pb.Adapter:
        return await self.stub.UnloadAdapter(pb.UnloadAdapterRequest(name=name), metadata=self.metadata,
                                             timeout=self.timeout)

    async def health(self, service: str = "") -> str:
        resp = await self.health_stub.Check(health_pb2.HealthCheckRequest(service=service),
                                            timeout=self.timeout or 5.0)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


# ----- CLI ---------------------------------------------------------------------------------
def logprob_rows(token_ids: list[int], entries: list, k: int, text) -> list[TokenRow]:
    """Table rows from the proto: per token, ``entries[i]`` lists (best first) the token itself and
    the top-k (a ``TokenLogprobs``' ``top_logprobs``, or a ``PromptTokenLogprobs``' ``logprobs``;
    None or ``present=False``: nothing predicts it). The proto carries no rank: it is exact when
    the token is among the top-k (1 + how many listed are strictly more likely), else ">k".
    ``text(id)`` gives a token's text."""
    rows = []
    for pos, (tid, e) in enumerate(zip(token_ids, entries)):
        if isinstance(e, pb.PromptTokenLogprobs):
            listed = list(e.logprobs) if e.present else []
        else:
            listed = list(e.top_logprobs) if e is not None else []
        own = next((x.logprob for x in listed if x.token_id == tid), None)
        if own is None:
            rows.append(TokenRow(pos, tid, text(tid), None, None, []))
            continue
        above = sum(x.logprob > own for x in listed)
        inside = above < k
        alts = [Alternative(x.token_id, text(x.token_id), x.logprob) for x in listed
                if inside or x.token_id != tid][:k]
        rows.append(TokenRow(pos, tid, text(tid), own, above + 1 if inside else f">{k}", alts))
    return rows


def _print_logprobs(client: "GenerationClient", result: Completion, logprobs: int | None,
                    prompt_logprobs: int | None) -> None:
    texts: dict[int, str] = {}

    def text(tid: int) -> str:  # the server's tokenizer, one Detokenize per distinct id
        if tid not in texts:
            texts[tid] = client.detokenize([tid], skip_special_tokens=False)
        return texts[tid]

    if prompt_logprobs is not None and result.prompt_logprobs:
        print(format_table(logprob_rows(result.prompt_token_ids, result.prompt_logprobs, prompt_logprobs, text),
                           prompt_logprobs, "prompt logprobs (position 0 has none):"))
    if logprobs is not None:
        for i in sorted(result.logprobs):
            tag = f"[{i}] " if len(result.token_ids) > 1 else ""
            print(format_table(logprob_rows(result.token_ids[i], result.logprobs[i], logprobs, text),
                               logprobs, f"{tag}logprobs of the generated tokens:"))


def build_parser():
    from jaxllm.cli_args import ArgumentParser, add_hidden_alias
    from jaxllm.sampling_args import add_sampling_args

    p = ArgumentParser(prog="python -m serving.client", description="Stream a completion from a jaxllm gRPC server.")
    p.add_argument("prompt", nargs="?", help="prompt text (a user message with --chat); required unless "
                   "--info or --health (default: none)")
    p.add_argument("--target", default="127.0.0.1:50051", help="server address HOST:PORT")
    p.add_argument("--chat", action="store_true",
                   help="send the prompt as a chat user message (default: plain text)")
    p.add_argument("--system", help="system message, with --chat (default: none)")
    p.add_argument("--tools", metavar="FILE", help="JSON file of OpenAI tools for --chat; each call the "
                   "server reads is printed as a JSON line after the text (default: none)")
    p.add_argument("--tool-choice", default="", help="none, auto, required or a function name, with "
                   "--tools (default: auto with tools)")
    p.add_argument("--api-key", default=None,
                   help="sent as 'authorization: Bearer <key>' (default: $JAXLLM_API_KEY, else $VLLM_API_KEY, "
                        "else none)")
    p.add_argument("--tls", action="store_true", help="use TLS with the system roots (default: plaintext)")
    p.add_argument("--tls-ca", help="PEM root certificate(s) to trust; implies --tls (default: system roots)")
    p.add_argument("--tls-cert", help="PEM client certificate, with --tls-key, for a server run with "
                                      "--tls-client-ca; implies --tls (default: none)")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert (default: none)")
    p.add_argument("--timeout", type=float, help="deadline in seconds (default: none)")
    p.add_argument("--request-id", default="", help="request id (default: the server assigns one)")
    p.add_argument("--lora-name", default="", help="a LoRA adapter the server serves (default: the base model)")
    p.add_argument("--priority", type=int, default=0,
                   help="request priority, lower runs first on a server run with --scheduling-policy priority "
                        "(default: 0)")
    p.add_argument("--info", action="store_true", help="print GetModelInfo and exit (default: off)")
    p.add_argument("--health", action="store_true", help="print the health status and exit (default: off)")
    p.add_argument("--show-usage", action="store_true",
                   help="print the finish reason and token usage after the text (default: off)")
    add_sampling_args(p, server_defaults=True)
    # old spellings of this client, kept working
    add_hidden_alias(p, "--seed", "sampling_seed", type=int)
    add_hidden_alias(p, "--stop-token-id", "stop_token_ids", type=int, action="extend", nargs=1)
    return p


def main(argv: list[str] | None = None) -> int:
    from jaxllm.sampling_args import sampling_fields_from_args

    p = build_parser()
    args = p.parse_args(argv)
    sampling = {k: v for k, v in sampling_fields_from_args(args).items() if k in SAMPLING_FIELDS}
    client = GenerationClient(args.target, api_key=args.api_key, tls=args.tls,
                              tls_ca=args.tls_ca, timeout=args.timeout, tls_cert=args.tls_cert,
                              tls_key=args.tls_key)
    try:
        if args.health:
            print(client.health())
            return 0
        if args.info:
            print(client.model_info())
            return 0
        if args.prompt is None:
            p.error("a prompt is required (or --info / --health)")
        kw = dict(sampling, request_id=args.request_id, lora_name=args.lora_name, priority=args.priority)
        if args.chat:
            chat = ([{"role": "system", "content": args.system}] if args.system else [])
            chat.append({"role": "user", "content": args.prompt})
            kw["chat"] = chat
            if args.tools:
                try:
                    with open(args.tools, encoding="utf-8") as f:
                        kw["tools"] = json.load(f)
                except (OSError, ValueError) as exc:
                    p.error(f"--tools {args.tools} is invalid: {getattr(exc, 'strerror', None) or exc}")
            kw["tool_choice"] = args.tool_choice
        elif args.tools or args.tool_choice:
            p.error("--tools/--tool-choice need --chat")
        else:
            kw["prompt"] = args.prompt
        result = Completion()
        multi = (args.n or 1) > 1
        for resp in client.generate(**kw):
            result.add(resp)
            if not multi:
                for d in resp.outputs:
                    sys.stdout.write(d.text)
                sys.stdout.flush()
        if multi:
            for i in sorted(result.texts):
                print(f"--- [{i}] ---\n{result.texts[i]}")
        else:
            print()
        for i in sorted(result.tool_calls):
            for call in result.tool_calls[i]:
                print(json.dumps({"index": i, "name": call["name"], "arguments": call["arguments"]},
                                 ensure_ascii=False))
        if args.logprobs is not None or args.prompt_logprobs is not None:
            _print_logprobs(client, result, args.logprobs, args.prompt_logprobs)
        if args.show_usage:  # its own line on stdout, after the text's newline
            u = result.usage
            print(f"finish_reason={result.finish_reasons} usage: prompt={u.prompt_tokens} "
                  f"completion={u.completion_tokens} cached={u.cached_tokens}")
        sys.stdout.flush()
        return 0
    except grpc.RpcError as exc:
        sys.stdout.flush()
        print(f"\nerror: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
