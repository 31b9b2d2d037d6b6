"""The tiny Llama's forward at any tensor-parallel size, outside the engine: two prompts prefilled
together in one ragged step, then one decode step; shared by test_tp_logits.py and test_tp_lora.py.
`prefill_logits`: one jitted ragged prefill of a loaded checkpoint, for the quantized-checkpoint
modules (jitted: the eager forward at tp > 1 dispatches op by op, ~15x slower on the 8 CPU devices).
Both share one jitted forward per model structure, sharding and $JAXLLM_* environment
(tests/engine_checks.py model_forward): a test here must not change another trace-time switch."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from checkpoints import load_checkpoint
from jaxllm.models.dense_batch import prefill_batch
from jaxllm.models.llama import build_model
from jaxllm.parallel import TPLayout, make_mesh
from pallas_kernels import AttentionMetadata, KVCache
from tests.engine_checks import model_forward

BLOCK = 16
PROMPTS = [list(range(3, 20)), [5, 9, 200, 7], list(range(100, 140)), [42]]


def two_prompt_steps(a, b, T=64):
    """The ragged batches both forwards run: prompts ``a`` (blocks 0-3) and ``b`` (blocks 4-7)
    prefilled together, packed into ``T`` tokens, then one decode step of tokens 7 and 11 after them.
    -> (prefill (tokens [T], positions [T], meta), decode (tokens [2], positions [2], meta))"""
    tokens = np.zeros(T, np.int32)  # [T]
    tokens[:len(a)], tokens[len(a):len(a) + len(b)] = a, b
    positions = np.zeros(T, np.int32)  # [T]
    positions[:len(a)], positions[len(a):len(a) + len(b)] = np.arange(len(a)), np.arange(len(b))
    tables = np.array([[0, 1, 2, 3], [4, 5, 6, 7]], np.int32)  # [2, 4]
    slots = np.full(T, -1, np.int32)  # [T] cache slot of each token, -1 = padding
    slots[:len(a)] = np.arange(len(a))
    slots[len(a):len(a) + len(b)] = 4 * BLOCK + np.arange(len(b))
    meta = AttentionMetadata(slots, tables, np.array([len(a), len(b)], np.int32),
                             np.array([0, len(a), len(a) + len(b)], np.int32))
    dec_meta = AttentionMetadata(np.array([len(a), 4 * BLOCK + len(b)], np.int32), tables,
                                 np.array([len(a) + 1, len(b) + 1], np.int32), np.array([0, 1, 2], np.int32),
                                 decode_only=True)
    return (tokens, positions, meta), (np.array([7, 11], np.int32), np.array([len(a), len(b)], np.int32), dec_meta)


def hybrid_meta(meta: AttentionMetadata, windows, num_blocks: int = 16) -> AttentionMetadata:
    """`meta` for a hybrid KV cache of groups with these windows: group g's blocks are meta's + g *
    num_blocks; in a decode step a sliding group's table entries wholly before its window are null
    (block 0: another group's data, which the kernels must mask)."""
    G = len(windows)
    slots = np.asarray(meta.slot_mapping)
    group_slots = np.stack([np.where(slots >= 0, slots + g * num_blocks * BLOCK, -1) for g in range(G)])  # [G, T]
    tables = []
    for g, w in enumerate(windows):
        t = np.asarray(meta.block_tables) + g * num_blocks  # [S, max_blocks]
        if w is not None and meta.decode_only:
            first = np.maximum(np.asarray(meta.context_lens) - w, 0) // BLOCK  # [S] first block in the window
            t = np.where(np.arange(t.shape[1])[None, :] < first[:, None], 0, t)
        tables.append(t)
    return dataclasses.replace(meta, group_slot_mapping=group_slots.astype(np.int32),
                               group_block_tables=np.stack(tables).astype(np.int32))


def forward_logits(path, tp, layer_loop=None, hlo=False, kv_dtype=jnp.float32, expert_parallel=False,
                   hybrid=False):
    """Logits of every token of two prompts (one prefill step) and then of one decode step (and
    the decode step's optimized HLO with `hlo`); `expert_parallel`: MoE experts whole per device.
    `hybrid`: through the model's KV cache groups (pages [P, 16 x G blocks], `hybrid_meta`)."""
    ckpt = load_checkpoint(path)
    c = ckpt.config
    layout = TPLayout.plan(c, tp, make_mesh(tp), expert_parallel=expert_parallel) if tp > 1 else None
    model = build_model(c, ckpt.params, jnp.float32, layout=layout, layer_loop=layer_loop)
    mc = model.config
    groups = model.kv_cache_groups() if hybrid else None
    cache = KVCache.zeros(groups.slots if hybrid else mc.num_layers, 16 * (groups.num_groups if hybrid else 1), BLOCK,
                          mc.num_kv_heads, mc.head_dim, kv_dtype, num_scale_layers=mc.num_layers,
                          sharding=layout.cache_sharding() if layout else None,
                          scale_sharding=layout.cache_scale_sharding() if layout else None)
    fwd, state = model_forward(model, share=True)  # fwd(state, tokens, positions, cache, meta)
    a, b = PROMPTS[0], PROMPTS[2]  # 17 and 40 tokens; blocks 0-1 and 4-6
    (tokens, positions, meta), (dec_tokens, dec_positions, dec_meta) = two_prompt_steps(a, b)
    if hybrid:
        windows = [g.window for g in groups.groups]
        meta, dec_meta = hybrid_meta(meta, windows), hybrid_meta(dec_meta, windows)
    prefill, cache = fwd(state, tokens, positions, cache, meta)
    prefill = np.asarray(prefill)[:len(a) + len(b)]
    dec_args = (state, dec_tokens, dec_positions, cache, dec_meta)
    decode, _ = fwd(*dec_args)
    if hlo:
        return prefill, np.asarray(decode), fwd.lower(*dec_args).compile().as_text()
    return prefill, np.asarray(decode)


def prefill_logits(ckpt, tp, layer_loop, seqs, expert_parallel=False, **build_kw):
    """A loaded checkpoint at tensor-parallel size ``tp`` (``expert_parallel``: MoE experts whole per
    device): every token's logits of ``seqs`` prefilled together in one ragged step (block size 8).
    -> (model, layout or None, logits [sum(len), V])"""
    c = ckpt.config
    layout = TPLayout.plan(c, tp, make_mesh(tp), expert_parallel=expert_parallel) if tp > 1 else None
    model = build_model(c, ckpt.params, jnp.float32, layout=layout, layer_loop=layer_loop, **build_kw)
    mc = model.config
    tokens, positions, meta, nblocks = prefill_batch(seqs, 8)
    cache = KVCache.zeros(mc.num_layers, nblocks + 1, 8, mc.num_kv_heads, mc.head_dim, jnp.float32,
                          sharding=layout.cache_sharding() if layout else None,
                          scale_sharding=layout.cache_scale_sharding() if layout else None)
    fwd, state = model_forward(model, share=True)
    logits, _ = fwd(state, tokens, positions, cache, meta)
    return model, layout, np.asarray(logits)
