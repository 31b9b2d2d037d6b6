import msgspec
import pytest

from jaxllm.config import EngineConfig
from jaxllm.sampling_params import SamplingParams
from tests.engine.conftest import assert_clean, make_engine, run_all

BAD_PARAMS = [
    (dict(n=0), "n=0 is invalid: must be an integer >= 1"),
    (dict(temperature=-1.0), "temperature=-1.0 is invalid: must be >= 0"),
    (dict(temperature=float("nan")), "temperature=nan is invalid"),
    (dict(top_p=0.0), "top_p=0.0 is invalid: must be in (0, 1]"),
    (dict(top_p=1.5), "top_p=1.5 is invalid"),
    (dict(top_k=-2), "top_k=-2 is invalid: must be -1 or 0 (off) or >= 1"),
    (dict(min_p=1.1), "min_p=1.1 is invalid: must be in [0, 1]"),
    (dict(presence_penalty=2.5), "presence_penalty=2.5 is invalid: must be in [-2, 2]"),
    (dict(frequency_penalty=-3), "frequency_penalty=-3 is invalid: must be in [-2, 2]"),
    (dict(repetition_penalty=0.0), "repetition_penalty=0.0 is invalid: must be > 0"),
    (dict(seed=1.5), "seed=1.5 is invalid"),
    (dict(max_tokens=0), "max_tokens=0 is invalid: must be an integer >= 1"),
    (dict(min_tokens=-1), "min_tokens=-1 is invalid"),
    (dict(min_tokens=5, max_tokens=4), "min_tokens=5 is invalid: must be <= max_tokens=4"),
    (dict(logprobs=21), "logprobs=21 is invalid: must be None or in [0, 20]"),
    (dict(prompt_logprobs=-1), "prompt_logprobs=-1 is invalid"),
    (dict(stop=[""]), "stop=[''] is invalid"),
    (dict(stop=[1]), "stop=[1] is invalid"),
    (dict(stop_token_ids=[-1]), "stop_token_ids=[-1] is invalid"),
    (dict(stop_token_ids=[10_000]), "token id 10000 must be an int in [0, 131)"),
    (dict(ignore_eos=1), "ignore_eos=1 is invalid: must be a bool"),
    (dict(allowed_token_ids=[]), "allowed_token_ids=[] is invalid: must be None or a list of 1 to 300 token ids"),
    (dict(allowed_token_ids=list(range(301))), "allowed_token_ids=[0, 1, 2"),
    (dict(allowed_token_ids=[3, 131]), "allowed_token_ids=[3, 131] is invalid: token id 131 must be an int in [0, 131)"),
    (dict(logit_bias={131: 1.0}), "logit_bias={131: 1.0} is invalid: token id 131 must be an int in [0, 131)"),
    (dict(logit_bias={5: 101.0}), "logit_bias[5]=101.0 is invalid: must be a number in [-100, 100]"),
    (dict(logit_bias={5: float("nan")}), "logit_bias[5]=nan is invalid"),
    (dict(logit_bias={i: 1.0 for i in range(301)}), "is invalid: must be None or a dict of at most 300"),
    (dict(logit_bias=[5]), "logit_bias=[5] is invalid: must be None or a dict"),
    (dict(truncate_prompt_tokens=0), "truncate_prompt_tokens=0 is invalid: must be None or an integer >= 1"),
    (dict(detokenize=0), "detokenize=0 is invalid: must be a bool"),
    (dict(detokenize=False, stop="x"), "stop='x' is invalid with detokenize=False"),
]


# the token-id checks need the vocabulary (131 in make_engine): they wait for admission
@pytest.mark.parametrize("kw,msg", BAD_PARAMS)
def test_bad_sampling_params_rejected_engine_still_works(kw, msg):
    e = make_engine()
    if "[0, 131)" in msg:  # a token id past make_engine's vocabulary (131)
        params = SamplingParams(**kw)  # constructs: only admission knows the vocabulary
        assert params.validate() is params
    else:
        # the constructor raises (as vLLM's __post_init__), with the admission message ...
        with pytest.raises(ValueError) as ei:
            SamplingParams(**kw)
        assert msg in str(ei.value)
        # ... and msgspec decoding (JSONL lines, LLM.generate dicts) refuses it too (its own
        # type message for a wrong type, ours for a value out of range)
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert(kw, SamplingParams)
        # a Struct is mutable after construction: admission re-checks every field
        params = SamplingParams()
        for k, v in kw.items():
            setattr(params, k, v)
    with pytest.raises(ValueError) as ei:
        e.add_request("bad", "hello", params)
    assert msg in str(ei.value)
    assert_clean(e)
    e.add_request("bad", "hello", SamplingParams(max_tokens=2))  # same id is free again
    assert run_all(e)["bad"].finished


def test_good_params_and_json_roundtrip():
    p = SamplingParams(n=2, temperature=0.5, top_p=0.9, top_k=5, min_p=0.1, seed=3, stop="x",
                       stop_token_ids=[4], logprobs=20, prompt_logprobs=0, min_tokens=2,
                       logit_bias={7: -100.0, 130: 2.5}, allowed_token_ids=[7, 8], truncate_prompt_tokens=4)
    assert p.validate(131) is p
    back = msgspec.json.decode(msgspec.json.encode(p), type=SamplingParams)
    assert back == p and back.stop_strings == ["x"]
    # JSON object keys are strings: a JSONL line's logit_bias decodes to int token ids
    line = b'{"logit_bias": {"7": -100, "130": 2.5}, "allowed_token_ids": [7]}'
    assert msgspec.json.decode(line, type=SamplingParams).logit_bias == {7: -100.0, 130: 2.5}


def test_truncate_prompt_tokens_keeps_the_last_k():
    e = make_engine()
    prompt = "y" * 200  # over max_model_len=128 unless truncated
    e.add_request("t", prompt, SamplingParams(max_tokens=2, truncate_prompt_tokens=5))
    out = run_all(e)["t"]
    assert out.prompt_token_ids == e.tokenizer.encode(prompt)[-5:] and out.finished
    assert_clean(e)
    assert SamplingParams(top_k=0).validate() and SamplingParams(temperature=0).greedy


@pytest.mark.parametrize("prompt,msg", [
    ("", "prompt=[] is invalid: the prompt must have at least 1 token"),
    ([], "prompt=[] is invalid"),
    ({"prompt_token_ids": []}, "prompt=[] is invalid"),
    ([5, 131], "prompt_token_ids[1]=131 is invalid: must be an int in [0, vocab_size=131)"),
    ([-1], "prompt_token_ids[0]=-1 is invalid"),
    ([True], "prompt_token_ids[0]=True is invalid"),
    ("x" * 128, "prompt length=128 tokens is invalid: must be < max_model_len=128"),
    ({"foo": 1}, "a dict prompt needs 'prompt_token_ids'"),
    (3.5, "prompt of type float is invalid"),
])
def test_bad_prompts_rejected(prompt, msg):
    e = make_engine()
    with pytest.raises(ValueError) as ei:
        e.add_request("r", prompt, SamplingParams(max_tokens=2))
    assert msg in str(ei.value)
    assert_clean(e)
    assert e.get_stats()["num_steps"] == 0


def test_duplicate_ids_and_n_children_ids():
    e = make_engine()
    e.add_request("a", "hi", SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="request_id='a' is invalid"):
        e.add_request("a", "hi", SamplingParams(max_tokens=2))
    e.add_request("b", "hi", SamplingParams(n=2, max_tokens=2))
    with pytest.raises(ValueError, match=r"request_id='b#1' is invalid"):
        e.add_request("b#1", "hi", SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="request_id='' is invalid"):
        e.add_request("", "hi")
    with pytest.raises(ValueError, match="params of type dict is invalid"):
        e.add_request("c", "hi", {"max_tokens": 2})
    fin = run_all(e)
    assert set(fin) == {"a", "b"} and len(fin["b"].outputs) == 2


def test_engine_config_validation():
    with pytest.raises(ValueError, match="max_num_seqs=0 is invalid: must be an integer >= 1"):
        EngineConfig(model="m", max_num_seqs=0).validate()
    with pytest.raises(ValueError, match="gpu_memory_utilization=1.5 is invalid: must be in"):
        EngineConfig(model="m", gpu_memory_utilization=1.5).validate()
    with pytest.raises(ValueError, match="dtype='int3' is invalid"):
        EngineConfig(model="m", dtype="int3").validate()
    with pytest.raises(ValueError, match="block_size=0 is invalid"):
        EngineConfig(model="m", block_size=0).validate()
    with pytest.raises(ValueError, match=r"num_blocks=4 is invalid: the KV cache holds 4 x "
                                         r"block_size=4 = 16 tokens, less than max_model_len=128"):
        make_engine(num_blocks=4)
    cfg = msgspec.json.decode(b'{"model": "m", "max_model_len": 64}', type=EngineConfig)
    assert cfg.validate().scheduler_config().max_model_len == 64


def test_detokenize_false_gives_ids_without_text():
    e = make_engine()
    e.add_request("a", "hello", SamplingParams(max_tokens=4, temperature=0.0, detokenize=False))
    e.add_request("b", "hello", SamplingParams(max_tokens=4, temperature=0.0))
    fin = run_all(e)
    assert fin["a"].outputs[0].token_ids == fin["b"].outputs[0].token_ids and len(fin["a"].outputs[0].token_ids) == 4
    assert fin["a"].outputs[0].text == "" and fin["b"].outputs[0].text != ""
    assert_clean(e)
