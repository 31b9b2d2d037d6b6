"""--generation-config / --override-generation-config without a model run (jaxllm/generation_config.py):
which values become defaults and how a request's fields meet them (the HTTP bodies, the gRPC message),
and every bad input refused in one line naming the flag (or field), the value and why, before any
weight is read. The end-to-end runs on a tiny llama: tests/engine/test_generation_config.py."""
from __future__ import annotations

import json

import pytest

from jaxllm import generation_config as gencfg
from jaxllm.config import EngineConfig
from jaxllm.generate import main as generate_main
from jaxllm.llm import LLM
from jaxllm.sampling_params import SamplingParams


def _dir(tmp_path, name: str, content) -> str:
    d = tmp_path / name
    d.mkdir()
    (d / "generation_config.json").write_text(content if isinstance(content, str) else json.dumps(content))
    return str(d)


FILE = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1,
        "max_new_tokens": 7, "eos_token_id": [5, 6], "do_sample": False, "max_length": 99, "bos_token_id": 1}


def test_what_is_taken_and_precedence(tmp_path):
    model = _dir(tmp_path, "model", FILE)
    auto = gencfg.resolve("auto", None, "hf", model)
    # only vLLM's six keys (max_new_tokens renamed); do_sample false does not mean greedy, as in vLLM
    assert auto.sampling == {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "min_p": 0.05,
                             "repetition_penalty": 1.1, "max_tokens": 7}
    assert auto.eos_token_ids == (5, 6) and auto.max_tokens_cap is None
    # the override wins and may add keys; keys outside the six are ignored (and reported)
    over = gencfg.resolve("auto", '{"temperature": 0.0, "presence_penalty": 1, "top_k": null}', "hf", model)
    assert over.sampling["temperature"] == 0.0 and over.sampling["top_k"] == 20 and over.ignored == ("presence_penalty",)
    # vllm: no sampling defaults from the file (the override still applies); the eos ids stay the model's
    vllm = gencfg.resolve("vllm", {"top_p": 0.5}, "hf", model)
    assert vllm.sampling == {"top_p": 0.5} and vllm.eos_token_ids == (5, 6)
    assert gencfg.resolve("vllm", None, "hf", model).sampling_params() == SamplingParams()
    # GGUF, dummy: no file, nothing taken (an Orbax directory's own file is read: checkpoints.convert copies
    # an HF source's there); a folder works with any format
    for fmt in ("gguf", "dummy"):
        assert gencfg.resolve("auto", None, fmt, model) == gencfg.NONE
    assert gencfg.resolve("auto", None, "orbax", model) == auto
    folder = gencfg.resolve(_dir(tmp_path, "other", {"max_new_tokens": 3}), None, "gguf", "/m.gguf")
    assert folder.sampling == {"max_tokens": 3} and folder.max_tokens_cap == 3  # an operator's choice caps


def test_request_fields_meet_the_defaults(tmp_path):
    """request > override > file > SamplingParams' defaults; max_tokens as vLLM's get_max_tokens."""
    from serving.config import ServerConfig
    from serving.convert import sampling_params_from_proto
    from serving.openai_protocol import ChatCompletionRequest, CompletionRequest
    from serving.proto.jaxllm.v1 import generation_pb2 as pb

    model = _dir(tmp_path, "model", FILE)
    d = gencfg.resolve("auto", {"temperature": 0.2}, "hf", model)
    p, max_set = CompletionRequest(prompt="x").to_params(d)
    # completions: vLLM's body default 16, not the file's 7 (that is chat's default: below)
    assert (p.temperature, p.top_k, p.max_tokens, max_set) == (0.2, 20, 16, False)
    assert CompletionRequest(prompt="x", max_tokens=None).to_params(d)[0].max_tokens == 16  # null too
    assert CompletionRequest(prompt="x").to_params(gencfg.resolve("auto", {"max_new_tokens": 5}, "hf", model))[0] \
        .max_tokens == 5  # an operator's max_new_tokens still caps it (vLLM's override_max_tokens)
    p, _ = CompletionRequest(prompt="x", temperature=1.0, max_tokens=40).to_params(d)
    assert (p.temperature, p.top_k, p.max_tokens) == (1.0, 20, 40)  # the checkpoint file's 7: a default only
    p, _ = CompletionRequest(prompt="x").to_params()
    assert p == SamplingParams()
    p, _ = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}]).to_params(64, d)
    assert (p.temperature, p.max_tokens) == (0.2, 7)
    p, _ = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}]).to_params(64)
    assert p.max_tokens == 64  # no default anywhere: the rest of the context
    capped = gencfg.resolve("auto", {"max_new_tokens": 5}, "hf", model)
    p, _ = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=40).to_params(64, capped)
    assert p.max_tokens == 5  # an override's max_new_tokens caps a request's own (vLLM's override_max_tokens)
    from serving.beam import search_params

    p, _ = CompletionRequest(prompt="x", use_beam_search=True, n=2).to_params(d)
    assert search_params(p, None, 1.0).temperature == 0.2  # beam search: vLLM's default temperature too
    # gRPC: proto3 optional fields, so unset is known
    msg = pb.SamplingParams(top_k=3)
    p = sampling_params_from_proto(msg, ServerConfig(), vocab_size=256, max_model_len=64, defaults=d)
    assert (p.temperature, p.top_k, p.top_p, p.max_tokens) == (0.2, 3, 0.9, 7)
    assert sampling_params_from_proto(pb.SamplingParams(), ServerConfig(), vocab_size=256,
                                      max_model_len=64) == SamplingParams()


def test_bad_values_refused_in_one_line(tmp_path, capsys):
    bad = _dir(tmp_path, "bad", {"temperature": -1})
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [(["--generation-config", "/nope"], "--generation-config '/nope' is invalid: no such folder"),
             (["--generation-config", str(empty)],
              f"--generation-config '{empty}' is invalid: the folder has no generation_config.json"),
             (["--override-generation-config", "[1]"], "--override-generation-config [1] is invalid: must be a "
                                                       "JSON object"),
             (["--override-generation-config", '{"temperature": -1}'],
              "--override-generation-config: temperature=-1 is invalid: must be >= 0")]
    for argv, text in cases:
        with pytest.raises(SystemExit) as e:
            generate_main(["--prompt", "x", *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and text in err, err
    # a file's bad value: refused at start, before weights (this folder has none), naming the file
    want = f"{bad}/generation_config.json (read for --generation-config 'auto'): temperature=-1 is invalid: must be >= 0"
    assert generate_main(["--model", bad, "--prompt", "x"]) == 2
    assert capsys.readouterr().err == f"error: {want}\n"
    from serving.__main__ import main as serving_main

    assert serving_main(["--model", bad, "--port", "0"]) == 2
    assert capsys.readouterr().err == f"error: {want}\n"
    assert generate_main(["--model", "dummy:tiny-llama", "--generation-config", bad, "--prompt", "x"]) == 2
    assert capsys.readouterr().err == f"error: {want.replace('auto', bad)}\n"
    # the Python API names the fields
    with pytest.raises(ValueError, match=r"^generation_config='/nope' is invalid: no such folder"):
        LLM("dummy:tiny-llama", generation_config="/nope")
    with pytest.raises(ValueError, match=r"^override_generation_config: max_new_tokens=0 is invalid: must be an integer >= 1"):
        EngineConfig(override_generation_config={"max_new_tokens": 0}).validate()
    with pytest.raises(ValueError, match=r"generation_config.json \(read for generation_config='auto'\): temperature=-1"):
        LLM(bad)
    # a bad file value the override replaces is never used: accepted
    ok = gencfg.resolve("auto", {"temperature": 0.5}, "hf", bad)
    assert ok.sampling == {"temperature": 0.5}
