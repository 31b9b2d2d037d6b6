"""The serving engine at tensor_parallel_size 1, 4, 8 on a tiny random Llama (8 heads / 4 kv heads;
tp=8 replicates kv heads), and at 3 on one of SmolLM2's head layout (9 / 3, tied embeddings): identical greedy outputs and prompt logprobs, ~1/tp of the sharded
parameters and of the KV cache per device, each device's shard of the fused wqkv / w_gate_up holding
exactly its own q/k/v and gate/up slices, Megatron collectives only, zero compiles after warm-up,
structured outputs and beam search across tp. tp=2 is covered elsewhere: its forward, fp8 KV cache
and engine prompt logprobs in test_tp_logits.py, its engine greedy in test_tp_int4.py and test_tp_moe.py, its fused placement in
test_layout.py (LoRA slots: test_tp_lora.py; the forward outside the engine: tp_forward.py)."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from checkpoints import load_checkpoint
from jaxllm.llm import LLM
from jaxllm.models.llama import param_shapes
from jaxllm.sampling_params import SamplingParams
from tests.parallel.tiny_engine import compiles, engine_factory
from tests.parallel.tiny_llama import make_tiny_llama
from tests.parallel.tp_forward import PROMPTS

TPS = (1, 4, 8)  # 4: kv heads sharded, 8: kv heads repeated


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return make_tiny_llama(str(tmp_path_factory.mktemp("tp")))


@pytest.fixture(scope="module")
def engines(path):
    """get(tp) -> the engine, built lazily; engines.built[tp][1]: its compiles right after warm-up."""
    return engine_factory(path)


def run(engine, **kw):
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=5, **kw)
    return LLM("tiny", engine=engine).generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)


def test_greedy_outputs_identical_across_tp(engines):
    ref = [o.outputs[0] for o in run(engines(1))]
    for tp in TPS[1:]:
        got = [o.outputs[0] for o in run(engines(tp))]
        for r, g in zip(ref, got):
            assert g.token_ids == r.token_ids, tp
            for lr, lg in zip(r.logprobs, g.logprobs):  # raw top-5 logprobs of every step: {id: Logprob}
                assert set(lg) == set(lr), tp
                np.testing.assert_allclose([lg[t].logprob for t in lr], [lr[t].logprob for t in lr], atol=1e-4, rtol=0)
                assert [lg[t].rank for t in lr] == [lr[t].rank for t in lr], tp


def test_zero_compiles_after_warmup_and_prompt_logprobs(engines):
    ref = run(engines(1), prompt_logprobs=3)
    for tp in TPS[1:]:
        e = engines(tp)
        after_warmup = engines.built[tp][1]
        got = run(e, prompt_logprobs=3)
        assert compiles(e.runner) == after_warmup, tp
        for r, g in zip(ref, got):  # the prompt-logprobs LM-head pass on vocab-parallel weights
            for lr, lg in zip(r.prompt_logprobs[1:], g.prompt_logprobs[1:]):
                assert set(lg) == set(lr), tp
                np.testing.assert_allclose([lg[t].logprob for t in lr], [lr[t].logprob for t in lr], atol=1e-4, rtol=0)
                assert [lg[t].rank for t in lr] == [lr[t].rank for t in lr], tp


def test_each_device_holds_1_over_tp(engines, path):
    cfg = load_checkpoint(path).config
    total = sum(int(np.prod(s)) for s in param_shapes(cfg).values()) * 4  # f32 checkpoint bytes
    for tp in TPS[1:]:
        r = engines(tp).runner
        leaves = jax.tree_util.tree_leaves_with_path(r.state)
        per_device = [0] * tp
        for keypath, arr in leaves:
            assert len(arr.addressable_shards) == tp
            name = ".".join(str(getattr(k, "key", k)) for k in keypath)
            sharded = arr.sharding.spec != jax.sharding.PartitionSpec() and any(arr.sharding.spec)
            for d, s in enumerate(arr.addressable_shards):
                per_device[d] += s.data.nbytes
                if sharded:
                    assert s.data.size * tp == arr.size, (tp, name, s.data.shape)
        # Norms stay replicated; kv replication at tp=8 adds half a kv head per device.
        assert max(per_device) <= 1.1 * total / tp, (tp, per_device, total)
        k = r.kv_cache.k
        L, N, B, K, D = k.shape
        assert K == max(cfg.num_kv_heads, tp)
        for s in k.addressable_shards:
            assert s.data.shape == (L, N, B, K // tp, D), (tp, s.data.shape)
            assert s.data.nbytes * tp == k.nbytes


def test_fused_shards_hold_their_own_heads(engines, path):
    """In the serving engine's state, device d's shard of wqkv is its q heads, then its k heads, then
    its v heads of the unfused checkpoint weights (kv heads repeated at tp=8), and its shard of
    w_gate_up is its gate columns then its up columns: the fused column-parallel matmul needs no
    communication and the split of its output stays local."""
    params = load_checkpoint(path).params  # numpy, unfused: [L, E, H, D], [L, E, K, D], [L, E, F]
    H, K = params["layers.wq"].shape[2], params["layers.wk"].shape[2]
    for tp in TPS[1:]:  # tp=2: test_layout.py's placement test
        rep = max(1, tp // K)
        state = dict(jax.tree_util.tree_leaves_with_path(engines(tp).runner.state))
        by_name = {}
        for keypath, arr in state.items():
            names = {str(getattr(k, "key", getattr(k, "name", k))) for k in keypath}
            for name in names & {"wqkv", "w_gate_up"}:
                by_name.setdefault(name, []).append(arr)
        assert set(by_name) == {"wqkv", "w_gate_up"}, sorted(by_name)
        for d in range(tp):
            def own(x, n, r=1):  # device d's n // tp heads (axis -2) or columns (axis -1 when n is F)
                x = np.repeat(x, r, axis=-2) if r > 1 else x
                m = n * r // tp
                return x[..., d * m:(d + 1) * m, :] if x.ndim == 4 else x[..., d * m:(d + 1) * m]

            want_qkv = np.concatenate([own(params["layers.wq"], H), own(params["layers.wk"], K, rep),
                                       own(params["layers.wv"], K, rep)], axis=-2)
            F = params["layers.w_gate"].shape[-1]
            want_gu = np.concatenate([own(params["layers.w_gate"], F), own(params["layers.w_up"], F)], axis=-1)
            for name, want in (("wqkv", want_qkv), ("w_gate_up", want_gu)):
                arrs = by_name[name]
                shards = [np.asarray(a.addressable_shards[d].data) for a in arrs]
                got = shards[0] if len(arrs) == 1 and shards[0].ndim == want.ndim else np.stack(shards)
                np.testing.assert_array_equal(got, want, err_msg=f"tp={tp} device {d} {name}")


def test_collectives_are_megatron(engines):
    """Per decode step at tp=4: one all-reduce of [T, E] for the embedding, two per layer (o_proj,
    down_proj; written once in the scan loop's body, once per layer when unrolled) and one
    all-gather of the [S, V] logits. No weight is ever gathered."""
    import re

    from jaxllm.runner.inputs import build_inputs

    r = engines(4).runner
    inp = build_inputs([], [], r.num_rows, r.eos_ids, 4, 4, True, r.block_size, r.max_blocks_per_seq,
                       r.max_model_len, vocab_size=r.vocab_size)
    hlo = r._step_lowering(inp).compile().as_text()
    ops = sorted(m.groups() for m in re.finditer(
        r"= (\S+?)\{[^}]*\} (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(", hlo))
    from jaxllm.models.llama import layer_loop_mode

    per_layer = 2 * (1 if layer_loop_mode() == "scan" else r.model_config.num_layers)
    assert ops == [("f32[4,512]", "all-gather")] + [("f32[4,64]", "all-reduce")] * (1 + per_layer), ops


def test_structured_outputs_identical_across_tp_without_compiles(engines):
    """The grammar bitmask is replicated beside the replicated (all-gathered) logits: tp=4 gives tp=1's
    constrained tokens, which match their regex, and compiles nothing."""
    import re

    from jaxllm.structured_outputs import StructuredOutputsParams
    from tests.fakes.grammar_tokenizers import byte_vocab_grammar_tokenizer, decode_bytes

    outs = {}
    for tp in (1, 4):
        e = engines(tp)
        e._grammar_tokenizer = byte_vocab_grammar_tokenizer(e.vocab_size, e.eos_token_ids)
        before = compiles(e.runner)
        params = SamplingParams(temperature=0, max_tokens=20, structured_outputs=StructuredOutputsParams(
            regex=r"[a-f]{2,4}(-[0-9]{1,2}){1,2}"))
        outs[tp] = [o.outputs[0] for o in LLM("tiny", engine=e).generate(
            [{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)]
        assert compiles(e.runner) == before, tp
    for r, g in zip(outs[1], outs[4]):
        assert g.token_ids == r.token_ids and r.finish_reason == "stop"
        assert re.fullmatch(r"[a-f]{2,4}(-[0-9]{1,2}){1,2}", decode_bytes(r.token_ids, engines(1).eos_token_ids))


class _Computed:
    """Stat logger: tokens the engine computed, per step."""

    def __init__(self):
        self.per_step = []

    def record(self, scheduler_stats, it) -> None:
        if it is not None and it.step_time is not None:
            self.per_step.append(it.num_batched_tokens)


def test_beam_search_forks_across_tp_without_compiles(engines):
    """Beam search forks copy blocks of the tp-sharded cache (the copy executable compiled at
    warm-up): the beams equal tp=1's, every beam computes one token a step, nothing compiles."""
    from jaxllm.beam_search import BeamSearchParams

    prompts = [list(range(60, 73)), [9, 8, 7, 6, 5, 4, 3]]  # 13 and 7 tokens: partial blocks to copy
    params = BeamSearchParams(beam_width=2, max_tokens=6, ignore_eos=True)
    ref = LLM("tiny", engine=engines(1)).beam_search(prompts, params)
    for tp in TPS[1:]:
        e = engines(tp)
        after_warmup = engines.built[tp][1]
        computed = _Computed()
        e.add_stat_logger(computed)
        try:
            got = LLM("tiny", engine=e).beam_search(prompts, params)
        finally:
            e.stat_loggers.remove(computed)
        assert compiles(e.runner) == after_warmup, tp
        assert computed.per_step[1:] == [2 * len(prompts)] * 5, (tp, computed.per_step)
        for r, g in zip(ref, got):
            assert [s.tokens for s in g.sequences] == [s.tokens for s in r.sequences], tp
            np.testing.assert_allclose([s.cum_logprob for s in g.sequences], [s.cum_logprob for s in r.sequences],
                                       atol=1e-4, rtol=0)
        assert e.get_stats().num_free_blocks == e.get_stats().num_blocks


def test_smollm2_head_layout_tp3_equals_tp1(tmp_path_factory):
    """SmolLM2-135M's head layout (9 q heads / 3 kv heads, tied embeddings) at tensor_parallel_size=3 on a
    tiny random model of that layout (9 / 3 heads of 16, tied, F = 192, vocab 576: each divisible by 3):
    three q heads and one kv head per device, the vocab-parallel LM head on the tied embedding; greedy
    tokens and top-5 logprobs equal tp=1's, nothing compiled after warm-up. (The real SmolLM2 at tp=3 took
    a child process of its own and ~100 test-seconds; what tp=3 shards is the layout, not the weights.
    The real checkpoint's parity with HF: tests/e2e/test_smollm2.py.)"""
    path = make_tiny_llama(str(tmp_path_factory.mktemp("tp3")), num_attention_heads=9, num_key_value_heads=3,
                           hidden_size=144, intermediate_size=192, vocab_size=576, tie_word_embeddings=True)
    engines = engine_factory(path)
    ref = [o.outputs[0] for o in run(engines(1, warmup=False))]  # the reference compiles only what it runs
    e = engines(3)
    got = [o.outputs[0] for o in run(e)]
    assert e.runner.tensor_parallel_size == 3
    assert compiles(e.runner) == engines.built[3][1], "compiled after warm-up"
    k = e.runner.kv_cache.k
    assert k.shape[3] == 3 and [s.data.shape[3] for s in k.addressable_shards] == [1, 1, 1]  # one kv head each
    names = [str(keypath) for keypath, _ in jax.tree_util.tree_leaves_with_path(e.runner.state)]
    assert any("embed" in n for n in names) and not any("lm_head" in n for n in names)  # tied: no LM head of its own
    for r, g in zip(ref, got):
        assert g.token_ids == r.token_ids
        for lr, lg in zip(r.logprobs, g.logprobs):
            assert set(lg) == set(lr)
            np.testing.assert_allclose([lg[t].logprob for t in lr], [lr[t].logprob for t in lr], atol=1e-4, rtol=0)
    assert len({tuple(r.token_ids) for r in ref}) > 1  # the prompts lead to different greedy runs
