"""The brute-force reference of tests/runner/test_model_runner.py, independent of the engine: greedy
decoding that recomputes every full sequence with the model each step (fresh private cache, no
reuse), with numpy penalties; and the shapes both use."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from checkpoints import load_checkpoint
from jaxllm.models.llama import build_model
from pallas_kernels import AttentionMetadata, KVCache

BLOCK = 16
MAX_LEN = 256
VOCAB = 256


class Reference:
    """Greedy decoding by full recomputation: every step runs each whole sequence through the
    model on a fresh zero cache with private blocks (one jit: tokens padded to a fixed size)."""

    T = 2048
    S = 8

    def __init__(self, path):
        ckpt = load_checkpoint(path)
        c = ckpt.config
        graphdef, state = nnx.split(build_model(c, ckpt.params, jnp.float32))
        nb = self.S * (MAX_LEN // BLOCK)

        def fwd(state, tokens, positions, meta, last):
            m = nnx.merge(graphdef, state)
            cache = KVCache.zeros(c.num_layers, nb, BLOCK, c.num_kv_heads, c.head_dim, jnp.float32)
            hidden, _ = m(tokens, positions, cache, meta)
            return m.compute_logits(hidden[last])  # [S, V]

        self._fwd = jax.jit(fwd)
        self.state = state

    def logits(self, seqs: list[list[int]]) -> np.ndarray:
        """Last-position logits of each full sequence: [len(seqs), V] f64."""
        S, T, mb = self.S, self.T, MAX_LEN // BLOCK
        assert len(seqs) <= S and sum(map(len, seqs)) <= T
        tokens = np.zeros(T, np.int32)
        positions = np.zeros(T, np.int32)
        slots = np.full(T, -1, np.int32)
        tables = np.zeros((S, mb), np.int32)
        lens = np.zeros(S, np.int32)
        cu = np.zeros(S + 1, np.int32)
        last = np.zeros(S, np.int32)
        t = 0
        for i, s in enumerate(seqs):
            n = len(s)
            tables[i] = i * mb + np.arange(mb)
            pos = np.arange(n)
            tokens[t:t + n], positions[t:t + n] = s, pos
            slots[t:t + n] = tables[i, pos // BLOCK] * BLOCK + pos % BLOCK
            lens[i] = n
            t += n
            cu[i + 1] = t
            last[i] = t - 1
        cu[len(seqs) + 1:] = t
        meta = AttentionMetadata(slot_mapping=slots, block_tables=tables, context_lens=lens, cu_q_lens=cu)
        out = self._fwd(self.state, tokens, positions, meta, last)
        return np.asarray(out, np.float64)[:len(seqs)]

    def greedy(self, prompts, max_tokens, rep=1.0, freq=0.0, pres=0.0, allowed=None, bias=None):
        """→ (token ids per prompt, raw log_softmax rows per step per prompt). allowed / bias: one
        allowed_token_ids list / logit_bias dict for every prompt (applied before penalties)."""
        seqs = [list(p) for p in prompts]
        outs = [[] for _ in prompts]
        lsm = [[] for _ in prompts]
        for _ in range(max_tokens):
            for lo in range(0, len(seqs), self.S):
                chunk = range(lo, min(lo + self.S, len(seqs)))
                logits = self.logits([seqs[i] for i in chunk])
                for j, i in enumerate(chunk):
                    x = logits[j]
                    lsm[i].append(x - x.max() - np.log(np.exp(x - x.max()).sum()))
                    if allowed is not None:
                        keep = np.zeros(VOCAB, bool)
                        keep[allowed] = True
                        x = np.where(keep, x, -np.inf)
                    for t, b in (bias or {}).items():
                        x[t] += b
                    counts = np.bincount(outs[i], minlength=VOCAB)
                    seen = np.zeros(VOCAB, bool)
                    seen[prompts[i]] = True
                    seen |= counts > 0
                    x = np.where(seen, np.where(x > 0, x / rep, x * rep), x) - freq * counts - pres * (counts > 0)
                    tok = int(np.argmax(x))
                    outs[i].append(tok)
                    seqs[i].append(tok)
        return outs, lsm


def random_prompts(seed, n, lo, hi):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, VOCAB, int(rng.integers(lo, hi + 1))).tolist() for _ in range(n)]


def assert_rank(rank, row, tok, tol=1e-4):
    """vLLM's rank (1 + how many tokens are strictly more likely) against the reference's log-softmax
    row, up to near-ties within tol, which float rounding may order either way."""
    lo, hi = 1 + (row > row[tok] + tol).sum(), 1 + (row > row[tok] - tol).sum()
    assert lo <= rank <= hi, (rank, lo, hi)
