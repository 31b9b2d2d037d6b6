"""The server's API keys, for both doors (no jax, no grpc, no HTTP).

vLLM's ``--api-key K1 K2 ...`` (or ``$VLLM_API_KEY``): a request is let in when its
``Authorization: Bearer <key>`` names any of the keys (key rotation). Each configured key is kept
only as its SHA-256 digest, and a presented key is compared with every digest in constant time,
all of them every time (no early exit: how long the check takes does not tell which key, or how
much of one, matched). A key is never logged or echoed: errors count keys, never show them.
"""

from __future__ import annotations

import hashlib
import hmac


class KeyRing:
    def __init__(self, keys: tuple[str, ...]):
        if not keys:
            raise ValueError("api_key=() is invalid: give at least one key (or none at all: no auth)")
        for i, key in enumerate(keys):
            if not isinstance(key, str) or not key:
                raise ValueError(f"api_key #{i + 1} of {len(keys)} is invalid: must be a non-empty string")
        self._digests = tuple(hashlib.sha256(k.encode("utf-8")).digest() for k in keys)

    def __len__(self) -> int:
        return len(self._digests)

    def accepts(self, authorization: bytes | str | None) -> bool:
        """True when ``authorization`` (the header's value) is ``Bearer <one of the keys>``; the
        scheme is matched without regard to case (RFC 7235, as vLLM)."""
        if not authorization:
            return False
        if isinstance(authorization, str):  # gRPC metadata; HTTP headers come as their raw bytes
            authorization = authorization.encode("utf-8", "surrogateescape")
        scheme, _, token = authorization.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        got = hashlib.sha256(token).digest()  # a key's UTF-8 bytes, as the client sent them
        match = False
        for digest in self._digests:  # every key, every time
            match |= hmac.compare_digest(got, digest)
        return match


def api_keys(value: str | tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
    """ServerConfig.api_key (one key, several, or None) as a tuple; empty keys are dropped (an
    unset environment variable reads as '')."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = (value,)
    return tuple(k for k in value if k)


def key_ring(value: str | tuple[str, ...] | list[str] | None) -> KeyRing | None:
    """ServerConfig.api_key as the KeyRing both doors check, None when no key is set (no auth);
    ValueError naming the key's position (never the key) for a non-string one."""
    keys = api_keys(value)
    return KeyRing(keys) if keys else None
