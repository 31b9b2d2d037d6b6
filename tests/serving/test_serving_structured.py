"""Structured outputs over gRPC: the proto's oneof reaches the engine (LLMEngine + fake runner, whose
"model" honours the bitmask), completions match their specs, bad specs are INVALID_ARGUMENT naming
the field, and no KV block stays taken."""
from __future__ import annotations

import json
import re

import grpc
import pytest

from serving.client import build_request, structured_outputs_to_proto
from serving.config import ServerConfig
from serving.convert import sampling_params_from_proto
from serving.proto.jaxllm.v1 import generation_pb2 as pb
from serving_helpers import collect, request, run, running_server
from jaxllm.structured_outputs import StructuredOutputsParams as SO
from tests.engine.test_structured_outputs import SCHEMA, make


def so(**kw) -> pb.StructuredOutputs:
    return structured_outputs_to_proto(SO(**kw))


def test_generate_with_each_kind_and_bad_specs_rejected():
    engine = make()

    async def main():
        async with running_server(engine) as c:
            async def gen(spec, **kw):
                return collect(await c.generate(prompt="hi", max_tokens=60, structured_outputs=spec, **kw))

            r = await gen(so(regex=r"[a-z]{3}-\d{2}"), n=2)
            assert all(re.fullmatch(r"[a-z]{3}-\d{2}", t) for t in r["texts"].values()), r["texts"]
            r = await gen(so(choice=["alpha", "beta"]))
            assert r["texts"][0] in ("alpha", "beta")
            r = await gen(so(json=SCHEMA))
            obj = json.loads(r["texts"][0])
            assert set(obj) == {"name", "n"} and 0 <= obj["n"] <= 99
            for spec, field in [(so(regex="(x"), "structured_outputs.regex="),
                                (so(json='{"type": "nope"}'), "structured_outputs.json="),
                                (pb.StructuredOutputs(choice=pb.Choices()), "structured_outputs.choice="),
                                (pb.StructuredOutputs(), "structured_outputs (nothing) is invalid")]:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await gen(spec)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert info.value.details().startswith(field), info.value.details()
            await c.wait_blocks_free(timeout=10)
    run(main())
    assert engine.kv.num_free_blocks == engine.kv.num_blocks and not engine.has_unfinished_requests()


def test_client_request_round_trips_to_the_engine_params():
    cfg = ServerConfig()
    for spec in [SO(json=SCHEMA), SO(regex="a+"), SO(choice=["x", "y z"]), SO(grammar="start: \"a\""),
                 SO(json_object=True)]:
        msg = build_request("hi", structured_outputs=spec).sampling
        got = sampling_params_from_proto(msg, cfg, vocab_size=None, max_model_len=None).structured_outputs
        assert got.key() == spec.key()
    assert request(structured_outputs=so(regex="b")).sampling.structured_outputs.regex == "b"
