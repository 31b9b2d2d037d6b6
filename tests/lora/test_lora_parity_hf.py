"""Multi-LoRA parity with transformers + peft (fp32) on tiny random Llama and Qwen2 models: one
batch mixes tokens of three random non-zero adapters (all seven target modules among them, one
rslora adapter of rank below max_lora_rank, one "all-linear") and of the base model; every
sequence's logits match peft's run of that sequence alone within 1e-4, in both layer loops. Through
the ModelRunner: greedy tokens of a mixed batch equal peft's, adapters load and unload in place,
and none of it compiles after warm-up."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints import load_checkpoint
from jaxllm.lora.config import LoRAConfig
from jaxllm.lora.delta import LoRABatch
from jaxllm.lora.peft import load_adapter
from jaxllm.lora.slots import LoRASlots
from jaxllm.models.dense_batch import prefill_batch
from jaxllm.core.scheduler_output import ScheduledSeq, SchedulerOutput
from jaxllm.models.llama import build_model
from jaxllm.runner.model_runner import ModelRunner
from jaxllm.sampling_params import SamplingParams
from pallas_kernels import KVCache
from tests.engine_checks import jit_logits
from tests.lora.adapters import drive, make_peft_adapter, peft_greedy, peft_logits, peft_model, write_adapter
from tests.models.hf_tiny import COMMON, make_tiny_hf

MAX_RANK = 8
# (name, r, alpha, targets, rslora): together all seven modules; "b" has r < MAX_RANK and rslora
ADAPTERS = [("a", 8, 16, ["q_proj", "k_proj", "v_proj", "o_proj"], False),
            ("b", 4, 8, ["q_proj", "v_proj", "gate_proj", "down_proj"], True),
            ("c", 8, 4, "all-linear", False)]


SEQS = [np.random.default_rng(0).integers(0, 256, n).tolist() for n in (9, 1, 23, 14, 5)]
SLOTS = [2, 0, 1, 3, 0]  # adapters b, base, a, c, base: one step, one program


@pytest.fixture(scope="module")
def setups(tmp_path_factory):
    """{arch: (base path, [adapter paths], {slot: peft's logits of every SEQS alone})}, made lazily."""
    root = str(tmp_path_factory.mktemp("lora_hf"))
    made = {}

    def get(arch):
        if arch not in made:
            base = make_tiny_hf(arch, root)
            adapters = [make_peft_adapter(base, root, f"{arch}-{n}", r, a, t, seed=i + 1, rslora=rs)
                        for i, (n, r, a, t, rs) in enumerate(ADAPTERS)]
            refs = {s: peft_logits(peft_model(base, adapters[s - 1] if s else None), SEQS) for s in range(4)}
            made[arch] = (base, adapters, refs)
        return made[arch]

    return get


def mixed_forward(base, adapters, seqs, slots_of_seq, layer_loop, block_size=8):
    """Logits [n_i, V] per sequence from ONE forward of all seqs, seq i running slot slots_of_seq[i]."""
    ckpt = load_checkpoint(base)
    c = ckpt.config
    model = build_model(c, ckpt.params, jnp.float32, layer_loop=layer_loop)
    lora = LoRASlots(LoRAConfig(max_loras=len(adapters), max_lora_rank=MAX_RANK), model)
    for slot, path in enumerate(adapters, start=1):
        lora.set(slot, load_adapter(path, c, MAX_RANK))
    tokens, positions, meta, nblocks = prefill_batch(seqs, block_size)
    token_slots = jnp.asarray(np.repeat(slots_of_seq, [len(s) for s in seqs]), jnp.int32)  # [T]
    cache = KVCache.zeros(c.num_layers, nblocks + 1, block_size, c.num_kv_heads, c.head_dim, jnp.float32)
    logits = jit_logits(model, tokens, positions, cache, meta, LoRABatch(lora.weights, token_slots))  # [T, V]
    offsets = np.cumsum([0] + [len(s) for s in seqs])
    return [logits[offsets[i]:offsets[i + 1]] for i in range(len(seqs))]


@pytest.mark.parametrize("arch,layer_loop", [("llama", "scan"), ("llama", "unroll"), ("qwen2", "scan")])
def test_mixed_batch_matches_peft(arch, layer_loop, setups):
    base, adapters, refs = setups(arch)
    ours = mixed_forward(base, adapters, SEQS, SLOTS, layer_loop)
    for i, (slot, got) in enumerate(zip(SLOTS, ours)):
        want = refs[slot][i]
        np.testing.assert_array_less(np.abs(got - want).max(), 1e-4)
        assert (got.argmax(-1) == want.argmax(-1)).all()
        if slot:  # the adapter really moves the logits: parity with the base would be a weak test
            assert np.abs(want - refs[0][i]).max() > 0.05, f"adapter {slot} barely changes the logits"


# ----- through the runner: greedy tokens, in-place loads, zero compiles -----------------------
@pytest.fixture(scope="module")
def runner(setups):
    """A warmed-up ModelRunner on the tiny llama with 3 LoRA slots of rank MAX_RANK."""
    base = setups("llama")[0]
    ckpt = load_checkpoint(base)
    r = ModelRunner(build_model(ckpt.config, ckpt.params, jnp.float32), block_size=16, num_blocks=32,
                    max_model_len=64, max_num_seqs=4, max_num_batched_tokens=64, lora_config=LoRAConfig(3, MAX_RANK))
    r.warmup()
    return r


def test_runner_mixed_greedy_matches_peft_loads_in_place_and_compiles_nothing(setups, runner):
    base, adapters, _ = setups("llama")
    compiled = (runner.compile_count, runner.num_traces)
    assert all(("set_lora", rb) in runner._executables for rb in runner.lora.rank_buckets)
    loaded = [load_adapter(p, runner.lora_model_config, MAX_RANK) for p in adapters]
    for slot, a in enumerate(loaded, start=1):
        runner.set_lora(slot, a)
    prompts = [SEQS[0], SEQS[2], SEQS[3], SEQS[4]]
    n = 6
    refs = [peft_model(base, p) for p in adapters] + [peft_model(base, None)]
    want = {k: [peft_greedy(m, p, n) for p in prompts] for k, m in zip((1, 2, 3, 0), refs)}
    got = drive(runner, prompts, [1, 2, 3, 0], n, "mix")  # three adapters and the base in every step
    assert got == [want[s][i] for i, s in enumerate([1, 2, 3, 0])]
    assert len({tuple(want[s][0]) for s in want}) == 4, "the adapters do not change greedy tokens"
    # in place: unload slot 2, move adapter c into slot 1; slot 3 keeps c
    runner.set_lora(2, None)
    runner.set_lora(1, loaded[2])
    got = drive(runner, prompts, [2, 1, 3, 2], n, "swap")
    assert got == [want[0][0], want[3][1], want[3][2], want[0][3]]
    assert (runner.compile_count, runner.num_traces) == compiled, "LoRA load/unload/mix compiled after warm-up"


def test_runner_refuses_bad_slots_and_adapters(setups, runner, tmp_path):
    """Each refusal is a one-line ValueError that changes nothing; the runner keeps serving."""
    base, adapters, _ = setups("llama")
    c = runner.lora_model_config
    compiled = (runner.compile_count, runner.num_traces)
    small = load_adapter(adapters[1], c, MAX_RANK)  # r=4
    for slot in (0, 4, -1, True, 1.0):
        with pytest.raises(ValueError, match=rf"slot={slot!r} is invalid: must be an integer in 1..max_loras=3"):
            runner.set_lora(slot, small)
    hf = dict(COMMON, intermediate_size=128)
    big = load_adapter(write_adapter(str(tmp_path), "big", COMMON, r=16), c, 16)
    with pytest.raises(ValueError, match=f"rank=16 exceeds max_lora_rank={MAX_RANK}"):
        runner.set_lora(1, big)
    other = load_adapter(write_adapter(str(tmp_path), "wide", hf, r=2), dataclasses.replace(c, intermediate_size=128), 4)
    with pytest.raises(ValueError, match=r"w_gate A/B shapes .* do not match this model's"):
        runner.set_lora(1, other)
    params = SamplingParams(temperature=0.0, max_tokens=1)
    bad = ScheduledSeq("x", [1, 2], 0, [0], True, 2, params, 0, prefix_token_ids=[], lora_slot=4)
    with pytest.raises(ValueError, match=r"lora_slot=4 of request x is invalid: must be in 0..3 \(max_loras=3\)"):
        runner.execute(SchedulerOutput([bad], 2))
    ok = dataclasses.replace(bad, lora_slot=0)
    assert set(runner.execute(SchedulerOutput([ok], 2))) == {"x"}  # still serving
    runner.release(["x"])
    assert (runner.compile_count, runner.num_traces) == compiled


def test_gemma3_multimodal_adapter_matches_peft(tmp_path):
    """PEFT adapters of Gemma3ForConditionalGeneration (gemma-3-27b-it's class): tensors under
    model.language_model.*, the SigLIP q_proj / v_proj ones PEFT wraps too skipped (text only), and a regex
    target_modules written against the language model's names. One batch of both adapters: each sequence's
    logits equal peft's within 1e-4, and the adapters move them."""
    root = str(tmp_path)
    base = make_tiny_hf("gemma3_mm", root)
    listed = make_peft_adapter(base, root, "g3-listed", 8, 16, ["q_proj", "v_proj", "down_proj"], seed=3)
    regex = make_peft_adapter(base, root, "g3-regex", 4, 8, r".*language_model.*\.(o_proj|up_proj)", seed=4)
    seqs = SEQS[:2]
    ours = mixed_forward(base, [listed, regex], seqs, [1, 2], "unroll")
    plain = peft_logits(peft_model(base, None), seqs)
    for i, path in enumerate((listed, regex)):
        want = peft_logits(peft_model(base, path), [seqs[i]])[0]
        np.testing.assert_array_less(np.abs(ours[i] - want).max(), 1e-4)
        assert np.abs(want - plain[i]).max() > 0.05, f"adapter {path} barely changes the logits"
