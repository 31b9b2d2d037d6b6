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
