"""prompt_logprobs on the real jitted engine vs HF transformers' log_softmax, across chunked prefill."""
import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from tests.models.hf_tiny import make_tiny_hf


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = make_tiny_hf("llama", str(tmp_path_factory.mktemp("plp")))
    llm = LLM(d, max_model_len=256, max_num_seqs=4, max_num_batched_tokens=64, block_size=8,
              enable_prefix_caching=True)
    return d, llm


def test_prompt_logprobs_match_transformers(setup):
    import torch
    import transformers

    d, llm = setup
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, n).tolist() for n in (2, 5, 150)]  # 150 > budget 64: chunked
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=2, prompt_logprobs=3, temperature=0, n=2), use_tqdm=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    assert llm.get_tokenizer().has_text is False  # texts: tests/engine/test_engine.py
    ranks = []
    for p, o in zip(prompts, outs):
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([p])).logits[0], -1).numpy()  # [len, V]
        pl = o.prompt_logprobs
        assert pl is not None and len(pl) == len(p) and pl[0] is None
        for i in range(1, len(p)):
            row, own = ref[i - 1], pl[i][p[i]]
            assert abs(own.logprob - row[p[i]]) < 1e-4
            # vLLM's rank in the full distribution, also for prompt tokens far outside the top 3
            assert 1 + (row > row[p[i]] + 1e-4).sum() <= own.rank <= 1 + (row > row[p[i]] - 1e-4).sum()
            ranks.append(own.rank)
            top3 = np.argsort(-row)[:3].tolist()
            assert set(top3) <= set(pl[i]), (i, top3, pl[i])
            assert [pl[i][t].rank for t in top3 if t != p[i]] == [r + 1 for r, t in enumerate(top3) if t != p[i]]
            assert len(pl[i]) in (3, 4)  # the prompt token plus the top 3 (it may be among them)
            assert all(lp.decoded_token is None for lp in pl[i].values())  # no tokenizer: no text
    assert max(ranks) > 3
    runner = llm.engine.runner
    # step + prompt-lp per bucket, sampling per S + the block copy (beam search forks), at warm-up only
    assert runner.compile_count == runner.warmup_compile_count
    assert llm.engine.get_stats()["num_free_blocks"] == llm.engine.get_stats()["num_blocks"]


def test_no_prompt_logprobs_unless_asked(setup):
    _, llm = setup
    out = llm.generate([{"prompt_token_ids": [1, 2, 3, 4]}], SamplingParams(max_tokens=1), use_tqdm=False)[0]
    assert out.prompt_logprobs is None


def test_workspace_bytes_profiling_pass(setup):
    """The accelerator KV sizing subtracts this; it must cover at least the penalty state and the
    step's own temporaries (XLA's memory analysis of the largest bucket)."""
    _, llm = setup
    runner = llm.engine.runner
    ws = runner.workspace_bytes()
    assert ws > runner.counts.nbytes + runner.prompt_mask.nbytes
    assert runner.compile_count == runner.warmup_compile_count  # the probe's compiles are not kept
