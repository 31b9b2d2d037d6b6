"""Sampling rows of a step with speculative drafts (runner/inputs.py, runner/buckets.py): a seq with
d drafts gets d + 1 consecutive rows sampling from its last d + 1 tokens, each with the position,
min_tokens mask and grammar row it would have without drafts; mixed buckets are sized for them."""
import numpy as np
import pytest

from jaxllm.core.scheduler_output import ScheduledSeq
from jaxllm.runner.buckets import Buckets
from jaxllm.runner.inputs import build_inputs, sample_rows
from jaxllm.sampling_params import SamplingParams


def seq(rid, tokens, start, drafts=0, num_prompt=3, **params):
    return ScheduledSeq(request_id=rid, token_ids=tokens, start_pos=start, block_ids=[0, 1, 2, 3], sample=True,
                        num_prompt_tokens=num_prompt, params=SamplingParams(max_tokens=50, **params), seed=7,
                        num_draft_tokens=drafts)


def test_rows_positions_masks_and_grammar_rows():
    a = seq("a", [9, 4, 5, 6], start=5, drafts=3, min_tokens=5, stop_token_ids=[77])  # positions 5..8
    b = seq("b", [8], start=4)  # a plain decode, constrained by a grammar
    c = seq("c", [1, 2, 3], start=0)  # a prefill
    assert sample_rows([a, b, c]) == [0, 4, 5, 6]
    vocab = 96
    bitmask = np.arange(1, 10, dtype=np.int32).reshape(3, 3)  # [3 seqs, ceil(96 / 32)] i32, distinct rows
    inp = build_inputs([a, b, c], [0, 1, 2], 9, [2], 16, 8, False, 16, 4, 8, vocab_size=vocab,
                       grammar_bitmask=bitmask, constrained=[False, True, False])
    np.testing.assert_array_equal(inp.logits_indices[:6], [0, 1, 2, 3, 4, 7])
    np.testing.assert_array_equal(inp.sampling.positions[:6], [6, 7, 8, 9, 5, 3])
    np.testing.assert_array_equal(inp.seq_rows[:6], [0, 0, 0, 0, 1, 2])
    # a's rows sample positions 6..9 = generated tokens 3..6 before them: masked while < min_tokens=5
    masked = [set(r[r >= 0].tolist()) for r in inp.sampling.mask_ids[:4]]
    assert masked == [{77, 2}, {77, 2}, set(), set()]
    assert inp.sampling.constrained[:6].tolist() == [False, False, False, False, True, False]
    np.testing.assert_array_equal(inp.sampling.bitmask[4], bitmask[1])
    np.testing.assert_array_equal(inp.metadata.cu_q_lens[:4], [0, 4, 5, 8])  # attention still per seq


def test_mixed_buckets_hold_the_draft_rows():
    b = Buckets.make(8, 256, num_speculative_tokens=4)
    assert b.mixed_s == 40 and b.pick(45, 40, False) == (64, 40, False)
    assert Buckets.make(8, 32, num_speculative_tokens=4).mixed_s == 32  # never more rows than tokens
    assert Buckets.make(8, 256).mixed_s == 8
    with pytest.raises(ValueError, match="sampling rows=9 is invalid: must be <= the mixed buckets' S=8"):
        Buckets.make(8, 256).pick(20, 9, False)


class _Seq:
    def __init__(self, n: int, d: int = 0):
        self.token_ids, self.num_draft_tokens = [1] * n, d


def test_draft_steps_run_draft_buckets_sized_for_them():
    b = Buckets.make(8, 256, num_speculative_tokens=4)
    assert b.draft == (8, 16, 32, 40)  # powers of 2 from the smallest decode size to 8 x (1 + 4) rows
    # every seq decodes (1 token + its drafts): T == S == the tokens, rounded up to a draft size
    seqs = [_Seq(1 + d, d) for d in (4, 0, 2, 4, 4, 1, 0, 3)]  # 26 tokens, 26 sampling rows
    assert Buckets.kind(seqs) == "draft" and b.pick_step(seqs) == (32, 32, False) and b.label(seqs) == "draft_32"
    assert b.pick_step([_Seq(5, 4)]) == (8, 8, False)
    assert b.pick_step([_Seq(5, 4)] * 8) == (40, 40, False)
    # a prefill chunk among them: the mixed bucket; no drafts at all: decode
    assert Buckets.kind(seqs + [_Seq(7)]) == "mixed" and b.pick_step(seqs + [_Seq(7)]) == (64, 40, False)
    assert b.label(seqs + [_Seq(7)]) == "mixed_64"
    assert b.pick_step([_Seq(1)] * 3) == (8, 8, True) and b.label([_Seq(1)] * 3) == "decode_8"
    # each bucket once; the step's rows never exceed the token budget
    assert b.all() == [(8, 8, True), (8, 8, False), (16, 16, False), (32, 32, False), (40, 40, False),
                       (64, 40, False), (256, 40, False)]
    small = Buckets.make(8, 32, num_speculative_tokens=4)
    assert small.draft == (8, 16, 32) and small.all().count((32, 32, False)) == 1
    assert Buckets.make(16, 512, num_speculative_tokens=3).draft == (8, 16, 32, 64)  # 8 x 4 and 16 x 4 included
    assert Buckets.make(8, 256).draft == ()  # no speculation: no draft buckets
