"""The HTTP door's flags, vLLM's names (argparse only, no jax): proxy path, CORS, docs, uvicorn's log
level, client certificates; they fill ServerConfig's HTTP fields (serving/openai_api.py reads them)."""

from __future__ import annotations

import argparse
import json
import ssl

from serving.config import UVICORN_LOG_LEVELS


def add_http_args(p: argparse.ArgumentParser) -> None:
    h = p.add_argument_group("OpenAI HTTP API (with --http-port; vLLM's flags)")
    h.add_argument("--root-path", default=None,
                   help="the path prefix of a path-routing proxy in front (FastAPI root_path, e.g. /api): paths "
                        "are served with and without it, and the docs link through it (default: none)")
    for name, what in (("origins", "origins"), ("methods", "methods"), ("headers", "request headers")):
        h.add_argument(f"--allowed-{name}", type=_json_list(f"--allowed-{name}"), default=["*"], metavar="JSON",
                       help=f"CORS: the {what} a browser may use, a JSON list (default: [\"*\"], any)")
    h.add_argument("--allow-credentials", action="store_true",
                   help="CORS: let browsers send cookies and credentials (default: off)")
    h.add_argument("--disable-fastapi-docs", action="store_true",
                   help="no /docs, /redoc and /openapi.json (default: served)")
    h.add_argument("--uvicorn-log-level", type=str.lower, default=None, choices=UVICORN_LOG_LEVELS,
                   help="level of uvicorn's own log lines (default: --log-level)")
    h.add_argument("--h11-max-incomplete-event-size", type=int, default=None,
                   help="largest request line + header block in bytes before uvicorn answers 431/400 (default: "
                        "uvicorn's, 16 KiB)")
    h.add_argument("--enable-tokenizer-info-endpoint", action=argparse.BooleanOptionalAction, default=False,
                   help="serve GET /tokenizer_info: the tokenizer's configuration (its class, special tokens, "
                        "model_max_length, chat template), behind --api-key (default: off)")
    h.add_argument("--enable-server-load-tracking", action=argparse.BooleanOptionalAction, default=False,
                   help="GET /load counts the generation and pooling requests in flight (completions, chat, "
                        "responses, embeddings, score, rerank, classify) until each answer is sent; off, "
                        "it answers 0 (default: off)")
    h.add_argument("--ssl-ca-certs", default=None,
                   help="PEM CA certificates for client certificates; with --ssl-cert-reqs 2 the same as "
                        "--tls-client-ca (default: none)")
    h.add_argument("--ssl-cert-reqs", type=int, default=int(ssl.CERT_NONE), choices=(0, 2),
                   help="client certificates: 0 = not asked for, 2 = required (mutual TLS, with --ssl-ca-certs); "
                        "1 (optional) is not supported")


def http_fields_from_args(args: argparse.Namespace) -> tuple[dict, list[str]]:
    """(ServerConfig's HTTP fields, vLLM flags ignored as given); ValueError for a combination that
    needs what jaxllm lacks."""
    ignored: list[str] = []
    client_ca = args.tls_client_ca
    if args.ssl_cert_reqs == int(ssl.CERT_REQUIRED):
        if not (args.ssl_ca_certs or client_ca):
            raise ValueError("--ssl-cert-reqs=2 is invalid without --ssl-ca-certs: required client certificates "
                             "need the CA that signs them")
        if args.ssl_ca_certs and client_ca and args.ssl_ca_certs != client_ca:
            raise ValueError(f"--ssl-ca-certs={args.ssl_ca_certs} is invalid with --tls-client-ca={client_ca}: "
                             f"give one CA file")
        client_ca = args.ssl_ca_certs or client_ca
    elif args.ssl_ca_certs:
        ignored.append(f"--ssl-ca-certs={args.ssl_ca_certs} (no client certificate is asked for without "
                       f"--ssl-cert-reqs 2)")
    fields = dict(root_path=args.root_path or "", allowed_origins=tuple(args.allowed_origins),
                  allowed_methods=tuple(args.allowed_methods), allowed_headers=tuple(args.allowed_headers),
                  allow_credentials=args.allow_credentials, fastapi_docs=not args.disable_fastapi_docs,
                  uvicorn_log_level=args.uvicorn_log_level,
                  h11_max_incomplete_event_size=args.h11_max_incomplete_event_size, tls_client_ca=client_ca,
                  enable_tokenizer_info_endpoint=args.enable_tokenizer_info_endpoint,
                  enable_server_load_tracking=args.enable_server_load_tracking)
    return fields, ignored


def _json_list(flag: str):
    def parse(text: str) -> list[str]:
        try:
            value = json.loads(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is invalid: need a JSON list of strings, e.g. "
                                             f"'[\"https://example.com\"]'") from None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise argparse.ArgumentTypeError(f"{text!r} is invalid: need a JSON list of strings")
        return value
    return parse
