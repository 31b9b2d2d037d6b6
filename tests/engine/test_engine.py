import msgspec
import pytest

from jaxllm.engine.output_processor import TokenTexts
from jaxllm.outputs import Logprob, RequestOutput, output_json
from jaxllm.sampling_params import SamplingParams
from tests.engine.conftest import make_engine, run_all, script_fn
from tests.fakes.fake_tokenizer import EOS, SEP

G = dict(temperature=0.0)


def test_stop_string_across_token_boundaries_excluded():
    e = make_engine(next_token_fn=script_fn("hello STOP world"))
    e.add_request("a", "hi", SamplingParams(stop=["STOP", "zzz"], max_tokens=50, **G))
    e.add_request("b", "hi", SamplingParams(stop="STOP", include_stop_str_in_output=True,
                                            max_tokens=50, **G))
    fin = run_all(e)
    a, b = fin["a"].outputs[0], fin["b"].outputs[0]
    assert a.text == "hello " and a.finish_reason == "stop" and a.stop_reason == "STOP"
    assert len(a.token_ids) == len("hello STOP")
    assert b.text == "hello STOP" and b.stop_reason == "STOP"


def test_streamed_text_never_shows_partial_stop_string():
    e = make_engine(next_token_fn=script_fn("abcSTOP"))
    e.add_request("a", "x", SamplingParams(stop="STOP", max_tokens=50, **G))
    texts = []
    while e.has_unfinished_requests():
        for o in e.step():
            texts.append(o.outputs[0].text)
    assert all("S" not in t for t in texts) and texts[-1] == "abc"
    # cumulative: each text extends the previous one
    assert all(texts[i + 1].startswith(texts[i]) for i in range(len(texts) - 1))


def test_max_tokens_length_and_max_model_len():
    e = make_engine(next_token_fn=script_fn("abcdefghijklmnopqrstuvwxyz"), max_model_len=20)
    e.add_request("a", "xyz", SamplingParams(max_tokens=5, **G))
    # prompt + max_tokens over max_model_len: accepted, stops at max_model_len
    e.add_request("b", "0123456789", SamplingParams(max_tokens=100, **G))
    fin = run_all(e)
    assert fin["a"].outputs[0].text == "abcde" and fin["a"].outputs[0].finish_reason == "length"
    b = fin["b"].outputs[0]
    assert len(b.token_ids) == 10 and b.finish_reason == "length"


def test_eos_stop_token_ids_and_ignore_eos():
    ids_script = "ab" + chr(0)  # chr(0) -> token id 3
    fn = script_fn(ids_script)

    def with_eos(ctx, seq):
        k = len(ctx) - seq.num_prompt_tokens
        return EOS if k == 2 else fn(ctx, seq)
    e = make_engine(next_token_fn=with_eos)
    e.add_request("eos", "p", SamplingParams(max_tokens=10, **G))
    e.add_request("ign", "p", SamplingParams(max_tokens=6, ignore_eos=True, **G))
    e.add_request("sid", "p", SamplingParams(max_tokens=10, stop_token_ids=[fn([0] * 1, _Seq())],
                                             ignore_eos=True, **G))
    fin = run_all(e)
    eos = fin["eos"].outputs[0]
    assert eos.token_ids[-1] == EOS and eos.text == "ab" and eos.finish_reason == "stop"
    assert eos.stop_reason is None
    ign = fin["ign"].outputs[0]
    assert len(ign.token_ids) == 6 and ign.finish_reason == "length"
    sid = fin["sid"].outputs[0]
    assert sid.finish_reason == "stop" and sid.stop_reason == sid.token_ids[-1]


class _Seq:
    num_prompt_tokens = 0


def test_min_tokens_suppresses_stops():
    def always_eos(ctx, seq):
        return EOS
    e = make_engine(next_token_fn=always_eos)
    # the fake sampler masks EOS below min_tokens (as the real sampler must) ...
    e.add_request("a", "p", SamplingParams(min_tokens=4, max_tokens=10, **G))
    fin = run_all(e)
    out = fin["a"].outputs[0]
    assert len(out.token_ids) == 5 and out.token_ids[-1] == EOS and EOS not in out.token_ids[:4]
    # ... and stop strings are not honoured below min_tokens either
    e = make_engine(next_token_fn=script_fn("STOPxSTOPy"))
    e.add_request("b", "p", SamplingParams(stop="STOP", min_tokens=5, max_tokens=20, **G))
    out = run_all(e)["b"].outputs[0]
    assert out.text == "STOPx" and out.finish_reason == "stop"


def test_abort_mid_flight_frees_blocks():
    e = make_engine()
    e.add_request("a", "x" * 40, SamplingParams(max_tokens=50, ignore_eos=True, **G))
    e.add_request("b", "y" * 40, SamplingParams(max_tokens=50, ignore_eos=True, **G))
    for _ in range(4):
        e.step()
    assert e.get_stats()["num_free_blocks"] < e.get_stats()["num_blocks"]
    outs = e.abort_request("a")
    assert outs[0].finished and outs[0].outputs[0].finish_reason == "abort"
    assert e.abort_request(["a", "nope"]) == []  # no-op
    fin = run_all(e)
    assert set(fin) == {"b"} and len(fin["b"].outputs[0].token_ids) == 50
    assert "a" in e.runner.released or any("a" in s.finished_or_preempted_ids for s in e.runner.steps)
    e.abort_request("b")  # finished: no-op


def test_n_greater_than_one_and_merged_output():
    e = make_engine(max_num_batched_tokens=64)
    e.add_request("p", "shared prompt that spans blocks",
                  SamplingParams(n=3, temperature=0.9, seed=7, max_tokens=8, ignore_eos=True))
    fin = run_all(e)
    out = fin["p"]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 8 and c.finish_reason == "length" for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # different derived seeds
    # child 0 with seed 7 equals an n=1 request with seed 7
    e2 = make_engine()
    e2.add_request("q", "shared prompt that spans blocks",
                   SamplingParams(temperature=0.9, seed=7, max_tokens=8, ignore_eos=True))
    assert run_all(e2)["q"].outputs[0].token_ids == out.outputs[0].token_ids
    # the children shared the prompt's full blocks in the first step
    first = e.runner.steps[0]
    t = [s.block_ids.tolist() for s in first.seqs]  # the tables as scheduled then (snapshots)
    n_full = (len("shared prompt that spans blocks") - 1) // 4
    assert t[0][:n_full] == t[1][:n_full] == t[2][:n_full]


def test_seeded_sampling_independent_of_batch():
    def run(extra):
        e = make_engine(max_num_batched_tokens=16)
        for i in range(extra):
            e.add_request(f"x{i}", "other" * (i + 1), SamplingParams(temperature=1.0, max_tokens=6))
        e.add_request("me", "my prompt", SamplingParams(temperature=0.7, seed=123, max_tokens=12,
                                                        ignore_eos=True))
        return run_all(e)["me"].outputs[0].token_ids
    assert run(0) == run(10)


def test_prefix_cache_num_cached_tokens_and_stats():
    e = make_engine()
    prefix = "a shared system prompt! " * 2  # 48 chars = 12 blocks of 4
    e.add_request("a", prefix + "one", SamplingParams(max_tokens=3, **G))
    run_all(e)
    e.add_request("b", prefix + "two", SamplingParams(max_tokens=3, **G))
    fin = run_all(e)
    assert fin["b"].num_cached_tokens == 48
    assert e.get_stats()["prefix_cache_hit_rate"] > 0
    m = fin["b"].metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time


def test_outputs_roundtrip_msgspec_json():
    e = make_engine()
    e.add_request("a", "hi", SamplingParams(max_tokens=3, logprobs=2, **G))
    out = run_all(e)["a"]
    c = out.outputs[0]
    assert len(c.logprobs) == 3 and all(len(d) == 2 for d in c.logprobs)
    assert c.cumulative_logprob == pytest.approx(sum(d[t].logprob for d, t in zip(c.logprobs, c.token_ids)))
    back = msgspec.json.decode(msgspec.json.encode(out), type=RequestOutput)
    assert back == out


def test_logprob_objects_decoded_tokens_and_jsonl():
    """vLLM's Logprob per entry: the runner's rank for the sampled token, 1..k for the top-k in
    order, decoded_token = tokenizer.decode([id], skip_special_tokens=False) (None without
    detokenize); the --output JSONL keeps plain {"token_id": logprob}."""
    e = make_engine()
    e.add_request("a", "hi", SamplingParams(max_tokens=4, logprobs=3, ignore_eos=True, **G))
    e.add_request("b", "hi", SamplingParams(max_tokens=4, logprobs=3, ignore_eos=True, detokenize=False, **G))
    fin = run_all(e)
    c = fin["a"].outputs[0]
    for tok, entry in zip(c.token_ids, c.logprobs):
        assert all(isinstance(v, Logprob) for v in entry.values())
        assert entry[tok].rank == 1  # the fake runner's sampled token is its best (it says rank 1)
        others = [t for t in entry if t != tok]
        assert [entry[t].rank for t in others] == list(range(2, 2 + len(others)))  # top-k order
        for t, lp in entry.items():
            assert lp.decoded_token == e.tokenizer.decode([t], skip_special_tokens=False)
    assert TokenTexts(e.tokenizer)(EOS) == "<eos>" != e.tokenizer.decode([EOS])  # special tokens shown, as vLLM
    b = fin["b"].outputs[0]
    assert b.token_ids == c.token_ids and all(lp.decoded_token is None for d in b.logprobs for lp in d.values())
    line = msgspec.json.decode(output_json(fin["a"]))
    assert line["outputs"][0]["logprobs"] == [{str(t): lp.logprob for t, lp in d.items()} for d in c.logprobs]
    assert line["prompt_logprobs"] is None and line["outputs"][0]["token_ids"] == c.token_ids
    plain = msgspec.to_builtins(fin["a"], str_keys=True)
    plain["outputs"][0]["logprobs"] = line["outputs"][0]["logprobs"]
    assert line == plain  # everything else as msgspec writes the RequestOutput itself


def test_prompt_forms_and_chat_template():
    e = make_engine(next_token_fn=script_fn("ok"))
    e.add_request("s", "hey", SamplingParams(max_tokens=2, **G))
    e.add_request("l", [3 + ord("h")], SamplingParams(max_tokens=2, **G))
    e.add_request("d", {"prompt_token_ids": [5, 6]}, SamplingParams(max_tokens=2, **G))
    e.add_request("t", {"prompt": "yo"}, SamplingParams(max_tokens=2, **G))
    e.add_request("c", e.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]),
                  SamplingParams(max_tokens=2, **G))
    fin = run_all(e)
    assert fin["s"].prompt == "hey" and fin["l"].prompt is None and fin["t"].prompt == "yo"
    assert fin["d"].prompt_token_ids == [5, 6] and SEP in fin["c"].prompt_token_ids
    assert all(o.outputs[0].text == "ok" for o in fin.values())


def test_cache_summary():
    e = make_engine(num_blocks=64, block_size=4, max_model_len=128)
    assert e.cache_summary() == ("KV cache: 64 blocks x 4 tokens = 256 tokens; maximum "
                                 "concurrency at max_model_len=128: 2.00x")
