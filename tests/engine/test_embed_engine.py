"""Embedding requests in the host engine, on the fake runner (no jax): pooling over chunks equals
pooling the whole prompt, batching does not change a result, blocks are freed the step a prompt is
done and never enter the prefix cache, preemption/abort/async scheduling, and the task errors."""
import numpy as np
import pytest

from jaxllm.config import EngineConfig
from jaxllm.engine.engine import LLMEngine
from jaxllm.engine.pooling import pool
from jaxllm.llm import LLM
from jaxllm.outputs import EmbeddingRequestOutput
from jaxllm.pooling_params import PoolingParams
from jaxllm.sampling_params import SamplingParams
from tests.engine.conftest import assert_clean, run_all
from tests.fakes.fake_runner import FakeRunner, fake_hidden
from tests.fakes.fake_tokenizer import FakeIncrementalDetokenizer, FakeTokenizer


def make_embed_engine(num_blocks=64, block_size=4, task="embed", runner_task="embed", **cfg):
    cfg.setdefault("max_model_len", 128)
    cfg.setdefault("max_num_batched_tokens", 32)
    cfg.setdefault("max_num_seqs", 8)
    config = EngineConfig(model="fake", block_size=block_size, task=task, **cfg)
    tok = FakeTokenizer()
    runner = FakeRunner(num_blocks, block_size, vocab_size=tok.vocab_size, eos_token_ids=tok.eos_token_ids,
                        task=runner_task)
    return LLMEngine(config, runner, tok, detokenizer_factory=FakeIncrementalDetokenizer)


def reference(ids, pooling_type="LAST", normalize=True):
    """Pool the fake model's hidden states of the whole prompt at once (independent of the engine's
    chunk bookkeeping): LAST = the state at the last token, MEAN = the mean over all positions."""
    hs = np.stack([fake_hidden(ids[:p + 1]) for p in range(len(ids))]).astype(np.float64)
    v = hs[-1] if pooling_type == "LAST" else hs.mean(0)
    return v / np.linalg.norm(v) if normalize else v


PROMPTS = [[5, 6, 7], list(range(2, 80)), [9], list(range(3, 40)), [11] * 33]


@pytest.mark.parametrize("pooling_type", ["LAST", "MEAN"])
@pytest.mark.parametrize("async_scheduling", [False, True])
def test_chunked_batched_pooling_matches_whole_prompt(pooling_type, async_scheduling):
    e = make_embed_engine(async_scheduling=async_scheduling)
    for i, ids in enumerate(PROMPTS):
        e.add_request(f"r{i}", ids, PoolingParams(pooling_type=pooling_type))
    finals = run_all(e)
    assert max(len(p) for p in PROMPTS) > e.config.max_num_batched_tokens  # one prompt ran in chunks
    for i, ids in enumerate(PROMPTS):
        out = finals[f"r{i}"]
        assert isinstance(out, EmbeddingRequestOutput) and out.prompt_token_ids == ids
        np.testing.assert_allclose(out.outputs.embedding, reference(ids, pooling_type), rtol=1e-5, atol=1e-6)
    assert not e.kv.pool.cached and e.kv.prefix_queries == 0  # never in the prefix cache
    assert e.get_stats()["num_generated_tokens"] == 0


def test_blocks_freed_the_step_the_prompt_is_done_and_batch_equals_alone():
    e = make_embed_engine()
    e.add_request("short", [4, 5, 6])
    e.add_request("long", list(range(2, 70)))  # 3 chunks of <= 32 tokens
    outs = e.step()  # step 1: "short" whole + "long"'s first chunk
    assert [o.request_id for o in outs] == ["short"]
    assert e.kv.get_block_ids("short") == [] and "short" not in e.scheduler.requests
    finals = {o.request_id: o for o in outs} | run_all(e)
    alone = make_embed_engine()
    alone.add_request("long", list(range(2, 70)))
    assert run_all(alone)["long"].outputs.embedding == finals["long"].outputs.embedding


def test_normalize_false_and_engine_defaults():
    e = make_embed_engine(pooling_type="MEAN", normalize=False)
    e.add_request("a", [5, 6, 7, 8])
    e.add_request("b", [5, 6, 7, 8], PoolingParams(pooling_type="LAST", normalize=True))
    f = run_all(e)
    np.testing.assert_allclose(f["a"].outputs.embedding, reference([5, 6, 7, 8], "MEAN", False), rtol=1e-5)
    np.testing.assert_allclose(f["b"].outputs.embedding, reference([5, 6, 7, 8], "LAST", True), rtol=1e-5)
    assert abs(np.linalg.norm(f["b"].outputs.embedding) - 1) < 1e-6


def test_preempted_embedding_is_recomputed_from_scratch():
    """A preempted embedding restarts at position 0: the sum of its earlier chunks is dropped.
    (An embed-only batch rarely preempts: only the oldest running prompt grows; so preempt by hand.)"""
    e = make_embed_engine(max_num_batched_tokens=8)
    ids = list(range(10, 40))
    e.add_request("r", ids, PoolingParams(pooling_type="MEAN"))
    e.step()
    e.step()  # 16 of 30 tokens pooled
    req = e.scheduler.running.pop()
    e.scheduler._preempt(req)
    f = run_all(e)
    assert e.scheduler.num_preemptions == 1 and req.num_preemptions == 1
    np.testing.assert_allclose(f["r"].outputs.embedding, reference(ids, "MEAN"), rtol=1e-5, atol=1e-6)


def test_abort_mid_prompt_frees_blocks():
    e = make_embed_engine()
    e.add_request("a", list(range(2, 100)))
    e.step()
    assert e.kv.num_free_blocks < e.kv.num_blocks
    assert e.abort_request("a") == []
    assert_clean(e)


def test_bad_input_and_wrong_task_errors():
    e = make_embed_engine()
    cases = [
        (([],), "prompt=[] is invalid"),
        ((list(range(2, 2 + 129)),), "prompt length=129 tokens is invalid: must be <= max_model_len=128"),
        (([5, 999],), "prompt_token_ids[1]=999 is invalid"),
        (([5], SamplingParams()), "task='embed' is invalid for SamplingParams"),
        (([5], PoolingParams(pooling_type="CLS")), "pooling_type='CLS' is invalid"),
        (([5], PoolingParams(normalize=1)), "normalize=1 is invalid"),
    ]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
            e.add_request("x", *args)
    e.add_request("ok", list(range(2, 130)))  # exactly max_model_len tokens: fine for an embedding
    with pytest.raises(ValueError, match="request_id='ok' is invalid: a request with this id is still unfinished"):
        e.add_request("ok", [5])
    run_all(e)
    gen = make_embed_engine(task="generate", runner_task="generate")
    with pytest.raises(ValueError, match="task='generate' is invalid for PoolingParams"):
        gen.add_request("x", [5], PoolingParams())
    with pytest.raises(ValueError, match="task='embed' is invalid for this model runner"):
        make_embed_engine(task="embed", runner_task="generate")
    with pytest.raises(ValueError, match=r"task='generate' is invalid for embed\(\)"):
        LLM(engine=gen).embed(["hi"])
    assert_clean(gen)


def test_llm_embed_offline_api():
    e = make_embed_engine()
    llm = LLM(engine=e)
    outs = llm.embed(["hello", [5, 6, 7], {"prompt_token_ids": [8, 9]}], use_tqdm=False)
    tok = FakeTokenizer()
    ids = [tok.encode("hello"), [5, 6, 7], [8, 9]]
    assert [o.prompt_token_ids for o in outs] == ids
    assert outs[0].prompt == "hello"
    for o, i in zip(outs, ids):
        np.testing.assert_allclose(o.outputs.embedding, reference(i), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="prompt=\\[\\] is invalid"):
        llm.embed([[5], []], use_tqdm=False)
    assert_clean(e)  # the all-or-nothing intake aborted the first prompt


def test_pool_function():
    total, last = np.array([2.0, 4.0]), np.array([3.0, 4.0])
    np.testing.assert_allclose(pool(total, last, 2, "MEAN", False), [1.0, 2.0])
    np.testing.assert_allclose(pool(total, last, 2, "LAST", True), [0.6, 0.8])
