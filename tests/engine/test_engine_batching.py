import random

from jaxllm.sampling_params import SamplingParams
from tests.engine.conftest import make_engine, run_all


def _requests():
    rng = random.Random(5)
    letters = "abcdefghijklmnopqrstuvwxyz "
    shared = "".join(rng.choice(letters) for _ in range(37))
    reqs = []
    for i in range(24):
        n = rng.choice([1, 2, 5, 13, 30, 60, 90])
        prompt = "".join(rng.choice(letters) for _ in range(n))
        if i % 4 == 0:
            prompt = shared + prompt
        p = SamplingParams(max_tokens=rng.randint(1, 24), ignore_eos=i % 5 != 0,
                           temperature=0.0 if i % 2 else 0.8, seed=i if i % 3 else None,
                           n=2 if i % 7 == 3 else 1, stop=["q"] if i % 6 == 1 else None)
        reqs.append((f"r{i}", prompt, p))
    return reqs


def test_24_mixed_requests_identical_to_alone_under_preemption():
    reqs = _requests()
    e = make_engine(num_blocks=40, block_size=4, max_model_len=150, max_num_batched_tokens=20,
                    max_num_seqs=6, seed=0)
    for rid, prompt, p in reqs:
        e.add_request(rid, prompt, p)
    together = run_all(e)
    stats = e.get_stats()
    assert stats["num_preemptions"] > 0
    # unseeded requests draw their seed from the engine RNG in add order: replay the same draws
    draws = make_engine(seed=0)
    for rid, prompt, p in reqs:
        alone = make_engine(num_blocks=64, max_model_len=150, max_num_batched_tokens=512,
                            enable_prefix_caching=False)
        seed = p.seed if p.seed is not None else draws._rng.getrandbits(63)
        alone.add_request(rid, prompt, p.clone(seed=seed))
        out = run_all(alone)[rid]
        got = together[rid]
        assert [c.token_ids for c in got.outputs] == [c.token_ids for c in out.outputs], rid
        assert [c.text for c in got.outputs] == [c.text for c in out.outputs], rid
        assert [c.finish_reason for c in got.outputs] == [c.finish_reason for c in out.outputs]
