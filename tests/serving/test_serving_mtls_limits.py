"""Security basics: mutual TLS with --tls-client-ca, the API key compared in constant time and
never logged, and the metadata / message size limits (the server keeps serving after each)."""

from __future__ import annotations

import hashlib
import hmac
import logging
import shutil
import subprocess

import grpc
import pytest

from serving import api_keys
from serving.client import AsyncGenerationClient
from serving.proto.jaxllm.v1 import generation_pb2 as pb
from serving.proto.jaxllm.v1 import generation_pb2_grpc as pb_grpc
from serving_helpers import SERVING, collect, run, running_server

KEY = "k3y-that-must-never-be-logged-9f2c"


def _openssl(*args):
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A throwaway CA, a server cert (localhost) and client certs from it and from a rogue CA;
    made at test time (private keys only in pytest's tmp dir)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not available to make test certificates")
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "rogue"):
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(d / f"{ca}.key"),
                 "-out", str(d / f"{ca}.pem"), "-days", "1", "-subj", f"/CN={ca} test CA")
    (d / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name, ca in (("server", "ca"), ("client", "ca"), ("intruder", "rogue")):
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(d / f"{name}.key"),
                 "-out", str(d / f"{name}.csr"), "-subj", f"/CN={name if name != 'server' else 'localhost'}")
        _openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / f"{ca}.pem"),
                 "-CAkey", str(d / f"{ca}.key"), "-CAcreateserial", "-out", str(d / f"{name}.pem"),
                 "-days", "1", "-extfile", str(d / "ext.cnf"))
    return d


def test_mutual_tls_requires_a_client_cert_from_the_ca(pki):
    ca = (pki / "ca.pem").read_bytes()

    def creds(who=None):
        if who is None:
            return grpc.ssl_channel_credentials(root_certificates=ca)
        return grpc.ssl_channel_credentials(root_certificates=ca,
                                            private_key=(pki / f"{who}.key").read_bytes(),
                                            certificate_chain=(pki / f"{who}.pem").read_bytes())

    async def main():
        async with running_server(tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"),
                                  tls_client_ca=str(pki / "ca.pem"),
                                  channel_credentials=creds("client")) as c:
            assert collect(await c.generate(prompt="mutual", max_tokens=6))["texts"][0] == "mutual"
            for who in (None, "intruder"):  # no client cert; one signed by another CA
                async with grpc.aio.secure_channel(f"localhost:{c.port}", creds(who)) as ch:
                    with pytest.raises(grpc.aio.AioRpcError) as ei:
                        await pb_grpc.GenerationStub(ch).GetModelInfo(pb.GetModelInfoRequest(),
                                                                      timeout=3)
                    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE, who
            async with grpc.aio.insecure_channel(f"127.0.0.1:{c.port}") as ch:  # plaintext
                with pytest.raises(grpc.aio.AioRpcError) as ei:
                    await pb_grpc.GenerationStub(ch).GetModelInfo(pb.GetModelInfoRequest(), timeout=3)
                assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
            assert await c.health_status() == SERVING
            # the helper clients present a client certificate too
            async with AsyncGenerationClient(f"localhost:{c.port}", tls_ca=str(pki / "ca.pem"),
                                             tls_cert=str(pki / "client.pem"),
                                             tls_key=str(pki / "client.key")) as ac:
                assert (await ac.complete("abc", max_tokens=3)).text == "abc"
    run(main())


def test_tls_client_ca_without_server_cert_is_refused():
    from serving.config import ServerConfig
    with pytest.raises(ValueError, match="tls_client_ca='ca.pem' is invalid without tls_cert"):
        ServerConfig(tls_client_ca="ca.pem").validate()


def test_api_key_constant_time_and_never_logged(monkeypatch, caplog):
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(api_keys.hmac, "compare_digest", spy)
    caplog.set_level(logging.DEBUG)
    near = KEY[:-1] + "X"

    async def main():
        async with running_server(api_key=KEY) as c:
            for md in (None, (("authorization", f"Bearer {near}"),), (("authorization", KEY),)):
                with pytest.raises(grpc.aio.AioRpcError) as ei:
                    await c.generate(prompt="hi", max_tokens=2, metadata=md)
                assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert KEY not in ei.value.details() and near not in ei.value.details()
            res = await c.generate(prompt="ok", max_tokens=2,
                                   metadata=(("authorization", f"Bearer {KEY}"),))
            assert collect(res)["texts"][0] == "ok"
    run(main())
    # only the two 'Bearer <key>' headers reach a comparison (no header / no scheme: refused before),
    # each against the key's SHA-256, never the key
    assert len(calls) == 2 and all(b == hashlib.sha256(KEY.encode()).digest() for _, b in calls), calls
    assert caplog.records  # the server did log (start, ready, stop) ...
    assert KEY not in caplog.text and near not in caplog.text  # ... but never the key
    assert all(KEY not in repr(r.args) for r in caplog.records)


def test_metadata_and_message_size_limits_hold():
    async def main():
        async with running_server(max_message_bytes=2048) as c:
            with pytest.raises(grpc.aio.AioRpcError) as ei:  # a request over --max-message-bytes
                await c.generate(prompt="x" * 4096, max_tokens=2)
            assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # metadata over gRPC's limit (8 KiB soft, 16 KiB hard by default): refused, the server unhurt
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await c.generate(prompt="hi", max_tokens=2, metadata=(("x-big", "v" * 64_000),))
            assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "metadata size exceeds" in ei.value.details()
            many = tuple((f"x-k{i}", "v" * 100) for i in range(200))  # 20 KB in many entries
            with pytest.raises(grpc.aio.AioRpcError):
                await c.generate(prompt="hi", max_tokens=2, metadata=many)
            assert collect(await c.generate(prompt="still fine", max_tokens=10))["texts"][0] == "still fine"
            assert await c.health_status() == SERVING
            await c.wait_blocks_free()
    run(main())


def test_tls_client_ca_file_is_checked_before_the_port_opens(pki, tmp_path):
    from serving.config import ServerConfig
    from serving.tls import check_tls_files

    ok = dict(tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"))
    check_tls_files(ServerConfig(**ok, tls_client_ca=str(pki / "ca.pem")).validate())
    with pytest.raises(ValueError, match=r"--tls-client-ca .*missing.pem: no such file"):
        check_tls_files(ServerConfig(**ok, tls_client_ca=str(tmp_path / "missing.pem")))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ValueError, match=r"--tls-client-ca .*junk.pem is invalid: need PEM CA"):
        check_tls_files(ServerConfig(**ok, tls_client_ca=str(junk)))


def test_mutual_tls_holds_on_the_http_door_too(pki):
    """--tls-client-ca (vLLM's --ssl-ca-certs with --ssl-cert-reqs 2) requires a client certificate from
    the CA on the OpenAI HTTP door as on gRPC; before, HTTPS there asked for none."""
    import ssl

    import httpx

    def context(who=None):
        ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        if who is not None:
            ctx.load_cert_chain(str(pki / f"{who}.pem"), str(pki / f"{who}.key"))
        return ctx

    async def main():
        async with running_server(tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"),
                                  tls_client_ca=str(pki / "ca.pem"), http_port=0,
                                  channel_credentials=grpc.ssl_channel_credentials(
                                      root_certificates=(pki / "ca.pem").read_bytes(),
                                      private_key=(pki / "client.key").read_bytes(),
                                      certificate_chain=(pki / "client.pem").read_bytes())) as c:
            url = f"https://localhost:{c.server.http_port}/health"
            async with httpx.AsyncClient(verify=context("client")) as h:
                assert (await h.get(url, timeout=5)).status_code == 200
            for who in (None, "intruder"):  # no client certificate; one signed by another CA
                async with httpx.AsyncClient(verify=context(who)) as h:
                    with pytest.raises(httpx.TransportError):
                        await h.get(url, timeout=5)
    run(main())
