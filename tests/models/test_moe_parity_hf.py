"""Mixtral and Qwen3-MoE against HF transformers on tiny random checkpoints: prefill logits (both layer
loops), greedy tokens through the engine (paged KV, batched) against HF generate, the fused expert
tensor names, the Orbax round trip, and the refusals (GPTQ / AWQ MoE checkpoints, LoRA on experts,
GGUF Mixtral; quantized experts: test_moe_quant.py)."""
import os

import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints import load_checkpoint
from checkpoints.errors import CheckpointError
from tests.models.hf_tiny import MOE_CONFIGS, hf_logits, make_tiny_hf
from tests.models.test_parity_hf import run_model

ARCHS = sorted(MOE_CONFIGS)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tiny_moe"))


@pytest.mark.parametrize("layer_loop,impl", [("scan", "grouped"), ("unroll", "dense")])  # each loop, each impl
@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_logits_match_transformers(arch, layer_loop, impl, root, monkeypatch):
    monkeypatch.setenv("JAXLLM_LAYER_LOOP", layer_loop)
    monkeypatch.setenv("JAXLLM_MOE", impl)
    path = make_tiny_hf(arch, root)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 256, n).tolist() for n in (1, 9, 40)]
    ckpt, ours = run_model(path, seqs)
    c = ckpt.config
    assert c.is_moe and c.architecture == arch and c.num_experts == (4 if arch == "mixtral" else 8)
    assert c.moe_intermediate_size == (96 if arch == "mixtral" else 48)
    for got, want in zip(ours, hf_logits(path, seqs)):
        assert np.abs(want).max() > 0.05
        np.testing.assert_array_less(np.abs(got - want).max(), 1e-4)


def test_fused_expert_tensors_load_alike(root, tmp_path):
    """transformers 5 holds experts fused (experts.gate_up_proj [X, 2F, E], experts.down_proj [X, E, F]);
    a checkpoint written that way loads to the same params as the per-expert one."""
    import shutil

    from safetensors.numpy import load_file, save_file

    src = make_tiny_hf("qwen3_moe", root)
    dst = str(tmp_path / "fused")
    shutil.copytree(src, dst)
    t = load_file(os.path.join(src, "model.safetensors"))
    X = 8
    for i in range(2):
        p = f"model.layers.{i}.mlp.experts."
        gate = np.stack([t.pop(f"{p}{x}.gate_proj.weight") for x in range(X)])  # [X, F, E]
        up = np.stack([t.pop(f"{p}{x}.up_proj.weight") for x in range(X)])
        t[p + "gate_up_proj"] = np.concatenate([gate, up], axis=1)  # [X, 2F, E]
        t[p + "down_proj"] = np.stack([t.pop(f"{p}{x}.down_proj.weight") for x in range(X)])  # [X, E, F]
    save_file(t, os.path.join(dst, "model.safetensors"))
    a, b = load_checkpoint(src).params, load_checkpoint(dst).params
    assert set(a) == set(b) and "layers.we_gate" in a
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def sharpened(arch: str, root: str) -> str:
    """The tiny model with its lm_head scaled up 10x: a random model's next-token distribution is nearly
    flat, so greedy could tie within f32 noise; sharper logits make the argmax unambiguous."""
    import torch
    import transformers

    d = os.path.join(root, f"{arch}-sharp")
    if not os.path.isdir(d):
        model = transformers.AutoModelForCausalLM.from_pretrained(make_tiny_hf(arch, root), dtype=torch.float32)
        with torch.no_grad():
            model.lm_head.weight.mul_(10.0)
        model.save_pretrained(d)
    return d


@pytest.mark.parametrize("arch", ARCHS)
def test_engine_greedy_equals_hf_generate(arch, root, monkeypatch):
    """Through LLM (paged KV in blocks of 4, the prompts batched, chunked prefill; the grouped ragged_dot
    experts, the GPU default): greedy tokens equal HF generate's for each prompt."""
    monkeypatch.setenv("JAXLLM_MOE", "grouped")
    assert_engine_greedy_equals_hf(sharpened(arch, root), [[5, 17, 33, 2, 99, 140, 7], [200, 3, 3, 81, 12],
                                                             list(range(30, 43))], 12, max_num_batched_tokens=16)


def assert_engine_greedy_equals_hf(d, prompts, n, **llm_kw):
    """Greedy tokens of `LLM(d, ...)` (paged KV in blocks of 4, the prompts batched) equal HF
    generate's for each prompt (no prompt holds token 0, HF's pad id here)."""
    import torch
    import transformers

    from jaxllm import LLM, SamplingParams

    llm = LLM(d, max_model_len=64, max_num_seqs=4, block_size=4, **llm_kw)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True), use_tqdm=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")
    for p, out in zip(prompts, outs):
        with torch.no_grad():
            want = hf.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               pad_token_id=0)[0, len(p):].tolist()
        assert list(out.outputs[0].token_ids) == want


def test_orbax_round_trip(root, tmp_path):
    from checkpoints.orbax_store import save_orbax

    src = make_tiny_hf("mixtral", root)
    ck = load_checkpoint(src)
    save_orbax(str(tmp_path / "orbax"), ck.config, ck.params)
    seqs = [[1, 2, 3, 4, 5], list(range(10, 30))]
    back, ours = run_model(str(tmp_path / "orbax"), seqs)
    assert back.format == "orbax" and back.config == ck.config
    for got, want in zip(ours, hf_logits(src, seqs)):
        np.testing.assert_array_less(np.abs(got - want).max(), 1e-4)


def test_attention_lora_on_moe_equals_peft(root, tmp_path):
    """LoRA on the attention projections of an MoE model works (the experts stay the base model's):
    greedy tokens with the adapter equal peft's over transformers; an adapter on the MLP (the experts)
    is refused in one line naming target_modules."""
    from jaxllm import LLM, SamplingParams
    from jaxllm.lora import LoRARequest
    from tests.lora.adapters import make_peft_adapter, peft_greedy, peft_model

    base = sharpened("mixtral", root)
    ad = make_peft_adapter(base, str(tmp_path), "attn", r=4, alpha=8.0, targets=["q_proj", "v_proj", "o_proj"],
                           seed=1)
    prompts = [[5, 17, 33, 2, 99, 140, 7], [200, 3, 3, 81, 12]]
    n = 6
    llm = LLM(base, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=16, block_size=4, enable_lora=True,
              max_lora_rank=8)
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False,
                        lora_request=LoRARequest("attn", 1, ad))
    ref = peft_model(base, ad)
    base_ref = peft_model(base, None)
    for p, out in zip(prompts, outs):
        assert list(out.outputs[0].token_ids) == peft_greedy(ref, p, n)
    assert any(peft_greedy(ref, p, n) != peft_greedy(base_ref, p, n) for p in prompts), "the adapter changes nothing"

    from jaxllm.lora.peft import load_adapter
    from tests.lora.adapters import write_adapter

    cfg = load_checkpoint(base).config
    bad = write_adapter(str(tmp_path), "mlp", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                   num_attention_heads=4, num_key_value_heads=2), r=4,
                        targets=("q_proj", "gate_proj"))
    with pytest.raises(ValueError, match=r"targets gate_proj: LoRA on the mixtral MoE expert weights is not "
                                         r"supported") as e:
        load_adapter(bad, cfg, 8)
    assert "\n" not in str(e.value)


def test_quantized_hf_and_gguf_moe_refused_in_one_line(root, tmp_path):
    """(AWQ / GPTQ MoE checkpoints load: tests/checkpoints/test_hf_int4_moe.py.) A GGUF whose experts are not stacked."""
    from tests.checkpoints.gguf_tiny import write_gguf_from_hf

    gg = write_gguf_from_hf(make_tiny_hf("llama", root), str(tmp_path / "moe.gguf"), extra_f32={"expert_count": 8.0})
    with pytest.raises(CheckpointError, match="llama.expert_count=8.0 .* is not supported: its experts are not "
                                              "stacked") as e:
        load_checkpoint(gg)
    assert "\n" not in str(e.value)


def test_gguf_mixtral_matches_transformers(root, tmp_path, monkeypatch):
    """llama.cpp's Mixtral layout (general.architecture llama + expert_count, blk.N.ffn_gate_inp and the
    stacked ffn_{gate,up,down}_exps): F32 logits equal HF's. A Q8_0 file (2-D tensors Q8_0: attention,
    router, embeddings) loads with every tensor dequantized (GGUF MoE is not kept quantized), each param
    within Q8_0's rounding of the F32 file's (its logits are not compared: a rounded router flips
    near-tied expert choices)."""
    from jaxllm.models.quant import QuantWeight
    from tests.checkpoints.gguf_tiny import write_gguf_from_hf

    monkeypatch.setenv("JAXLLM_GGUF_CACHE", str(tmp_path / "cache"))
    src = make_tiny_hf("mixtral", root)
    gg = write_gguf_from_hf(src, str(tmp_path / "mixtral-f32.gguf"))
    seqs = [[1, 2, 3, 4, 5], list(range(10, 40))]
    ck, ours = run_model(gg, seqs)
    assert ck.format == "gguf" and ck.config.architecture == "mixtral" and ck.config.num_experts == 4
    for got, want in zip(ours, hf_logits(src, seqs)):
        np.testing.assert_array_less(np.abs(got - want).max(), 1e-4)
    f32 = load_checkpoint(gg).params
    q8 = load_checkpoint(write_gguf_from_hf(src, str(tmp_path / "mixtral-q8.gguf"), qtype="Q8_0")).params
    assert set(q8) == set(f32) and not any(isinstance(v, QuantWeight) for v in q8.values())
    for k in f32:
        a, b = np.asarray(f32[k]), np.asarray(q8[k])
        assert np.abs(a - b).max() <= np.abs(a).max() / 127 + 1e-6, k  # at most half a Q8_0 step of the largest block
