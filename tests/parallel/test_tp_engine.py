"""The engine at tensor_parallel_size 1, 2, 4, 8 on a tiny random Llama (8 heads / 4 kv heads;
tp=8 replicates kv heads): identical greedy outputs, logits within 1e-4 of tp=1 (both layer loops),
~1/tp of the sharded parameters and of the KV cache per device, each device's shard of the fused
wqkv / w_gate_up holding exactly its own q/k/v and gate/up slices, Megatron collectives only, zero
compiles after warm-up (LoRA slots: test_tp_lora.py; the forward outside the engine: tp_forward.py)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints import load_checkpoint
from jaxllm.config import EngineConfig
from jaxllm.engine.factory import build_engine
from jaxllm.llm import LLM
from jaxllm.models.llama import param_shapes
from jaxllm.sampling_params import SamplingParams
from pallas_kernels import KVCache
from tests.parallel.tiny_llama import make_tiny_llama
from tests.parallel.tp_forward import BLOCK, PROMPTS, forward_logits

TPS = (1, 2, 4, 8)
MAX_LEN = 128


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return make_tiny_llama(str(tmp_path_factory.mktemp("tp")))


@pytest.fixture(scope="module")
def engines(path):
    """{tp: (engine, (num_traces, jit cache size) right after warm-up)}, built lazily."""
    built = {}

    def get(tp, kv_cache_dtype="auto", warmup=True):
        key = tp if kv_cache_dtype == "auto" else (tp, kv_cache_dtype)
        if key not in built:
            e = build_engine(EngineConfig(model=path, tensor_parallel_size=tp, max_model_len=MAX_LEN,
                                          block_size=BLOCK, max_num_seqs=4, max_num_batched_tokens=64,
                                          kv_cache_memory_bytes=64 * 2 * 2 * BLOCK * 4 * 8 * 4,
                                          kv_cache_dtype=kv_cache_dtype),
                             compile_cache=False, warmup=warmup)
            built[key] = (e, compiles(e.runner))
        return built[key][0]

    get.built = built
    return get


def compiles(runner):
    return runner.num_traces, runner.compile_count


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


def test_fp8_kv_cache_tp2_equals_tp1(engines, path):
    """kv_cache_dtype="fp8" (pallas_kernels/kv_quant.py) at tp=2: prefill and decode logits equal
    tp=1's over an fp8 cache (the scales are per kv head, so no device needs another's); the served
    runner holds each device's heads' pages and scales, the scales calibrated at start equal to
    tp=1's (jaxllm/runner/kv_calibration.py), and 8x the blocks of the tp=1 f32 cache in the same
    kv_cache_memory_bytes per device (x2 heads, x4 bytes)."""
    ref_prefill, ref_decode = forward_logits(path, 1, "scan", kv_dtype=jnp.float8_e4m3fn)
    prefill, decode = forward_logits(path, 2, "unroll", kv_dtype=jnp.float8_e4m3fn)
    np.testing.assert_allclose(prefill, ref_prefill, atol=1e-4, rtol=0)
    np.testing.assert_allclose(decode, ref_decode, atol=1e-4, rtol=0)
    e = engines(2, "fp8", warmup=False)  # compiles only the buckets it runs
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    out = LLM("tiny", engine=e).generate([{"prompt_token_ids": PROMPTS[0]}], params, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
    kc = e.runner.kv_cache
    assert kc.quantized and kc.k.dtype == jnp.uint8
    L, _, _, K, D = kc.k.shape
    f32_tp1 = KVCache.bytes_per_block(L, BLOCK, K, D, jnp.float32)
    assert kc.num_blocks == 8 * (e.config.kv_cache_memory_bytes // f32_tp1)
    for name in ("k", "v"):
        pages, scale = getattr(kc, name), getattr(kc, f"{name}_scale")
        L, N, B, K, D = pages.shape
        assert [s.data.shape for s in pages.addressable_shards] == [(L, N, B, K // 2, D)] * 2
        assert [s.data.shape for s in scale.addressable_shards] == [(L, K // 2)] * 2
        assert (np.asarray(scale) > 0).all()
        tp1 = np.asarray(getattr(engines(1, "fp8", warmup=False).runner.kv_cache, f"{name}_scale"))  # [L, 4]
        np.testing.assert_allclose(np.asarray(scale), tp1, rtol=1e-5)
        # tp=8 repeats each kv head on two devices: each copy calibrates to its head's tp=1 scale
        tp8 = np.asarray(getattr(engines(8, "fp8", warmup=False).runner.kv_cache, f"{name}_scale"))  # [L, 8]
        np.testing.assert_allclose(tp8, np.repeat(tp1, 2, axis=1), rtol=1e-5)


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
    for tp in (2, 4, 8):
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


def test_logits_match_tp1(path):
    ref_prefill, ref_decode = forward_logits(path, 1, "scan")
    assert np.ptp(ref_prefill) > 1.0  # real random weights, not near-constant logits
    # each tp once, both loops covered (scan vs unroll at tp=1 is the HF parity tests' job)
    for tp, loop in ((2, "unroll"), (4, "scan"), (8, "unroll")):
        prefill, decode = forward_logits(path, tp, loop)
        np.testing.assert_allclose(prefill, ref_prefill, atol=1e-4, rtol=0, err_msg=f"tp={tp} {loop}")
        np.testing.assert_allclose(decode, ref_decode, atol=1e-4, rtol=0, err_msg=f"tp={tp} {loop}")


COLLECTIVE = r"= (\S+?)\{[^}]*\} (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\("


@pytest.mark.parametrize("layer_loop", ["scan", "unroll"])
def test_fused_split_adds_no_collective(path, layer_loop):
    """The decode forward at tp=4 in either layer loop: splitting the fused qkv / gate_up outputs
    communicates nothing: one all-reduce for the embedding, two per layer body, one all-gather of
    the [S, V] logits; no weight or activation gathered, permuted or scattered."""
    import re

    _, _, hlo = forward_logits(path, 4, layer_loop, hlo=True)
    ops = sorted(m.groups() for m in re.finditer(COLLECTIVE, hlo))
    bodies = 1 if layer_loop == "scan" else 2  # the tiny model has 2 layers
    assert ops == [("f32[2,512]", "all-gather")] + [("f32[2,64]", "all-reduce")] * (1 + 2 * bodies), ops


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


@pytest.mark.parametrize("arch,tps", [("qwen2", (2, 4)), ("qwen3", (3, 6))])
def test_bias_and_qk_norm_archs_match_tp1(arch, tps, tmp_path_factory):
    """Qwen2 (q/k/v bias fused into bqkv, MQA: kv head repeated 2 and 4 times) and Qwen3 (q/k norm
    after the split; kv heads sharded at tp=3, repeated at tp=6): sharded logits match tp=1 in both
    layer loops."""
    from tests.models.hf_tiny import make_tiny_hf

    path = make_tiny_hf(arch, str(tmp_path_factory.mktemp("hf")))
    ref_prefill, ref_decode = forward_logits(path, 1, "scan")
    for tp, loop in ((tps[0], "scan"), (tps[1], "unroll")):
        prefill, decode = forward_logits(path, tp, loop)
        np.testing.assert_allclose(prefill, ref_prefill, atol=1e-4, rtol=0, err_msg=f"{arch} tp={tp} {loop}")
        np.testing.assert_allclose(decode, ref_decode, atol=1e-4, rtol=0, err_msg=f"{arch} tp={tp} {loop}")


def test_structured_outputs_identical_across_tp_without_compiles(engines):
    """The grammar bitmask is replicated beside the replicated (all-gathered) logits: tp=2 gives tp=1's
    constrained tokens, which match their regex, and compiles nothing."""
    import re

    from jaxllm.structured_outputs import StructuredOutputsParams
    from tests.fakes.grammar_tokenizers import byte_vocab_grammar_tokenizer, decode_bytes

    outs = {}
    for tp in (1, 2):
        e = engines(tp)
        e._grammar_tokenizer = byte_vocab_grammar_tokenizer(e.vocab_size, e.eos_token_ids)
        before = compiles(e.runner)
        params = SamplingParams(temperature=0, max_tokens=20, structured_outputs=StructuredOutputsParams(
            regex=r"[a-f]{2,4}(-[0-9]{1,2}){1,2}"))
        outs[tp] = [o.outputs[0] for o in LLM("tiny", engine=e).generate(
            [{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)]
        assert compiles(e.runner) == before, tp
    for r, g in zip(outs[1], outs[2]):
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
    for tp in (2, 4):
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
