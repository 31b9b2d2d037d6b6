"""Checks shared by the KV-cache-group engine tests (test_hybrid_kv_engine: Gemma 3's groups;
test_sliding_kv_engine: an all-sliding Mistral's one sliding group): each engine under test against the
classic one-full-group engine over the same weights, and HF generate."""
import numpy as np

from jaxllm import LLM, BeamSearchParams, SamplingParams
from tests.models.hf_tiny import make_tiny_hf
from tests.models.test_gemma_hf import hf_greedy


def build_grouped_and_classic(preset: str, tmp_dir: str, name: str, grouped_blocks: int, classic_blocks: int, *,
                              block_size: int, max_model_len: int, budget: int, warmup_grouped: bool):
    """A tiny HF checkpoint of ``preset`` and two engines over it (f32, 4 seqs): the KV-cache-group one
    (async scheduling, ``grouped_blocks`` blocks' bytes of the classic layout) and the classic one
    (--disable-hybrid-kv-cache-manager, synchronous, ``classic_blocks``) -> (path, grouped LLM, classic LLM)."""
    import jax.numpy as jnp

    from checkpoints import load_checkpoint
    from jaxllm.config import EngineConfig
    from jaxllm.engine.factory import build_engine
    from pallas_kernels import KVCache

    path = make_tiny_hf(preset, tmp_dir)
    c = load_checkpoint(path).config
    per_block = KVCache.bytes_per_block(c.num_layers, block_size, c.num_kv_heads, c.head_dim, jnp.float32)
    kw = dict(model=path, max_model_len=max_model_len, block_size=block_size, max_num_seqs=4,
              max_num_batched_tokens=budget, dtype="float32")
    grouped = build_engine(EngineConfig(**kw, async_scheduling=True, kv_cache_memory_bytes=grouped_blocks * per_block),
                           compile_cache=False, warmup=warmup_grouped)
    classic = build_engine(EngineConfig(**kw, async_scheduling=False, disable_hybrid_kv_cache_manager=True,
                                        kv_cache_memory_bytes=classic_blocks * per_block),
                           compile_cache=False, warmup=False)
    return path, LLM(name, engine=grouped), LLM("classic", engine=classic)


def assert_all_free(llm):
    e = llm.engine
    assert not e.has_unfinished_requests() and not e.kv.req_blocks and not e.kv.fork_pins
    assert e.kv.num_free_blocks == e.kv.num_blocks
    e.kv.pool.check_invariants()


def greedy_matches_classic_and_hf(path, grouped, classic):
    """4 prompts (one sharing 20 tokens with another), 30 greedy tokens: classic == HF, then the grouped
    engine == HF twice (the second round from the prefix cache; both rounds must hit it). Returns the
    grouped engine's preemption count."""
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 250, n).tolist() for n in (5, 23, 41, 30)]
    prompts[3][:20] = prompts[2][:20]  # a shared prefix: a hit in the same round
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    want = hf_greedy(path, prompts, 30)
    reqs = [{"prompt_token_ids": p} for p in prompts]
    assert [list(o.outputs[0].token_ids) for o in classic.generate(reqs, params, use_tqdm=False)] == want
    assert_all_free(classic)
    e = grouped.engine
    for round_ in range(2):
        hits = e.kv.prefix_hits
        outs = grouped.generate(reqs, params, use_tqdm=False)
        assert [list(o.outputs[0].token_ids) for o in outs] == want, round_
        assert_all_free(grouped)
        assert e.kv.prefix_hits > hits, round_
    return e.scheduler.num_preemptions


def sampling_n_and_beam_match_classic(grouped, classic, monkeypatch) -> list:
    """n=3 seeded sampling and a width-3 beam search: grouped == classic; returns the block copies the
    grouped runner made (forks copy their partial block)."""
    runner = grouped.engine.runner
    copies = []
    real_copy = runner._copy_blocks
    monkeypatch.setattr(runner, "_copy_blocks", lambda pairs: (copies.append(list(pairs)), real_copy(pairs)))
    prompts = [{"prompt_token_ids": list(range(3, 30))}, {"prompt_token_ids": [7, 9, 11] * 5}]
    params = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=20, ignore_eos=True)
    got = [[list(c.token_ids) for c in o.outputs] for o in grouped.generate(prompts, params, use_tqdm=False)]
    want = [[list(c.token_ids) for c in o.outputs] for o in classic.generate(prompts, params, use_tqdm=False)]
    assert got == want and len({tuple(t) for t in got[0]}) > 1
    beam = BeamSearchParams(beam_width=3, max_tokens=14, ignore_eos=True)
    got = grouped.beam_search([[5, 17, 33, 2, 99, 140, 7, 8, 9, 10, 11]], beam)
    want = classic.beam_search([[5, 17, 33, 2, 99, 140, 7, 8, 9, 10, 11]], beam)
    assert [s.tokens for s in got[0].sequences] == [s.tokens for s in want[0].sequences]
    assert np.allclose([s.cum_logprob for s in got[0].sequences], [s.cum_logprob for s in want[0].sequences],
                       atol=1e-4)
    assert_all_free(grouped)
    assert_all_free(classic)
    return copies
