"""An all-sliding model (Mistral-7B-v0.1's shape: every layer one window) through the real engine: ONE sliding KV
cache group of every layer (cache [L, blocks, ...] as before) whose out-of-window blocks are freed by the hybrid
manager's rules (vLLM's SlidingWindowManager). Tiny random Mistral (tests/models/hf_tiny.py "mistral_w8": 2 layers,
window 8), block_size 4, steps of 16 tokens (prompts prefill in chunks); prompts and outputs run far past the window.
HF's MistralForCausalLM applies the window in eager attention (create_sliding_window_causal_mask), so it is a
reference here. The sliding engine (async scheduling on) gets fewer blocks than the classic one
(--disable-hybrid-kv-cache-manager: full-length blocks, the window only masked; synchronous):

* greedy tokens: sliding == classic == HF generate, twice (the second round from the prefix cache), with preemption;
* n > 1 seeded sampling and beam search (forks copy their partial block): sliding == classic;
* a long request alone holds no more blocks than its window needs (a brute-force count of the blocks under the
  positions the next query reads, plus the chunk being written), while the classic one holds one per 4 tokens;
* every block is back in the pool after each run.
"""
import pytest

from jaxllm import SamplingParams
from jaxllm.core.kv_cache_groups import cdiv
from tests.models.kv_group_checks import (assert_all_free, build_grouped_and_classic,
                                          greedy_matches_classic_and_hf, sampling_n_and_beam_match_classic)

BS, W, BUDGET = 4, 8, 16
MAX_LEN = 96
SLIDING_BLOCKS = 8  # 4 requests decoding hold 3 blocks each (a max_model_len one fits: 7): they preempt
CLASSIC_BLOCKS = 40


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    path, sliding, classic = build_grouped_and_classic(
        "mistral_w8", str(tmp_path_factory.mktemp("sliding_kv")), "sliding", SLIDING_BLOCKS, CLASSIC_BLOCKS, block_size=BS,
        max_model_len=MAX_LEN, budget=BUDGET, warmup_grouped=False)
    return path, sliding, classic



def test_one_sliding_group_and_sizing(engines):
    from jaxllm.core.hybrid_kv_cache_manager import HybridKVCacheManager
    from jaxllm.core.kv_cache_manager import KVCacheManager

    _, sliding, classic = engines
    s, k = sliding.engine, classic.engine
    assert [(g.window, g.layers) for g in s.kv_groups.groups] == [(W, (0, 1))] and s.kv_groups.managed
    assert [(g.window, g.layers) for g in k.kv_groups.groups] == [(None, (0, 1))] and not k.kv_groups.managed
    assert type(s.kv) is HybridKVCacheManager and type(k.kv) is KVCacheManager
    assert s.runner.kv_cache.k.shape[:2] == (2, SLIDING_BLOCKS) and k.runner.kv_cache.k.shape[:2] == (2, CLASSIC_BLOCKS)
    assert s.runner.num_kv_groups == 1  # one table: no group metadata
    # a max_model_len request: the window and a chunk, cdiv(7 + 16, 4) + 1 = 7 blocks, vs 96 / 4 = 24
    assert s.blocks_per_request() == 7 and k.blocks_per_request() == 24
    assert "maximum concurrency at max_model_len=96: 1.14x" in s.cache_summary()  # 8 / 7
    assert "1.67x" in k.cache_summary()  # 40 / 24


def test_greedy_matches_classic_and_hf_with_prefix_hits_and_preemption(engines):
    path, sliding, classic = engines
    assert greedy_matches_classic_and_hf(path, sliding, classic) > 0  # 4 requests of 3 to 7 blocks in 8


def test_sampling_n_and_beam_search_match_classic(engines, monkeypatch):
    _, sliding, classic = engines
    copies = sampling_n_and_beam_match_classic(sliding, classic, monkeypatch)
    assert copies  # forks copied their partial block


def window_blocks(num_computed: int, num_tokens: int) -> int:
    """Brute force: the blocks under the positions a query at ``num_computed`` or later reads (the W - 1 before
    it) and under the tokens up to ``num_tokens`` that the step writes."""
    return len({p // BS for p in range(max(0, num_computed - W + 1), num_tokens)})


def test_blocks_held_stay_within_the_window(engines, monkeypatch):
    """A 41-token prompt and 50 tokens alone: after each allocation (prefill chunks of 16, then decodes) the
    request holds exactly the blocks its window and its new tokens need, never more than a max_model_len request
    may (7); the classic engine holds one per 4 tokens."""
    _, sliding, classic = engines
    for llm in (sliding, classic):
        e = llm.engine
        held = []
        real = e.kv.allocate_slots

        def allocate(req, num_new, computed=None, copied=0, e=e, real=real):
            start = req.num_computed_tokens + copied + (e.kv.num_hit_tokens(computed) if computed else 0)
            out = real(req, num_new, computed, copied)
            if out is not None:
                ids = e.kv.get_block_ids(req.request_id)
                held.append((sum(b >= 0 for b in ids), start, start + num_new))
            return out

        monkeypatch.setattr(e.kv, "allocate_slots", allocate)
        e.add_request("long", {"prompt_token_ids": list(range(1, 42))},
                      SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
        while e.has_unfinished_requests():
            e.step()
        assert len(held) > 40
        for n, start, end in held:
            assert n == (window_blocks(start, end) if llm is sliding else cdiv(end, BS)), (n, start, end)
        most = max(n for n, *_ in held)  # sliding: the chunk at 16..31 and the 7 positions before it
        assert most == (6 if llm is sliding else 23) and (llm is classic or most <= e.blocks_per_request())
        assert_all_free(llm)
