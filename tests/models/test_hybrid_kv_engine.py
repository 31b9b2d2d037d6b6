"""The hybrid KV cache through the real engine (tiny random Gemma 3: 3 sliding layers with an 8-token window
per full one, tests/models/hf_tiny.py HYBRID_CONFIGS; block_size 4; steps of 16 tokens, so prompts prefill
in chunks). The hybrid engine (4 groups of 1 layer slot, async scheduling on) gets half the KV bytes of the
--disable-hybrid-kv-cache-manager one (1 group of 4 slots, synchronous), which is still twice its blocks;
four requests preempt in it. Prompts and outputs run far past the window.

* greedy tokens: hybrid == disabled == HF generate, twice (the second round from the prefix cache);
* n > 1 seeded sampling and beam search (forks copy their partial block in every group): hybrid == disabled;
* a long request alone: each sliding group holds at most cdiv(window, bs) + 1 blocks while it decodes,
  the full group one per 4 tokens;
* every block is back in the pool after each run, and the warmed-up hybrid engine compiled nothing more.
"""
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.core.kv_cache_groups import cdiv
from tests.models.kv_group_checks import (assert_all_free, build_grouped_and_classic,
                                          greedy_matches_classic_and_hf, sampling_n_and_beam_match_classic)

BS, W, BUDGET = 4, 8, 16
MAX_LEN = 96
CLASSIC_BLOCKS = 40  # the classic engine's KV budget: 40 blocks of 4 layers
HYBRID_BYTES = 20  # the hybrid engine's, in those blocks: 20 of 4 layers = 80 blocks of 1 layer


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    path, hybrid, classic = build_grouped_and_classic(
        "gemma3_w8", str(tmp_path_factory.mktemp("hybrid_kv")), "hybrid", HYBRID_BYTES, CLASSIC_BLOCKS, block_size=BS,
        max_model_len=MAX_LEN, budget=BUDGET, warmup_grouped=True)  # every bucket compiled: serving must compile nothing
    hybrid.engine.warm = (hybrid.engine.runner.compile_count, hybrid.engine.runner.num_traces)
    return path, hybrid, classic



def test_layouts_and_sizing(engines):
    _, hybrid, classic = engines
    h, k = hybrid.engine, classic.engine
    assert [g.window for g in h.kv_groups.groups] == [None, W, W, W] and h.kv_groups.slots == 1
    assert h.runner.kv_cache.k.shape[0] == 1 and k.runner.kv_cache.k.shape[0] == 4
    assert h.runner.num_kv_groups == 4 and not k.kv_groups.hybrid
    assert (h.kv.num_blocks, k.kv.num_blocks) == (4 * HYBRID_BYTES, CLASSIC_BLOCKS)  # per byte 4x the blocks
    # a max_model_len request: 24 full blocks + 3 sliding groups x (cdiv(7 + 16, 4) + 1) vs 24 blocks of 4 layers
    assert h.blocks_per_request() == 24 + 3 * 7 and k.blocks_per_request() == 24
    assert "maximum concurrency at max_model_len=96: 1.78x" in h.cache_summary()  # 80 / 45 from half the bytes
    assert "1.67x" in k.cache_summary()  # 40 / 24


def test_greedy_matches_classic_and_hf_with_prefix_hits_and_preemption(engines):
    path, hybrid, classic = engines
    assert greedy_matches_classic_and_hf(path, hybrid, classic) > 0  # 4 requests of up to 71 tokens (18 + 3 x 3 blocks) in 80 blocks


def test_sampling_n_and_beam_search_match_classic(engines, monkeypatch):
    _, hybrid, classic = engines
    copies = sampling_n_and_beam_match_classic(hybrid, classic, monkeypatch)
    assert copies and all(len(p) % 4 == 0 for p in copies)  # forks: one block copy per group each


def test_sliding_groups_stay_bounded(engines):
    _, hybrid, _ = engines
    e = hybrid.engine
    e.add_request("long", {"prompt_token_ids": list(range(1, 42))},
                  SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    decoding = 0
    while e.has_unfinished_requests():
        e.step()
        req = e.scheduler.requests.get("long")
        if req is None or "long" not in e.kv.req_blocks:
            continue
        held = [e.kv.num_held_blocks("long", g) for g in range(4)]
        assert held[0] == len(e.kv.req_blocks["long"][0])  # the full group holds every block
        assert max(held[1:]) <= cdiv(W - 1 + BUDGET, BS) + 1, held
        if req.num_computed_tokens > req.num_prompt_tokens:  # decoding: the window's blocks only
            decoding += 1
            assert max(held[1:]) <= cdiv(W, BS) + 1 and held[0] == cdiv(req.num_computed_tokens, BS), held
    assert decoding > 40
    assert_all_free(hybrid)


def test_ngram_speculative_decoding_matches_classic(engines):
    """n-gram drafts on the hybrid cache: a step allocates 1 + k slots in every group and rejected drafts
    roll back, while the sliding groups free what falls out of the window. Greedy tokens equal the classic
    engine's (no drafts); drafts were proposed and accepted; every block comes back."""
    from jaxllm.config import EngineConfig
    from jaxllm.engine.factory import build_engine

    path, hybrid, classic = engines
    spec = build_engine(EngineConfig(
        model=path, max_model_len=MAX_LEN, block_size=BS, max_num_seqs=4, max_num_batched_tokens=BUDGET,
        dtype="float32", kv_cache_memory_bytes=hybrid.engine.config.kv_cache_memory_bytes,
        speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
                            "prompt_lookup_min": 1}), compile_cache=False, warmup=False)
    assert spec.kv_groups.hybrid
    llm = LLM("spec", engine=spec)
    prompts = [{"prompt_token_ids": ([11, 12, 13, 14, 15] * 8)[:n]} for n in (12, 29)]  # repeats: drafts
    params = SamplingParams(temperature=0, max_tokens=36, ignore_eos=True)
    got = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
    want = [list(o.outputs[0].token_ids) for o in classic.generate(prompts, params, use_tqdm=False)]
    assert got == want  # classic == HF generate: test_greedy_matches_classic_and_hf_...
    assert spec.num_draft_tokens > 0 and spec.num_accepted_tokens > 0
    assert_all_free(llm)


def test_no_compile_after_warmup(engines):
    """The group tables ride in fixed-shape metadata: every step above reused a warm-up executable."""
    e = engines[1].engine
    assert e.runner.compile_count == e.compiles_at_warmup
    assert (e.runner.compile_count, e.runner.num_traces) == e.warm


def test_engine_refuses_a_cache_one_request_cannot_fit():
    """The start-up check counts a max_model_len request's blocks over the groups: 24 full + 3 x 7 sliding
    blocks (window + chunk) = 45, not 24 and not 4 x 24."""
    from jaxllm.config import EngineConfig
    from jaxllm.core.hybrid_kv_cache_manager import HybridKVCacheManager
    from jaxllm.core.kv_cache_groups import make_groups
    from jaxllm.engine.engine import LLMEngine
    from tests.fakes.fake_runner import FakeRunner
    from tests.fakes.fake_tokenizer import FakeTokenizer

    cfg = EngineConfig(model="fake", block_size=BS, max_model_len=MAX_LEN, max_num_batched_tokens=BUDGET)
    for num_blocks in (44, 45):
        runner = FakeRunner(num_blocks, BS)
        runner.kv_groups = make_groups([W, W, W, None])
        if num_blocks == 44:
            with pytest.raises(ValueError, match=r"^num_blocks=44 is invalid: a request of max_model_len=96 tokens "
                                                 r"needs 45 blocks over the KV cache groups \(4 groups"):
                LLMEngine(cfg, runner, FakeTokenizer())
        else:
            assert isinstance(LLMEngine(cfg, runner, FakeTokenizer()).kv, HybridKVCacheManager)
