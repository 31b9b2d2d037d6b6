"""KV cache group tables in one step's inputs (runner/inputs.py): each seq's tables are written once, group 0's
being the metadata's slot_mapping / block_tables; a null entry (-1: a block a sliding group freed) becomes block 0
in the tables and never in a slot; a token over a null entry is refused. Expected values are written out by hand."""
import numpy as np
import pytest

from jaxllm.core.scheduler_output import ScheduledSeq
from jaxllm.runner.inputs import build_inputs
from jaxllm.sampling_params import SamplingParams

BS = 4


def seq(rid, tokens, start, block_ids, group_block_ids=None):
    return ScheduledSeq(request_id=rid, token_ids=tokens, start_pos=start, block_ids=block_ids, sample=True,
                        num_prompt_tokens=2, params=SamplingParams(max_tokens=50), seed=7,
                        group_block_ids=group_block_ids)


def build(seqs, num_groups):
    return build_inputs(seqs, list(range(len(seqs))), 5, [2], 8, 4, False, BS, 6, 8, vocab_size=64,
                        num_groups=num_groups)


def test_one_sliding_group_maps_null_entries_to_block_0():
    """An all-sliding model: one table with null entries before the window (the hybrid manager's one group)."""
    a = seq("a", [5, 6, 7], 13, [-1, -1, 9, 4], [[-1, -1, 9, 4]])  # positions 13..15: block 4 (index 3)
    b = seq("b", [8], 6, [3, 11])  # the classic manager's table: no group_block_ids
    m = build([a, b], 1).metadata
    assert m.group_slot_mapping is None and m.group_block_tables is None
    np.testing.assert_array_equal(m.slot_mapping, [17, 18, 19, 46, -1, -1, -1, -1])  # 4*4+1.., 11*4+2
    np.testing.assert_array_equal(m.block_tables[:2], [[0, 0, 9, 4, 0, 0], [3, 11, 0, 0, 0, 0]])


def test_groups_each_get_their_table_and_slots():
    a = seq("a", [5, 6], 6, [2, 8], [[2, 8], [-1, 5]])  # positions 6, 7: index 1 in both groups
    m = build([a], 2).metadata
    np.testing.assert_array_equal(m.group_slot_mapping[:, :3], [[34, 35, -1], [22, 23, -1]])
    np.testing.assert_array_equal(m.group_block_tables[:, 0, :3], [[2, 8, 0], [0, 5, 0]])
    np.testing.assert_array_equal(m.slot_mapping, m.group_slot_mapping[0])
    np.testing.assert_array_equal(m.block_tables, m.group_block_tables[0])


@pytest.mark.parametrize("num_groups", [1, 2])
def test_a_token_over_a_null_block_is_refused(num_groups):
    tables = [[-1, 5]] if num_groups == 1 else [[1, 5], [-1, 5]]
    with pytest.raises(RuntimeError, match=r"^request_id='a': a KV cache group has a null block under a token "
                                           r"it writes \(positions 3\.\.4\)"):
        build([seq("a", [5, 6], 3, tables[0], tables)], num_groups)


@pytest.mark.parametrize("lora", [False, True])
def test_decode_fast_path_equals_the_general_one(lora):
    """A one-token seq with one table takes build_inputs' scalar path; the same seq handed its table as a
    one-group group_block_ids takes the general (numpy) path: every input array must be equal, over random
    decode batches with placeholders, prompt and output positions, null (sliding) entries and padding."""
    import jax

    rng = np.random.default_rng(0)
    for trial in range(40):
        n = int(rng.integers(1, 9))
        fast, general = [], []
        for i in range(n):
            start = int(rng.integers(0, 23))
            blocks = [int(b) for b in rng.permutation(40)[:start // BS + 1]]
            if trial % 3 == 0:  # a sliding window freed leading blocks (never the one written)
                freed = min(start // BS, 2)
                blocks[:freed] = [-1] * freed
            kw = dict(request_id=f"r{i}", token_ids=[int(rng.integers(3, 60))], start_pos=start, sample=True,
                      num_prompt_tokens=int(rng.integers(1, 20)), params=SamplingParams(max_tokens=50), seed=i,
                      placeholder=bool(rng.integers(0, 2)), lora_slot=int(rng.integers(0, 3)))
            fast.append(ScheduledSeq(block_ids=blocks, **kw))
            general.append(ScheduledSeq(block_ids=blocks, group_block_ids=[blocks], **kw))
        rows = [int(r) for r in rng.permutation(8)[:n]]
        a, b = (build_inputs(s, rows, 9, [2], 8, 8, True, BS, 6, 8, vocab_size=64, lora=lora) for s in (fast, general))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(x, y, err_msg=f"trial {trial}")
        if trial % 3 == 0:
            assert (a.metadata.block_tables >= 0).all()  # null entries became block 0
