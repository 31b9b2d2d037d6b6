import pytest

from jaxllm.config import EngineConfig
from jaxllm.engine.engine import LLMEngine
from tests.fakes.fake_runner import FakeRunner
from tests.fakes.fake_tokenizer import FakeIncrementalDetokenizer, FakeTokenizer


def make_engine(num_blocks=64, block_size=4, next_token_fn=None, **cfg):
    cfg.setdefault("max_model_len", 128)
    cfg.setdefault("max_num_batched_tokens", 32)
    cfg.setdefault("max_num_seqs", 8)
    config = EngineConfig(model="fake", block_size=block_size, **cfg)
    tok = FakeTokenizer()
    runner = FakeRunner(num_blocks, block_size, vocab_size=tok.vocab_size,
                        eos_token_ids=tok.eos_token_ids, next_token_fn=next_token_fn)
    return LLMEngine(config, runner, tok, detokenizer_factory=FakeIncrementalDetokenizer)


def script_fn(text: str, tok=FakeTokenizer()):
    """A "model" that generates ``text`` one character per token, then repeats it."""
    ids = tok.encode(text, add_special_tokens=False)

    def fn(ctx, seq):
        k = len(ctx) - seq.num_prompt_tokens
        return ids[k % len(ids)]
    return fn


def run_all(engine, max_steps=10_000):
    finals = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                assert out.request_id not in finals
                finals[out.request_id] = out
    assert_clean(engine)
    return finals


def assert_clean(engine):
    assert not engine.has_unfinished_requests()
    s = engine.get_stats()
    assert s["num_free_blocks"] == s["num_blocks"], s
    assert s["num_running"] == 0 and s["num_waiting"] == 0
    assert not engine.scheduler.requests and not engine.kv.req_blocks
    engine.kv.pool.check_invariants()


@pytest.fixture
def engine():
    e = make_engine()
    yield e
    assert_clean(e)
