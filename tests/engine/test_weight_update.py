"""Weight updates in place on a real (tiny) engine: vLLM's load_weights / reload_weights /
collective_rpc as RLHF loops call them.

Two tiny random Qwen2 checkpoints (tied embeddings, q/k/v bias): A (seed 1), the engine under test is
built from it; B (seed 0). The references are independent of the code under test: an engine built
from B's directory by the loader (and HF transformers' greedy generate on B) for a full push; the
loader's whole-checkpoint path (reload_weights of a directory saved with one tensor changed) for a
partial one; the prefix-cache hit counter; compiles and checkpoint reads counted as
tests/engine/test_sleep.py counts them."""
from __future__ import annotations

import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.config import EngineConfig
from jaxllm.engine.factory import build_engine
from jaxllm.engine.sleep_requests import EngineSleepingError, WeightsDiscardedError
from jaxllm.engine.weight_requests import EngineBusyError
from tests.engine.test_sleep import Compiles, Source, _all_zero
from tests.engine_checks import assert_clean
from tests.models.hf_tiny import make_tiny_hf

KW = dict(max_model_len=64, block_size=4, max_num_seqs=2, max_num_batched_tokens=16,
          kv_cache_memory_bytes=64 * 4 * 2 * 2 * 1 * 32 * 4, enable_sleep_mode=True)
PROMPTS = [{"prompt_token_ids": [5, 17, 3, 99, 42, 7]}, {"prompt_token_ids": [250, 1, 1, 8, 200, 31, 4]}]
GREEDY = SamplingParams(max_tokens=5, temperature=0.0, logprobs=3)
Q1 = "model.layers.1.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("wu")
    a = make_tiny_hf("qwen2", str(root / "a"), seed=1)
    b = make_tiny_hf("qwen2", str(root / "b"), seed=0)
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(b, dtype=torch.float32)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():  # B': B with layer 1's q_proj changed (the partial update's reference)
        model.model.layers[1].self_attn.q_proj.weight.add_(0.5 * torch.randn_like(sd[Q1]))
    b2 = str(root / "b2")
    model.save_pretrained(b2)
    return a, b, b2, sd, model.model.layers[1].self_attn.q_proj.weight.detach().clone()


@pytest.fixture(scope="module")
def llm(dirs):
    return LLM(engine=build_engine(EngineConfig(model=dirs[0], **KW)))


@pytest.fixture(scope="module")
def ref(dirs):
    """The loader's engine for B (its weights are changed only by reload_weights of a directory)."""
    return LLM(engine=build_engine(EngineConfig(model=dirs[1], **KW)))


def _run(llm):
    """(token ids, their logprobs) per prompt, greedy."""
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert_clean(llm.engine)
    return [(list(o.outputs[0].token_ids), [[lp[t].logprob for t in sorted(lp)] for lp in o.outputs[0].logprobs])
            for o in outs]


def _same(a, b) -> bool:
    return all(x[0] == y[0] and np.allclose(x[1], y[1], rtol=0, atol=1e-6) for x, y in zip(a, b))


def test_full_push_matches_the_checkpoint_engine_and_hf(llm, ref, dirs):
    import torch
    import transformers

    _, b, _, sd, _ = dirs
    before = _run(llm)
    with Compiles(llm.engine.runner) as c:
        n = llm.load_weights(sd.items())  # lm_head.weight (tied) skipped as vLLM skips it
        after = _run(llm)
    assert c.none(), (c.before, c.after, c.backend)
    assert n == len(sd) - 1
    want = _run(ref)
    assert _same(after, want) and not _same(before, want)
    hf = transformers.AutoModelForCausalLM.from_pretrained(b, dtype=torch.float32)
    for p, (ids, _) in zip(PROMPTS, after):
        x = torch.tensor([p["prompt_token_ids"]])
        assert hf.generate(x, max_new_tokens=5, do_sample=False)[0, x.shape[1]:].tolist() == ids


def test_partial_push_changes_exactly_what_a_rebuilt_checkpoint_does(llm, ref, dirs):
    _, _, b2, sd, q1 = dirs
    llm.load_weights(sd.items())
    before = _run(llm)
    with Compiles(llm.engine.runner) as c:
        assert llm.load_weights([(Q1, q1.numpy())]) == 1
        after = _run(llm)
    assert c.none()
    ref.reload_weights(b2)  # the whole-checkpoint loader on B with that one tensor changed
    try:
        assert _same(after, _run(ref)) and not _same(after, before)
    finally:
        ref.reload_weights()  # back to the directory it was built from
    assert _same(_run(ref), before)


def test_refused_tensors_name_themselves_and_change_nothing(llm, dirs):
    sd = dirs[3]
    llm.load_weights(sd.items())
    before = _run(llm)
    good = ("model.layers.0.mlp.up_proj.weight", np.zeros((96, 64), np.float32))
    cases = [
        ([good, ("model.layers.0.self_attn.qq_proj.weight", np.zeros(3))], r"model\.layers\.0\.self_attn\.qq_proj\.weight: unknown"),
        ([good, (Q1, np.zeros((64, 65), np.float32))], r"q_proj\.weight: shape \(64, 65\) does not match the model's \(64, 64\)"),
        ([good, ("model.norm.weight", np.zeros(64, np.int32))], r"model\.norm\.weight: dtype int32 is invalid"),
        ([good, ("model.norm.weight", "not a tensor")], r"model\.norm\.weight: is a str"),
    ]
    for weights, match in cases:
        with pytest.raises(ValueError, match=match):
            llm.load_weights(weights)
    assert _same(_run(llm), before)  # the good tensor before each bad one was not applied


def test_prefix_cache_is_reset_by_an_update(llm, dirs):
    kv = llm.engine.kv
    _run(llm)
    hits = kv.prefix_hits
    _run(llm)
    assert kv.prefix_hits > hits  # the repeat hit its cached blocks
    hits = kv.prefix_hits
    llm.load_weights([("model.norm.weight", dirs[3]["model.norm.weight"])])
    _run(llm)
    assert kv.prefix_hits == hits  # nothing cached survived the update


def test_unfinished_requests_are_refused_until_done(llm, dirs):
    eng = llm.engine
    eng.add_request("busy", PROMPTS[0], SamplingParams(max_tokens=20, temperature=0.0))
    eng.step()
    with pytest.raises(EngineBusyError, match=r"1 request\(s\) unfinished"):
        llm.load_weights([("model.norm.weight", dirs[3]["model.norm.weight"])])
    eng.abort_request(["busy"])
    llm.load_weights([("model.norm.weight", dirs[3]["model.norm.weight"])])
    assert_clean(eng)


def test_vllm_rlhf_sequence_sleep_2_wake_weights_load_wake_kv(llm, ref, dirs):
    a, _, _, sd, _ = dirs
    llm.reload_weights(a)  # back to A
    runner = llm.engine.runner
    llm.sleep(level=2)
    with pytest.raises(EngineSleepingError, match=r"weights are asleep.*wake_up\(tags=\['weights'\]\)"):
        llm.load_weights(sd.items())
    with Source(runner, raising=True) as src:  # the wake-up maps memory back: no checkpoint read
        llm.wake_up(tags=["weights"])
        with Compiles(runner) as c:
            llm.load_weights(sd.items())
        llm.wake_up(tags=["kv_cache"])  # (its first wake-up compiles the zeros' allocation: sleep mode's, once)
    assert c.none() and src.reads == 0
    with Compiles(runner) as c:
        after = _run(llm)
    assert c.none()
    assert _same(after, _run(ref))


def test_after_level_2_a_partial_load_is_refused_and_a_full_one_or_a_reload_serves(llm, ref, dirs):
    a, _, _, sd, q1 = dirs
    llm.sleep(level=2)
    llm.wake_up()
    eng = llm.engine
    assert eng.weights_discarded and not llm.is_sleeping()
    with pytest.raises(WeightsDiscardedError, match=r"discarded by sleep\(level=2\)"):
        _run(llm)
    assert_clean(eng)
    n = len(sd) - 1  # tied lm_head excepted
    partial = [(k, v) for k, v in sd.items() if k not in (Q1, "lm_head.weight")]
    with pytest.raises(ValueError, match=rf"weights: 1 of the model's {n} tensors missing \({Q1}\); .*nothing was "
                                         rf"changed"):
        llm.load_weights(partial)
    with pytest.raises(ValueError, match=rf"weights: {n - 1} of the model's {n} tensors missing "
                                         rf"\(model\.embed_tokens\.weight, .*\({n - 5} more\)"):
        llm.load_weights([(Q1, q1.numpy())])
    assert eng.weights_discarded and _all_zero(eng.runner.state)  # the refusals wrote nothing
    with pytest.raises(WeightsDiscardedError):
        _run(llm)
    assert llm.load_weights(sd.items()) == n  # everything, lm_head given or not
    assert not eng.weights_discarded and _same(_run(llm), _run(ref))
    llm.sleep(level=2)
    llm.wake_up()
    llm.reload_weights(a)  # a checkpoint directory clears the mark too
    assert not eng.weights_discarded
    assert not _same(_run(llm), _run(ref))
    llm.reload_weights(dirs[1])
    assert _same(_run(llm), _run(ref))


def test_collective_rpc_maps_onto_the_weight_methods(llm, ref, dirs):
    a, b, _, sd, _ = dirs
    llm.load_weights(sd.items())
    assert llm.collective_rpc("reload_weights", kwargs={"weights_path": a}) == [None]
    at_a = _run(llm)
    assert not _same(at_a, _run(ref))
    assert llm.collective_rpc("load_weights", args=(list(sd.items()),)) == [len(sd) - 1]
    assert _same(_run(llm), _run(ref))
    assert llm.collective_rpc("reload_weights", kwargs={"weights_path": b}) == [None]
    assert _same(_run(llm), _run(ref))
    with pytest.raises(ValueError, match=r"method='execute_model' is invalid: collective_rpc supports"):
        llm.collective_rpc("execute_model")
    with pytest.raises(ValueError, match=r"kwargs\.weights_dir: unknown to reload_weights"):
        llm.collective_rpc("reload_weights", kwargs={"weights_dir": a})
    with pytest.raises(ValueError, match=r"/nonexistent: no such file or directory"):
        llm.collective_rpc("reload_weights", kwargs={"weights_path": "/nonexistent"})
    assert _same(_run(llm), _run(ref))  # a failed reload left the weights as they were
