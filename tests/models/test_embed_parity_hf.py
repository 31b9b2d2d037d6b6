"""Embedding parity with HF transformers (issue 13): tiny random Llama and Qwen3 *base* models
(LlamaModel / Qwen3Model, no LM head, as e5-mistral and Qwen3-Embedding ship), loaded and served
by the real engine with task auto-detected from the checkpoint; embeddings vs last_hidden_state
pooled the same way (cosine >= 0.9999 in fp32), a prompt longer than the token budget (chunked),
LAST and MEAN, a mixed-length batch equal to each prompt alone, every KV block free after, and
zero compiles after warm-up."""
import numpy as np
import pytest

from jaxllm.llm import LLM
from jaxllm.pooling_params import PoolingParams
from jaxllm.sampling_params import SamplingParams
from tests.models.hf_tiny import hf_embeddings, make_tiny_hf_embed

BUDGET = 64
LENGTHS = (1, 7, 33, 150)  # 150 > BUDGET: prefilled in 3 chunks


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tiny_hf_embed"))


def build(path):
    return LLM(path, max_num_batched_tokens=BUDGET, max_num_seqs=4, max_model_len=256,
               kv_cache_memory_bytes=1 << 22)


@pytest.fixture(scope="module")
def llama(root):
    path = make_tiny_hf_embed("llama", root)  # LlamaModel, no sentence-transformers files
    return path, build(path)


@pytest.fixture(scope="module")
def qwen3(root):
    path = make_tiny_hf_embed("qwen3", root, sentence_transformers="MEAN")  # Qwen3Model + 1_Pooling MEAN
    return path, build(path)


def cosine(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def prompts(seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, n).tolist() for n in LENGTHS]


def check_parity(path, llm, pooling_type, seqs):
    compiled = (llm.engine.runner.compile_count, llm.engine.runner.num_traces)
    outs = llm.embed(seqs, PoolingParams(pooling_type=pooling_type), use_tqdm=False)
    ref = hf_embeddings(path, seqs, pooling_type, normalize=True)
    for o, r, s in zip(outs, ref, seqs):
        assert o.prompt_token_ids == s and len(o.outputs.embedding) == r.shape[0]
        assert cosine(o.outputs.embedding, r) >= 0.9999, (len(s), cosine(o.outputs.embedding, r))
        np.testing.assert_allclose(o.outputs.embedding, r, atol=1e-4)
        assert abs(np.linalg.norm(o.outputs.embedding) - 1) < 1e-5
    stats = llm.engine.get_stats()
    assert stats["num_free_blocks"] == stats["num_blocks"] and not llm.engine.kv.pool.cached
    assert (llm.engine.runner.compile_count, llm.engine.runner.num_traces) == compiled, "compiled after warm-up"
    return outs


def test_llama_base_model_is_an_embedder(llama):
    path, llm = llama
    e = llm.engine
    assert e.task == "embed" and e.config.pooling_type == "LAST" and e.config.normalize is True
    assert not e.runner.model_config.has_lm_head
    # warm-up compiled the embed step of each mixed bucket and nothing else
    assert e.runner.compile_count == len(e.runner.buckets.mixed) == e.runner.warmup_compile_count
    assert all(k[0] == "embed" for k in e.runner._executables)


@pytest.mark.parametrize("pooling_type", ["LAST", "MEAN"])
def test_llama_parity(llama, pooling_type):
    check_parity(*llama, pooling_type, prompts(0))


def test_qwen3_parity_and_sentence_transformers_default(qwen3):
    path, llm = qwen3
    assert llm.engine.task == "embed" and llm.engine.config.pooling_type == "MEAN"  # from 1_Pooling/config.json
    seqs = prompts(1)
    batched = check_parity(path, llm, "MEAN", seqs)
    check_parity(path, llm, "LAST", seqs)
    for s, b in zip(seqs, batched):  # the batch changes nothing: each prompt alone gives the same vector
        alone = llm.embed([s], use_tqdm=False)[0]  # engine default: MEAN
        np.testing.assert_allclose(alone.outputs.embedding, b.outputs.embedding, rtol=1e-5, atol=1e-6)
    llm.engine.async_scheduling = True  # one step in flight (the GPU default): same vectors
    try:
        again = check_parity(path, llm, "MEAN", seqs)
    finally:
        llm.engine.async_scheduling = False
    for a, b in zip(again, batched):
        np.testing.assert_allclose(a.outputs.embedding, b.outputs.embedding, rtol=1e-5, atol=1e-6)


def test_errors_name_the_field_and_leak_nothing(llama, root):
    path, llm = llama
    for bad, msg in [([[]], r"prompt=\[\] is invalid"),
                     ([list(range(257))], "prompt length=257 tokens is invalid: must be <= max_model_len=256"),
                     ([[3, 256]], r"prompt_token_ids\[1\]=256 is invalid")]:
        with pytest.raises(ValueError, match=msg):
            llm.embed([[1, 2, 3]] + bad, use_tqdm=False)
    with pytest.raises(ValueError, match="task='embed' is invalid for SamplingParams"):
        llm.generate([[1, 2]], SamplingParams(max_tokens=2), use_tqdm=False)
    stats = llm.engine.get_stats()
    assert stats["num_free_blocks"] == stats["num_blocks"] and stats["num_unfinished_requests"] == 0
    with pytest.raises(ValueError, match="task='generate' is invalid for this checkpoint: .* without an LM head"):
        LLM(path, task="generate", max_model_len=64, kv_cache_memory_bytes=1 << 20)


def test_cli_task_embed_writes_jsonl(llama, tmp_path, capsys):
    """python -m jaxllm.generate --task embed: one JSON line per prompt, equal to LLM.embed's."""
    import json

    from jaxllm.generate import main

    path, llm = llama
    seqs = prompts(2)[:3]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"prompt_token_ids": s}) + "\n" for s in seqs))
    rc = main(["--model", path, "--task", "embed", "--pooling-type", "MEAN", "--input", str(inp), "--output", str(out),
               "--max-num-batched-tokens", str(BUDGET), "--max-num-seqs", "4", "--max-model-len", "256",
               "--kv-cache-memory-bytes", str(1 << 22), "--no-progress", "--log-level", "warning"])
    assert rc == 0, capsys.readouterr().err
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    want = llm.embed(seqs, PoolingParams(pooling_type="MEAN"), use_tqdm=False)
    assert [x["prompt_token_ids"] for x in lines] == seqs
    for x, w in zip(lines, want):
        np.testing.assert_allclose(x["embedding"], w.outputs.embedding, rtol=1e-5, atol=1e-6)
    assert "3 embeddings" in capsys.readouterr().out
    rc = main(["--model", path, "--task", "generate", "--input", str(inp), "--max-model-len", "256"])
    assert rc == 2 and "task='generate' is invalid for this checkpoint" in capsys.readouterr().err


def test_workspace_probe_compiles_the_embed_step(llama):
    """The accelerator KV-sizing probe (workspace_bytes) of an embed runner compiles its embed step:
    the generate step would need the LM head a base model lacks."""
    _, llm = llama
    assert llm.engine.runner.workspace_bytes() > 0


def test_llm_score_of_an_embedder_is_the_cosine_of_hf_embeddings(llama):
    """vLLM's LLM.score on an embedding model: the cosine of the two texts' embeddings (1:N and N:N)."""
    path, llm = llama
    a, *bs = prompts(5)[:3]
    ref = hf_embeddings(path, [a, *bs], "LAST", normalize=True)
    want = [cosine(ref[0], r) for r in ref[1:]]
    one_n = llm.score({"prompt_token_ids": a}, [{"prompt_token_ids": b} for b in bs], use_tqdm=False)
    n_n = llm.score([{"prompt_token_ids": b} for b in bs], [{"prompt_token_ids": a}] * 2, use_tqdm=False)
    np.testing.assert_allclose([o.outputs.score for o in one_n], want, atol=1e-5)
    np.testing.assert_allclose([o.outputs.score for o in n_n], want, atol=1e-5)
    assert [o.prompt_token_ids for o in one_n] == [a + b for b in bs]
    stats = llm.engine.get_stats()
    assert stats["num_free_blocks"] == stats["num_blocks"]
