"""TLS for the gRPC port (no jax): server certificate, and mutual TLS when a client CA is given.

``--tls-cert/--tls-key`` serve TLS; adding ``--tls-client-ca ca.pem`` makes the server require
a client certificate signed by that CA (service-to-service mutual TLS): a client without one, or
with one from another CA, fails the handshake (the client sees UNAVAILABLE) before any RPC runs.
The API key, when set, is checked as well.
"""

from __future__ import annotations

import os
import ssl
from typing import Any

from serving.config import ServerConfig

# grpc is imported where it is used: `python -m serving` imports this module before it sets
# GRPC_VERBOSITY (C-core reads it at import)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def server_credentials(cfg: ServerConfig) -> Any:
    """None for plaintext; else grpc.ServerCredentials, requiring client certificates under mTLS."""
    if not cfg.tls_cert:
        return None
    import grpc

    pair = [(_read(cfg.tls_key), _read(cfg.tls_cert))]
    if cfg.tls_client_ca:
        return grpc.ssl_server_credentials(pair, root_certificates=_read(cfg.tls_client_ca),
                                           require_client_auth=True)
    return grpc.ssl_server_credentials(pair)


def check_tls_files(cfg: ServerConfig) -> None:
    """The certificate chain and key load and match, the client CA loads (what gRPC would refuse
    later with C-core log lines and 'Failed to bind')."""
    if not cfg.tls_cert:
        return
    for flag, path in (("--tls-cert", cfg.tls_cert), ("--tls-key", cfg.tls_key),
                       ("--tls-client-ca", cfg.tls_client_ca)):
        if path is not None and not os.path.isfile(path):
            raise ValueError(f"{flag} {path}: no such file")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cfg.tls_cert, cfg.tls_key)
    except (ssl.SSLError, OSError) as e:
        raise ValueError(f"--tls-cert {cfg.tls_cert} / --tls-key {cfg.tls_key} are invalid: need a PEM "
                         f"certificate chain and its private key ({e})") from None
    if cfg.tls_client_ca:
        try:
            ssl.create_default_context(cafile=cfg.tls_client_ca)
        except (ssl.SSLError, OSError) as e:
            raise ValueError(f"--tls-client-ca {cfg.tls_client_ca} is invalid: need PEM CA "
                             f"certificates ({e})") from None
