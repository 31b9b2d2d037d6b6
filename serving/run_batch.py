"""``python -m serving.run_batch -i in.jsonl -o out.jsonl --model ... [engine flags]``: vLLM's
``run-batch``, the OpenAI Batch API file format run offline through one engine (no jax here).

Input, one JSON object a line (blank lines skipped)::

    {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

``url``: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/responses`` (OpenAI's Batch API
takes it too), ``/v1/embeddings`` (a server started with ``--task embed``), ``/v1/score`` = ``/score``
and ``/v1/rerank`` = ``/rerank`` = ``/v2/rerank`` (vLLM's run-batch takes any url ending in /score or
/rerank: ``--task embed`` or a cross-encoder's ``--task classify``) or ``/v1/classify`` = ``/classify``
(``--task classify``). Output, one line per input line, in input order (vLLM's format)::

    {"id": "batch-...", "custom_id": "a",
     "response": {"status_code": 200, "request_id": "batch-req-...", "body": {<the HTTP answer>}},
     "error": null}

A refused request has ``response.status_code`` = the HTTP status the server would answer (400,
404, ...), ``response.body`` null and ``error`` = the server's error object
(``{"error": {"message", "type", "param", "code"}}``, as vLLM's ErrorResponse). Each body goes
through the HTTP server's own app in-process (the same validation, rendering, tool and reasoning
parsing, answers; no socket), so a line answers what ``POST url`` with that body would. Unlike
vLLM, whose run aborts on a line that is not JSON or whose body does not validate, a bad line
(not JSON, no ``custom_id``, a method other than POST, an unknown url, ``"stream": true``, a body
the server refuses) gets its 400 line and the other lines still run. All lines are in flight
together (up to ``--max-concurrent-lines``, default 2 x max_num_seqs, vLLM's bound), so the
scheduler batches them. ``-i -`` reads stdin, ``-o -`` writes stdout (logs go to stderr).

Exit codes: 0 when every line was answered (error lines included); 1 when the engine failed to
start or died; 2 for bad flags or an unreadable input file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import uuid
from typing import IO, Any, Callable

from jaxllm.cli_args import (ArgumentParser, add_engine_args, add_log_level_arg, configure_logging,
                             parse_lora_module)
from serving.chat_args import add_chat_args, chat_fields_from_args
from serving.config import ServerConfig

log = logging.getLogger("serving.run_batch")

URLS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/score", "/v1/rerank",
        "/v1/classify", "/score", "/rerank", "/v2/rerank", "/classify")  # the last four: the app's other paths
# the runner bounds what is in flight itself: the server's waiting-queue refusal (429) must not fire
_NO_QUEUE_LIMIT = 1 << 30


def error_line(custom_id: Any, status: int, message: str, param: str | None = None,
               kind: str = "invalid_request_error", code: str = "invalid_argument") -> dict:
    return output_line(custom_id, status, None,
                       {"error": {"message": message, "type": kind, "param": param, "code": code}})


def output_line(custom_id: Any, status: int, body: dict | None, error: dict | None) -> dict:
    return {"id": f"batch-{uuid.uuid4().hex}", "custom_id": custom_id,
            "response": {"status_code": status, "request_id": f"batch-req-{uuid.uuid4().hex}", "body": body},
            "error": error}


def parse_line(n: int, line: str) -> tuple[Any, str, dict] | dict:
    """(custom_id, url, body) of input line ``n`` (1-based), or its 400 output line."""
    try:
        obj = json.loads(line)
    except ValueError as exc:
        return error_line(None, 400, f"line {n} is not valid JSON: {exc}")
    if not isinstance(obj, dict):
        return error_line(None, 400, f"line {n}={_shown(obj)} is invalid: expected a JSON object")
    cid = obj.get("custom_id")
    if not isinstance(cid, str):
        return error_line(cid, 400, f"custom_id={_shown(cid)} on line {n} is invalid: expected a string",
                          "custom_id")
    extra = sorted(set(obj) - {"custom_id", "method", "url", "body"})
    if extra:
        return error_line(cid, 400, f"{extra[0]} on line {n} is not a supported field "
                                    "(custom_id, method, url, body)", extra[0])
    if obj.get("method") != "POST":
        return error_line(cid, 400, f"method={_shown(obj.get('method'))} on line {n} is invalid: must be 'POST'",
                          "method")
    url = obj.get("url")
    if url not in URLS:
        return error_line(cid, 400, f"url={_shown(url)} on line {n} is invalid: must be one of "
                                    f"{', '.join(URLS)}", "url")
    body = obj.get("body")
    if not isinstance(body, dict):
        return error_line(cid, 400, f"body={_shown(body)} on line {n} is invalid: expected a JSON object", "body")
    if body.get("stream") is True:  # vLLM: "Request must not be sent in stream mode"
        return error_line(cid, 400, f"stream=True on line {n} is invalid: a batch line is answered whole "
                                    "(leave stream unset or false)", "stream")
    return cid, url, body


def _shown(value: Any) -> str:
    r = repr(value)
    return r if len(r) <= 80 else r[:77] + "..."


class BatchRunner:
    """The engine, front door and HTTP app of a server, without its sockets: ``await start()``,
    then ``await run(lines, write)``, then ``await stop()``. ``engine`` / ``engine_factory`` as
    ``ServingServer``'s."""

    def __init__(self, config: ServerConfig, *, engine: Any = None,
                 engine_factory: Callable[[], Any] | None = None, max_concurrent: int | None = None):
        from serving.server import ServingServer  # grpc is imported, nothing binds

        self.server = ServingServer(config, engine=engine, engine_factory=engine_factory, idle_tick=0.02)
        self.max_concurrent = max_concurrent
        self._client = None

    async def start(self) -> None:
        import httpx

        from serving.openai_api import build_app

        await self.server.async_engine.start()  # build + warm-up; raises what they raised
        transport = httpx.ASGITransport(app=build_app(self.server))
        self._client = httpx.AsyncClient(transport=transport, base_url="http://batch", timeout=None)

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.aclose()
        self.server.door.abort_all("batch runner stopped")
        await self.server.async_engine.stop(timeout=2.0)

    def _bound(self) -> int:
        if self.max_concurrent is not None:
            return self.max_concurrent
        from serving.frontdoor import config_get

        return 2 * int(config_get(self.server.async_engine.engine, "max_num_seqs") or 128)

    async def answer(self, n: int, line: str) -> dict:
        """The output line of input line ``n``."""
        parsed = parse_line(n, line)
        if isinstance(parsed, dict):
            return parsed
        cid, url, body = parsed
        try:
            resp = await self._client.post(url, json=body)
            data = resp.json()
        except Exception as exc:  # noqa: BLE001 - a bug of ours: this line fails, the rest run
            log.exception("run_batch: line %d failed", n)
            return error_line(cid, 500, f"internal error: {type(exc).__name__}: {exc}",
                              kind="internal_server_error", code="internal")
        if resp.status_code == 200:
            return output_line(cid, 200, data, None)
        return output_line(cid, resp.status_code, None, data)

    async def run(self, lines, write: Callable[[dict], None]) -> int:
        """Answer every line of ``lines`` (an iterator or async iterator of str, read as needed),
        calling ``write`` with the output lines in input order; returns how many were answered."""
        gate = asyncio.Semaphore(self._bound())
        done: dict[int, dict] = {}
        next_out = 0
        tasks: set[asyncio.Task] = set()

        async def one(k: int, n: int, line: str) -> None:
            nonlocal next_out
            try:
                done[k] = await self.answer(n, line)
            finally:
                gate.release()
            while next_out in done:  # in input order, as soon as the earlier ones are written
                write(done.pop(next_out))
                next_out += 1

        k = n = 0
        async for line in _aiter(lines):
            n += 1
            if not line.strip():
                continue
            await gate.acquire()
            task = asyncio.ensure_future(one(k, n, line))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            k += 1
        while tasks:
            await asyncio.gather(*list(tasks))
        return k


# ----- CLI ----------------------------------------------------------------------------------
def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m serving.run_batch",
                       description="run an OpenAI Batch API file (JSON lines) through one engine")
    p.add_argument("-i", "--input-file", required=True,
                   help="batch input file (JSON lines); - = stdin (no default: required)")
    p.add_argument("-o", "--output-file", required=True,
                   help="output file (JSON lines); - = stdout (no default: required)")
    p.add_argument("--max-concurrent-lines", type=int, default=None,
                   help="lines in flight at once (default: 2 x --max-num-seqs, as vLLM)")
    p.add_argument("--served-model-name", default=None,
                   help="the model id a body's 'model' field must name (default: --model)")
    add_log_level_arg(p)
    add_engine_args(p)
    p.add_argument("--lora-modules", type=parse_lora_module, nargs="+", action="extend", default=None,
                   metavar="NAME=PATH",
                   help="LoRA adapters a body picks by its 'model' field; implies --enable-lora (default: none)")
    s = p.add_argument_group("request caps (the server's)")
    d = ServerConfig()
    s.add_argument("--max-n", type=int, default=d.max_n, help="largest n a request may ask for")
    s.add_argument("--max-tokens-cap", type=int, default=None,
                   help="largest max_tokens a request may ask for (default: max_model_len)")
    s.add_argument("--max-logprobs", type=int, default=d.max_logprobs,
                   help="largest logprobs / prompt_logprobs a request may ask for")
    s.add_argument("--max-stop-strings", type=int, default=d.max_stop_strings, help="most stop strings per request")
    s.add_argument("--max-message-bytes", type=int, default=d.max_message_bytes,
                   help="largest body of a line in bytes (larger: a 413 line)")
    add_chat_args(p)
    return p


def server_config(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        served_model_name=args.served_model_name, max_queued_requests=_NO_QUEUE_LIMIT,
        max_n=args.max_n, max_tokens_cap=args.max_tokens_cap, max_logprobs=args.max_logprobs,
        max_stop_strings=args.max_stop_strings, max_message_bytes=args.max_message_bytes,
        lora_modules=tuple(args.lora_modules or ()), log_stats=False,
        # offline: a long first step (compiles) is not a wedged server
        watchdog_timeout=1e9, health_probe_interval=1e9, **chat_fields_from_args(args)).validate()


async def _aiter(lines):
    if hasattr(lines, "__aiter__"):
        async for line in lines:
            yield line
    else:
        for line in lines:
            yield line


async def _lines(stream: IO[str]):
    """The lines of ``stream``, each read off the event loop (a slow pipe does not hold up the
    answers of the lines already in flight)."""
    while line := await asyncio.to_thread(stream.readline):
        yield line


async def run_cli(cfg: ServerConfig, factory: Callable[[], Any], src: IO[str], dst: IO[str],
                  max_concurrent: int | None) -> int:
    runner = BatchRunner(cfg, engine_factory=factory, max_concurrent=max_concurrent)
    try:
        await runner.start()
    except BaseException as exc:  # noqa: BLE001
        cause = getattr(exc, "cause", None) or exc
        print(f"error: engine failed to start: {type(cause).__name__}: {cause}", file=sys.stderr, flush=True)
        await runner.stop()
        return 1
    counts = {"ok": 0, "err": 0}

    def write(out: dict) -> None:
        counts["ok" if out["error"] is None else "err"] += 1
        dst.write(json.dumps(out, ensure_ascii=False) + "\n")

    try:
        n = await runner.run(_lines(src), write)
    finally:
        dead = runner.server.async_engine.dead
        await runner.stop()
    log.info("run_batch: %d lines: %d answered, %d errors", n, counts["ok"], counts["err"])
    return 1 if dead is not None else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    try:
        if args.max_concurrent_lines is not None and args.max_concurrent_lines < 1:
            raise ValueError(f"--max-concurrent-lines={args.max_concurrent_lines} is invalid: must be >= 1")
        cfg = server_config(args)
        from serving.__main__ import engine_factory  # the server's: fake:, or the checkpoint resolved here

        factory = engine_factory(args)
        src = sys.stdin if args.input_file == "-" else open(args.input_file, encoding="utf-8")
    except (ValueError, OSError) as exc:  # CheckpointError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as stack:
        if src is not sys.stdin:
            stack.enter_context(src)
        if args.output_file == "-":
            dst = sys.stdout
        else:
            try:
                dst = stack.enter_context(open(args.output_file, "w", encoding="utf-8"))
            except OSError as exc:
                print(f"error: -o {args.output_file}: {exc.strerror or exc}", file=sys.stderr)
                return 2
        code = asyncio.run(run_cli(cfg, factory, src, dst, args.max_concurrent_lines))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # a wedged engine thread must not keep us alive


if __name__ == "__main__":
    sys.exit(main())
