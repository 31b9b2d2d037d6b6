"""A tiny random HF llama with a generation_config.json, end to end (jaxllm/generation_config.py):
requests without sampling params take its values (offline, the OpenAI HTTP API, the CLI), a request's
own values win, ``--generation-config vllm`` keeps jaxllm's defaults, the override wins over the file,
and the file's eos_token_id stops a request where the model produces it (not with ignore_eos).

One architecture and one engine shape, so the engines share their compiled executables (weights are
jit arguments): the first build compiles, the others load."""
from __future__ import annotations

import json
import logging
import os

import httpx
import pytest

from jaxllm.generate import main
from jaxllm.llm import LLM
from jaxllm.sampling_params import SamplingParams
from tests.models.hf_tiny import make_tiny_hf, tiny_pair_tokenizer

ENGINE = dict(max_model_len=64, max_num_seqs=2, max_num_batched_tokens=32, block_size=8,
              kv_cache_memory_bytes=1 << 20)
FLAGS = ["--max-model-len", "64", "--max-num-seqs", "2", "--max-num-batched-tokens", "32", "--block-size", "8",
         "--kv-cache-memory-bytes", str(1 << 20)]
PROMPT = "w10 w11 w12"  # tiny_pair_tokenizer's words: <bos> w10 w11 w12
GREEDY7 = SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model dir, its greedy 7 tokens) from an engine under generation_config="vllm" (jaxllm's defaults,
    ignore_eos), before the test writes its own values into the checkpoint's generation_config.json."""
    root = tmp_path_factory.mktemp("gencfg")
    path = make_tiny_hf("llama", str(root))
    tiny_pair_tokenizer(256).save_pretrained(path)
    saved = json.load(open(os.path.join(path, "generation_config.json")))
    assert saved["eos_token_id"] == 2 and "temperature" not in saved  # what transformers writes
    llm = LLM(path, generation_config="vllm", **ENGINE)
    assert llm.get_default_sampling_params() == SamplingParams()  # jaxllm's own defaults
    ref = llm.generate(PROMPT, GREEDY7, use_tqdm=False)[0].outputs[0]
    assert len(ref.token_ids) == 7
    return path, saved, list(ref.token_ids), ref.text


def _unused(tokens: list[int], n: int) -> list[int]:
    return [t for t in range(5, 256) if t not in tokens][:n]


@pytest.fixture(scope="module")
def auto_llm(tiny):
    """The checkpoint's own file says temperature 0, top_k 5, max_new_tokens 7 and two eos ids the greedy
    run does not produce."""
    path, saved, ref, _ = tiny
    eos = _unused(ref, 2)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({**saved, "temperature": 0.0, "top_k": 5, "max_new_tokens": 7, "eos_token_id": eos}, f)
    return LLM(path, **ENGINE), eos


def test_defaults_from_the_checkpoint_file(tiny, auto_llm):
    _, _, ref, ref_text = tiny
    llm, eos = auto_llm
    assert llm.get_default_sampling_params() == SamplingParams(temperature=0.0, top_k=5, max_tokens=7)
    out = llm.generate(PROMPT, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ref and out.text == ref_text and out.finish_reason == "length"
    # one eos set: the tokenizer's (config.json's 2 + the file's), read by the engine, sampler and grammar
    assert llm.get_tokenizer().eos_token_ids == {2, *eos} == llm.engine.eos_token_ids
    assert llm.engine.runner.eos_ids == sorted({2, *eos})
    # a request's own params are whole: nothing of the file is laid over them
    whole = SamplingParams(temperature=0.0, ignore_eos=True)
    assert len(llm.generate(PROMPT, whole, use_tqdm=False)[0].outputs[0].token_ids) == 16


def test_http_completion_fields_left_unset_take_the_file(tiny, auto_llm, caplog):
    from tests.serving.http_helpers import ThreadedServer

    _, _, ref, ref_text = tiny
    llm, _ = auto_llm
    sampled = llm.generate(PROMPT, SamplingParams(temperature=1.0, top_k=5, seed=11, max_tokens=5),
                           use_tqdm=False)[0].outputs[0].text
    want = llm.generate(PROMPT, SamplingParams(temperature=0.0, top_k=5, max_tokens=16), use_tqdm=False)[0]
    caplog.set_level(logging.INFO, logger="serving.server")
    srv = ThreadedServer(llm.engine)
    try:
        def complete(**body):
            r = httpx.post(srv.base_url + "/v1/completions", json={"prompt": PROMPT, **body}, timeout=60)
            assert r.status_code == 200, r.text
            return r.json()

        plain = complete()
        assert "Using default chat sampling params from model: {'temperature': 0.0, 'top_k': 5, 'max_tokens': 7}" \
            in caplog.messages  # vLLM's start-up line
        # no max_tokens: vLLM's completion body says 16; the file's max_new_tokens (7) is chat's default only
        assert plain["choices"][0]["text"] == want.outputs[0].text and want.outputs[0].text.startswith(ref_text)
        assert plain["usage"]["completion_tokens"] == len(want.outputs[0].token_ids) > 7
        short = complete(max_tokens=3, temperature=0)  # the body's values win
        assert short["choices"][0]["text"] == " ".join(ref_text.split()[:3])
        # temperature from the body, top_k still the file's 5 (unset), seeded: LLM.generate's same draw
        assert complete(temperature=1.0, seed=11, max_tokens=5)["choices"][0]["text"] == sampled
        # gRPC Generate: the proto3 optional fields left unset take the file's values too
        import grpc

        from serving.proto.jaxllm.v1 import generation_pb2 as pb
        from serving.proto.jaxllm.v1 import generation_pb2_grpc as pb_grpc

        with grpc.insecure_channel(f"127.0.0.1:{srv.server.port}") as ch:
            resps = list(pb_grpc.GenerationStub(ch).Generate(
                pb.GenerateRequest(request_id="g", text=PROMPT, sampling=pb.SamplingParams()), timeout=60))
        assert [t for r in resps for d in r.outputs for t in d.token_ids] == ref
    finally:
        srv.close()


def test_eos_from_a_generation_config_folder_and_the_override(tiny, tmp_path):
    """--generation-config <folder>: its eos_token_id holds the k-th greedy token; the override's
    temperature wins over the folder file's."""
    path, _, ref, _ = tiny
    k = next(i for i in range(2, 7) if ref[i] not in ref[:i])  # the first time the model produces it
    folder = tmp_path / "gen"
    folder.mkdir()
    (folder / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.9, "max_new_tokens": 7, "eos_token_id": [ref[k], _unused(ref, 1)[0]]}))
    llm = LLM(path, generation_config=str(folder), override_generation_config={"temperature": 0.0}, **ENGINE)
    assert llm.get_default_sampling_params() == SamplingParams(temperature=0.0, max_tokens=7)  # no top_k: not the model's file
    out = llm.generate(PROMPT, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ref[:k + 1] and out.finish_reason == "stop"
    explicit = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=7), use_tqdm=False)[0].outputs[0]
    assert explicit.token_ids == ref[:k + 1] and explicit.finish_reason == "stop"  # eos is not a default
    on = llm.generate(PROMPT, GREEDY7, use_tqdm=False)[0].outputs[0]
    assert on.token_ids == ref and on.finish_reason == "length"  # ignore_eos runs on


def test_cli_flags_not_given_take_the_file(tiny, auto_llm, capsys):
    _, _, ref, ref_text = tiny
    rc = main(["--model", tiny[0], "--prompt", PROMPT, "--max-tokens", "3", "--no-progress", *FLAGS])
    out, err = capsys.readouterr()
    assert rc == 0, err[-2000:]
    assert f"{' '.join(ref_text.split()[:3])}\n    (finish_reason=length, 3 tokens)" in out  # greedy: the file's
    line = [x for x in err.splitlines() if "sampling defaults from" in x]
    assert len(line) == 1 and line[0].endswith(
        "generation_config.json: {'temperature': 0.0, 'top_k': 5} (flags given on the command line win)")


def test_convert_copies_the_file_and_auto_reads_it_from_the_orbax_directory(tiny, tmp_path):
    """`python -m checkpoints.convert` copies the HF source's generation_config.json; `auto` then takes the
    same defaults and eos ids from the Orbax directory as from the HF one (a GGUF-sourced Orbax has none)."""
    from checkpoints import resolve as resolve_format
    from checkpoints.convert import main as convert
    from jaxllm import generation_config

    path, saved, _, _ = tiny
    with open(os.path.join(path, "generation_config.json"), "w") as f:  # the auto_llm fixture may have run
        json.dump({**saved, "temperature": 0.25, "top_p": 0.5, "eos_token_id": [2, 7]}, f)
    dst = str(tmp_path / "orbax")
    assert convert([path, dst]) == 0
    assert resolve_format(dst, "auto") == ("orbax", dst)
    assert json.load(open(os.path.join(dst, "generation_config.json")))["top_p"] == 0.5
    hf, orbax = (generation_config.resolve("auto", None, *where) for where in (("hf", path), ("orbax", dst)))
    assert orbax.sampling == hf.sampling == {"temperature": 0.25, "top_p": 0.5}
    assert orbax.eos_token_ids == hf.eos_token_ids == (2, 7)
    os.remove(os.path.join(dst, "generation_config.json"))  # an Orbax directory without one: nothing taken
    assert generation_config.resolve("auto", None, "orbax", dst).sampling == {}
