"""API key interceptor, TLS, reflection, and the Python clients (sync + asyncio)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase)

from serving.client import AsyncGenerationClient, GenerationClient
from serving.health import PROBE_PREFIX
from serving.proto.jaxllm.v1 import generation_pb2 as pb
from serving_helpers import SERVING, collect, run, running_server
from tests.fakes.fake_engine import FakeEngine

KEY = "s3cret-key"


def test_api_key_on_every_rpc_but_health():
    async def main():
        async with running_server(api_key=KEY) as c:
            good = (("authorization", f"Bearer {KEY}"),)
            for md in (None, (("authorization", "Bearer wrong"),), (("authorization", KEY),)):
                with pytest.raises(grpc.aio.AioRpcError) as ei:
                    await c.generate(prompt="hi", metadata=md)
                assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
                for rpc, req in ((c.stub.Tokenize, pb.TokenizeRequest(text="x")),
                                 (c.stub.GetModelInfo, pb.GetModelInfoRequest())):
                    with pytest.raises(grpc.aio.AioRpcError) as ei:
                        await rpc(req, metadata=md)
                    assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert await c.health_status() == SERVING  # health stays open
            res = collect(await c.generate(prompt="hi", max_tokens=2, metadata=good))
            assert res["texts"][0] == "hi"
            # the helper clients send the key
            async with AsyncGenerationClient(c.target, api_key=KEY) as ac:
                assert (await ac.complete("abc", max_tokens=3)).text == "abc"
    run(main())


def _make_cert(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl not available to make a test certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return key, cert


def test_tls(tmp_path):
    key, cert = _make_cert(tmp_path)
    creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())

    async def main():
        async with running_server(tls_cert=str(cert), tls_key=str(key), http_port=0,
                                  channel_credentials=creds) as c:
            res = collect(await c.generate(prompt="secure", max_tokens=6))
            assert res["texts"][0] == "secure"
            import httpx  # the HTTP door uses the same certificate

            import ssl

            ctx = ssl.create_default_context(cafile=str(cert))
            async with httpx.AsyncClient(verify=ctx, timeout=5) as h:
                r = await h.post(f"https://localhost:{c.server.http_port}/v1/completions",
                                 json={"prompt": "secure", "max_tokens": 6})
                assert r.status_code == 200 and r.json()["choices"][0]["text"] == "secure"
            async with httpx.AsyncClient(timeout=5) as h:
                with pytest.raises(httpx.HTTPError):  # plaintext is refused
                    await h.get(f"http://127.0.0.1:{c.server.http_port}/health")
            async with grpc.aio.insecure_channel(f"127.0.0.1:{c.port}") as plain:
                from serving.proto.jaxllm.v1 import generation_pb2_grpc as pb_grpc
                with pytest.raises(grpc.aio.AioRpcError) as ei:
                    await pb_grpc.GenerationStub(plain).GetModelInfo(pb.GetModelInfoRequest(),
                                                                     timeout=2)
                assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
            with GenerationClient(f"localhost:{c.port}", tls_ca=str(cert), timeout=5) as sc:
                info = await asyncio.to_thread(sc.model_info)
                assert info.model == "fake"
    run(main())


def test_reflection_lists_services_and_describes_messages():
    def reflect(target):
        with grpc.insecure_channel(target) as ch:
            db = ProtoReflectionDescriptorDatabase(ch)
            services = set(db.get_services())
            pool = descriptor_pool.DescriptorPool(db)
            req = pool.FindMessageTypeByName("jaxllm.v1.GenerateRequest")
            sp = pool.FindMessageTypeByName("jaxllm.v1.SamplingParams")
            svc = pool.FindServiceByName("jaxllm.v1.Generation")
            return (services, [f.name for f in req.fields], set(sp.fields_by_name),
                    [m.name for m in svc.methods])

    async def main():
        async with running_server() as c:
            services, req_fields, sp_fields, methods = await asyncio.to_thread(reflect, c.target)
            assert {"jaxllm.v1.Generation", "grpc.health.v1.Health",
                    "grpc.reflection.v1alpha.ServerReflection"} <= services
            assert req_fields == ["request_id", "text", "chat", "token_ids", "sampling", "lora_name", "priority",
                                      "cache_salt"]
            from jaxllm.sampling_params import SamplingParams
            # every field is exposed (but output_kind: the transport picks it, a stream's messages are
            # deltas already); the proto's beam search options become BeamSearchParams instead
            assert set(SamplingParams.__struct_fields__) - {"output_kind"} == sp_fields - {"use_beam_search",
                                                                                         "length_penalty"}
            assert methods == ["Generate", "Tokenize", "Detokenize", "GetModelInfo", "Embed", "Score", "Classify",
                               "ListAdapters", "LoadAdapter", "UnloadAdapter"]
    run(main())


def test_sync_client_helpers_and_cancel_on_break():
    def use(target):
        with GenerationClient(target, timeout=10) as sc:
            assert sc.health() == "SERVING"
            assert sc.tokenize("ab") == [97, 98] and sc.detokenize([97, 98]) == "ab"
            r = sc.complete(chat=[{"role": "user", "content": "yo"}], max_tokens=4, n=2)
            assert set(r.texts) == {0, 1} and r.finish_reasons == {0: "length", 1: "length"}
            pieces = []
            for piece in sc.stream_text("streaming text", max_tokens=100):
                pieces.append(piece)
                if len(pieces) == 3:
                    break  # cancels the RPC
            return pieces

    async def main():
        eng = FakeEngine(step_delay=0.01)
        async with running_server(eng) as c:
            pieces = await asyncio.to_thread(use, c.target)
            assert "".join(pieces) == "str"
            await c.wait_blocks_free()
            assert len([r for r in eng.aborted if not r.startswith(PROBE_PREFIX)]) == 1
    run(main())


def test_clients_read_api_key_env_and_take_text(monkeypatch):
    """JAXLLM_API_KEY is read by the clients as by the server; api_key="" sends none; complete()
    takes the proto's own name `text` for the prompt."""
    async def main():
        async with running_server(api_key=KEY) as c:
            monkeypatch.setenv("JAXLLM_API_KEY", KEY)
            async with AsyncGenerationClient(c.target) as ac:
                assert (await ac.complete(text="abc", max_tokens=3)).text == "abc"
                assert (await ac.complete("xyz", max_tokens=2)).text == "xy"
            async with AsyncGenerationClient(c.target, api_key="") as ac:
                with pytest.raises(grpc.aio.AioRpcError) as ei:
                    await ac.complete(text="abc", max_tokens=3)
                assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
            monkeypatch.delenv("JAXLLM_API_KEY")
            async with AsyncGenerationClient(c.target) as ac:
                with pytest.raises(grpc.aio.AioRpcError) as ei:
                    await ac.complete(text="abc", max_tokens=3)
                assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
    run(main())


def test_build_request_text_is_the_prompt():
    from serving.client import build_request

    assert build_request(text="hi", max_tokens=2) == build_request("hi", max_tokens=2)
    assert build_request(text="hi").text == "hi"
    with pytest.raises(ValueError, match="give prompt or text, not both"):
        build_request("a", text="b")
    with pytest.raises(ValueError, match="exactly one of prompt"):
        build_request(text="a", token_ids=[1])
