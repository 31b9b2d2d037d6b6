"""build_engine(enable_lora=True) wires LoRAConfig into the ModelRunner: warm-up compiles the LoRA
step of every bucket and the slot update, and serving, loading and unloading adapters afterwards
compile nothing; LoRA off leaves the step program exactly as it was (no LoRA input, same HLO)."""
from __future__ import annotations

import jax

from checkpoints import load_checkpoint
from jaxllm.config import EngineConfig
from jaxllm.engine.factory import build_engine
from jaxllm.llm import LLM
from jaxllm.lora.peft import load_adapter
from jaxllm.models.llama import build_model
from jaxllm.sampling_params import SamplingParams
from tests.lora.adapters import write_adapter
from tests.parallel.tiny_llama import CONFIG, make_tiny_llama


def test_engine_with_lora_compiles_at_warmup_only(tmp_path):
    path = make_tiny_llama(str(tmp_path))
    cfg = dict(model=path, max_model_len=64, block_size=16, max_num_seqs=4, max_num_batched_tokens=32)
    engine = build_engine(EngineConfig(**cfg, enable_lora=True, max_loras=2, max_lora_rank=8), compile_cache=False)
    r = engine.runner
    assert r.lora is not None and (r.lora.num_slots, r.lora.rank) == (2, 8)
    assert r.lora.rank_buckets == (8,)  # max_lora_rank 8: one slot write, every rank sent at 8
    assert r.compile_count == r.warmup_compile_count  # forward + prompt-lp per bucket, sampling per S,
    # + the slot update + the block copy (tests/runner/test_executables.py: that count in each mode)
    compiled = (r.compile_count, r.num_traces)
    llm = LLM("tiny", engine=engine)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    prompts = [{"prompt_token_ids": [3, 4, 5, 6]}, {"prompt_token_ids": list(range(10, 30))}]
    before = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    ad = load_adapter(write_adapter(str(tmp_path), "a", CONFIG, r=4, seed=1), r.lora_model_config, 8)
    r.set_lora(1, ad)
    r.set_lora(2, ad)
    import numpy as np

    def slots():
        return [np.array(x) for x in jax.tree.leaves(r.lora.weights)]
    direct = slots()
    r.set_lora(2, None)
    assert any(not np.array_equal(a, b) for a, b in zip(direct, slots()))
    prepared = r.prepare_lora(ad)  # checked ahead (the loader thread's part), kept at the adapter's rank
    assert {k: (a.shape, b.shape) for k, (a, b) in prepared.modules.items()} == \
        {k: (a.shape, b.shape) for k, (a, b) in ad.modules.items()}  # rank 4, not max_lora_rank 8
    assert prepared.nbytes == ad.nbytes < r.lora.nbytes // r.lora.num_slots  # f32 model: f32 as loaded
    r.set_lora(2, prepared)  # padded at the write: the same slot contents
    assert all(np.array_equal(a, b) for a, b in zip(direct, slots()))
    r.set_lora(1, None)
    # the engine's requests run slot 0 (the host side assigns slots): loaded adapters change nothing
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == before
    assert (r.compile_count, r.num_traces) == compiled

    # LoRA off: no LoRA input at all (the slots and the [T] slot index are what LoRA on adds)

    from jaxllm.runner.model_runner import ModelRunner

    model = build_model(*(lambda ck: (ck.config, ck.params))(load_checkpoint(path)), jax.numpy.float32)
    plain = ModelRunner(model, block_size=16, num_blocks=8, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32)
    assert plain.lora is None and plain.compile_count == 0
    T, S, dec = r.buckets.all()[0]
    inp = plain._padding_inputs(T, S, dec)
    assert inp.lora_slots is None
    n_off = len(jax.tree.leaves(plain._step_lowering(inp).args_info))
    n_on = len(jax.tree.leaves(r._step_lowering(r._padding_inputs(T, S, dec)).args_info))
    assert n_on - n_off == len(jax.tree.leaves(r.lora.weights)) + 1
