"""Phi-3 (fused qkv_proj / gate_up_proj, sliding window, partial rotary, longrope), Granite
(embedding / residual / attention multipliers, logits scaling) and Qwen2 / Qwen3's per-layer sliding
window (max_window_layers) against HF transformers on tiny random
checkpoints: prefill logits, longrope's frequencies, greedy through the engine (paged, batched) against
HF generate, and the config fields refused in one line."""
import numpy as np
import pytest

from checkpoints import load_checkpoint
from jaxllm.models.config import ModelConfig, ModelConfigError
from jaxllm.models.rope import longrope_long_frequencies, rope_parameters
from tests.models.hf_tiny import ARCH_CONFIGS, hf_logits, make_tiny_hf
from tests.models.test_parity_hf import assert_logits_match_hf

ORIGINAL = 32  # phi3_longrope's original_max_position_embeddings


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tiny_archs"))


@pytest.mark.parametrize("arch", sorted(ARCH_CONFIGS))
def test_logits_match_transformers(arch, tiny_root):
    """One ragged batch of 1, 7, 33 and 70 tokens (phi3, qwen2_window: past the sliding window of 12; phi3_longrope:
    two sequences under the original length 32, two past it, so the batch mixes longrope's short and
    long sets) equals HF's per-sequence forwards (fp32, eager)."""
    assert_logits_match_hf(make_tiny_hf(arch, tiny_root))


def test_config_fields_are_read(tiny_root):
    """Each tiny config really exercises its feature (not silently a plain Llama)."""
    phi3, long, granite = (load_checkpoint(make_tiny_hf(a, tiny_root)).config
                           for a in ("phi3", "phi3_longrope", "granite"))
    assert phi3.sliding_window == 12 and phi3.head_dim == 16 and phi3.rotary_dim == 8
    assert long.rotary_dim == 12 and long.rope_scaling_dict["rope_type"] == "longrope"
    assert long.rope_scaling_dict["original_max_position_embeddings"] == ORIGINAL
    assert granite.attention_scale == 0.09 and granite.logits_scaling == 2.5
    assert (granite.embedding_multiplier, granite.residual_multiplier) == (6.0, 0.4)
    qwen2 = load_checkpoint(make_tiny_hf("qwen2_window", tiny_root)).config
    assert qwen2.layer_types == ("full_attention", "sliding_attention", "sliding_attention")
    assert qwen2.sliding_window == 12 and qwen2.rope_local_theta is None


@pytest.mark.parametrize("cls,model_type", [("Qwen2Config", "qwen2"), ("Qwen3Config", "qwen3"),
                                            ("Qwen2MoeConfig", "qwen2_moe")])
@pytest.mark.parametrize("use,first,n", [(True, 1, 3), (True, 0, 3), (True, 3, 3), (True, None, 30),
                                         (False, 1, 3), (True, 28, 28)])
def test_qwen_window_layers_follow_transformers(cls, model_type, use, first, n):
    """Qwen2 / Qwen3 / Qwen2-MoE config.json as the Hub has them (no layer_types; max_window_layers absent:
    HF's 28) read as transformers 5 reads them: the window on layers >= max_window_layers (Qwen2-MoE: the
    even layers below it), only with use_sliding_window. Every layer alike gives no layer_types (one window
    for all, or none)."""
    import transformers

    raw = dict(BASE, model_type=model_type, num_hidden_layers=n, num_key_value_heads=2, use_sliding_window=use,
               sliding_window=12)
    if first is not None:
        raw["max_window_layers"] = first
    hf = getattr(transformers, cls)(**raw)
    c = ModelConfig.from_hf(raw)
    from jaxllm.models.gemma_config import layer_attention

    want = [12 if t == "sliding_attention" and hf.sliding_window else None for t in hf.layer_types]
    assert [layer_attention(c, i)[0] for i in range(n)] == want
    assert (c.layer_types is None) == (len(set(want)) == 1)
    again = ModelConfig.from_hf(hf.to_dict())  # transformers 5 writes layer_types: read the same
    assert [layer_attention(again, i)[0] for i in range(n)] == want


def test_longrope_frequencies_match_transformers():
    """Short and long inverse frequencies and the attention factor equal HF's longrope init (the long
    set is what HF uses once the sequence is longer than original_max_position_embeddings)."""
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = transformers.Phi3Config(**ARCH_CONFIGS["phi3_longrope"][1])
    short, attention = ROPE_INIT_FUNCTIONS["longrope"](cfg, None)
    long, _ = ROPE_INIT_FUNCTIONS["longrope"](cfg, None, seq_len=ORIGINAL + 1)
    mc = ModelConfig.from_hf(cfg.to_dict())
    inv, factor = rope_parameters(mc)
    np.testing.assert_allclose(inv, short.numpy(), rtol=1e-6)
    np.testing.assert_allclose(longrope_long_frequencies(mc), long.numpy(), rtol=1e-6)
    assert factor == pytest.approx(attention, rel=1e-9) and factor > 1.0  # sqrt(1 + ln(128/32) / ln(32))
    assert np.abs(inv - longrope_long_frequencies(mc)).max() > 1e-3


def test_longrope_set_follows_prompt_length_and_position():
    """rope_for_step picks longrope's long set for a token iff its sequence's prompt is longer than
    the original length (32) or its position is >= 32, whatever the step's chunk: a 40-token prompt's
    first 16-token chunk (kv length 16) is long, a 20-token prompt's tokens at 30-33 (a speculative
    step, kv length 34) are short then long; without prompt_lens the step's kv length stands in."""
    import jax.numpy as jnp
    import transformers

    from jaxllm.models.rope import rope_for_step, rope_tables
    from pallas_kernels import AttentionMetadata

    mc = ModelConfig.from_hf(transformers.Phi3Config(**ARCH_CONFIGS["phi3_longrope"][1]).to_dict())
    short, attention = rope_parameters(mc)
    long = longrope_long_frequencies(mc)
    positions = np.array(list(range(16)) + [30, 31, 32, 33] + [5, 6], np.int32)  # [T=22]: 3 sequences
    cu = np.array([0, 16, 20, 22], np.int32)
    context = np.array([16, 34, 7], np.int32)

    def check(prompt_lens, want_long):
        meta = AttentionMetadata(np.zeros(22, np.int32), np.zeros((3, 4), np.int32), context, cu,
                                 prompt_lens=prompt_lens)
        cos, sin = rope_for_step(mc, jnp.asarray(positions), meta)
        for t, is_long in enumerate(want_long):
            want_cos, want_sin = rope_tables(jnp.asarray(positions[t:t + 1]), long if is_long else short, attention)
            np.testing.assert_allclose(np.asarray(cos[t]), np.asarray(want_cos[0]), atol=1e-6, err_msg=str(t))
            np.testing.assert_allclose(np.asarray(sin[t]), np.asarray(want_sin[0]), atol=1e-6, err_msg=str(t))

    check(np.array([40, 20, 50], np.int32), [True] * 16 + [False, False, True, True] + [True, True])
    check(None, [False] * 16 + [True] * 4 + [False, False])  # kv lengths 16, 34, 7


def hf_model(path):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    model.generation_config.eos_token_id = None  # random weights: never stop early
    return model


def hf_greedy(model, prompt, n):
    import torch

    with torch.no_grad():
        ids = torch.tensor([prompt])  # the explicit mask: a token equal to pad_token_id is no padding here
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


def hf_greedy_kept_cache(model, prompt, n):
    """Greedy tokens from HF's forward with its KV cache kept across steps (no generate): what a
    longrope sequence crossing the original length gets in vLLM and jaxllm (short-set keys stay)."""
    import torch

    out, cache, ids = [], None, torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            res = model(ids, cache=cache, use_cache=True)
            cache = res.past_key_values
            out.append(int(res.logits[0, -1].argmax()))
            ids = torch.tensor([[out[-1]]])
    return out


@pytest.mark.parametrize("arch", ["granite", "phi3_longrope"])  # phi3's own features: prefill logits above
def test_engine_greedy_matches_hf_generate(arch, tiny_root):
    """Four prompts batched through the engine (paged cache, block 16, one prefill step each), 8
    greedy tokens: HF generate's tokens. phi3_longrope (original length 32): prompts of 5 and 14 stay
    short, one of 40 is long from its prefill; one of 28 crosses 32 while decoding, where HF generate
    recomputes its whole cache with the long set and jaxllm (like vLLM) keeps the short-set keys: it
    is checked against HF's forward with the cache kept instead (the other archs: HF generate too)."""
    from jaxllm import LLM, SamplingParams
    from jaxllm.config import EngineConfig
    from jaxllm.engine.factory import build_engine

    path = make_tiny_hf(arch, tiny_root)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, 256, n).tolist() for n in (5, 14, 28, 40)]
    engine = build_engine(EngineConfig(model=path, max_model_len=128, block_size=16, max_num_seqs=4,
                                       max_num_batched_tokens=128), compile_cache=False, warmup=False)
    outs = LLM("tiny", engine=engine).generate([{"prompt_token_ids": p} for p in prompts],
                                               SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                                               use_tqdm=False)
    # longrope keeps prefix caching: its blocks hash apart by the prompt's side of the original length
    assert engine.config.enable_prefix_caching and engine.kv.enable_caching
    assert engine.kv.long_prompt_threshold == (ORIGINAL if arch == "phi3_longrope" else None)
    model = hf_model(path)
    for p, o in zip(prompts, outs):
        crosses = arch == "phi3_longrope" and len(p) == 28
        want = hf_greedy_kept_cache(model, p, 8) if crosses else hf_greedy(model, p, 8)
        assert list(o.outputs[0].token_ids) == want, len(p)
    if arch == "phi3_longrope":  # the 40-token prompt's first 20: its first block, written long, is not reused
        import torch

        short = prompts[3][:20]
        out = LLM("tiny", engine=engine).generate([{"prompt_token_ids": short}], SamplingParams(
            temperature=0, max_tokens=1, logprobs=1), use_tqdm=False)[0].outputs[0]
        with torch.no_grad():
            want = torch.log_softmax(model(torch.tensor([short])).logits[0, -1], -1)  # [V]
        token = out.token_ids[0]
        assert token == int(want.argmax())
        # reusing the long-set block would move it by ~1e-2 (checked by hashing without the prompt's side)
        assert abs(out.logprobs[0][token].logprob - float(want[token])) < 1e-4


def test_longrope_prefix_cache_and_chunked_prefill_match_one_uncached_prefill(tiny_root):
    """phi3_longrope (original length 32), block 16: a 40-token prompt (long set for all its keys)
    run twice with prefix caching on (the second run hits 32 cached tokens) gives the tokens and
    logprobs of the same prompt prefilled without the cache in 16-token chunks (chunks ending at 16
    and 32 still write the long set: the set follows the prompt's length, not the step's) and HF
    generate's tokens. A 20-token prompt sharing its first block hits nothing of it; a second
    20-token one hits the first's block."""
    import torch

    from jaxllm import LLM, SamplingParams
    from jaxllm.config import EngineConfig
    from jaxllm.engine.factory import build_engine

    path = make_tiny_hf("phi3_longrope", tiny_root)
    prompt = np.random.default_rng(11).integers(0, 256, 40).tolist()
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0)

    def run(prefix_caching, chunk, prompts):
        engine = build_engine(EngineConfig(model=path, max_model_len=128, block_size=16, max_num_seqs=2,
                                           max_num_batched_tokens=chunk, enable_prefix_caching=prefix_caching),
                              compile_cache=False, warmup=False)
        llm = LLM("tiny", engine=engine)
        return [llm.generate([{"prompt_token_ids": p}], sp, use_tqdm=False)[0] for p in prompts]

    first, again, short, short2 = run(True, 128, [prompt, prompt, prompt[:20], prompt[:19] + [7]])
    (chunked,) = run(False, 16, [prompt])
    assert (first.num_cached_tokens, again.num_cached_tokens) == (0, 32)
    assert (short.num_cached_tokens, short2.num_cached_tokens) == (0, 16)
    want = hf_greedy(hf_model(path), prompt, 6)
    for out in (first, again, chunked):
        got = out.outputs[0]
        assert list(got.token_ids) == want
        lp = [d[t].logprob for d, t in zip(got.logprobs, got.token_ids)]
        np.testing.assert_allclose(lp, [d[t].logprob for d, t in zip(first.outputs[0].logprobs, want)],
                                   atol=1e-5)
    with torch.no_grad():  # the short prompt: HF's short-set forward, not the long prompt's cached block
        ref = torch.log_softmax(hf_model(path)(torch.tensor([prompt[:20]])).logits[0, -1], -1)
    tok = short.outputs[0].token_ids[0]
    assert tok == int(ref.argmax()) and abs(short.outputs[0].logprobs[0][tok].logprob - float(ref[tok])) < 1e-4


BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
LONGROPE = dict(rope_type="longrope", short_factor=[1.0] * 8, long_factor=[2.0] * 8)


@pytest.mark.parametrize("cfg,message", [
    (dict(BASE, model_type="llama", partial_rotary_factor=0.5),
     "partial_rotary_factor=0.5 is not supported for model_type='llama'"),
    (dict(BASE, model_type="phi3", partial_rotary_factor=1.5), "partial_rotary_factor=1.5 must be in (0, 1]"),
    (dict(BASE, model_type="phi3", rope_scaling=dict(LONGROPE, short_factor=[1.0] * 7)),
     "rope_scaling.short_factor='a list of 7' must be a list of 8 numbers > 0"),
    (dict(BASE, model_type="phi3", partial_rotary_factor=0.5, rope_scaling=LONGROPE),
     "rope_scaling.short_factor='a list of 8' must be a list of 4 numbers > 0"),
    (dict(BASE, model_type="phi3", rope_scaling=dict(LONGROPE, long_mscale=1.2)),
     "rope_scaling.long_mscale=1.2 is not supported"),
    (dict(BASE, model_type="granite", residual_multiplier=-0.2),
     "residual_multiplier=-0.2 must be a finite number > 0"),
    (dict(BASE, model_type="granite", attention_multiplier="0.1"), "attention_multiplier='0.1' must be"),
    (dict(BASE, model_type="llama", logits_scaling=8.0),
     "logits_scaling=8.0 is only supported for model_type 'granite' (got 'llama')"),
    (dict(BASE, model_type="qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=-1),
     "max_window_layers=-1 must be an integer >= 0"),
    (dict(BASE, model_type="qwen3", use_sliding_window=True, sliding_window=8,
          layer_types=["sliding_attention", "chunked_attention"]),
     "layer_types[1]='chunked_attention' is not supported (sliding_attention / full_attention)"),
])
def test_bad_fields_refused_in_one_line(cfg, message):
    with pytest.raises(ModelConfigError) as e:
        ModelConfig.from_hf(cfg, source="config.json")
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_phi3_aliases_and_defaults():
    """HF's Phi3Config reads rope type "su" (and "yarn") as longrope; original_max_position_embeddings at the
    top level wins; without factor or attention_factor the attention factor is
    sqrt(1 + ln(max / original) / ln(original)), 1.0 when max <= original. Granite's default softmax scale
    is HF's attention_multiplier default, 1.0, not 1/sqrt(head_dim)."""
    c = ModelConfig.from_hf(dict(BASE, model_type="phi3", max_position_embeddings=4096,
                                 original_max_position_embeddings=1024, rope_scaling=dict(LONGROPE, type="su")))
    s = c.rope_scaling_dict
    assert s["rope_type"] == "longrope" and s["original_max_position_embeddings"] == 1024
    assert s["attention_factor"] == pytest.approx(np.sqrt(1 + np.log(4) / np.log(1024)))
    c = ModelConfig.from_hf(dict(BASE, model_type="phi3", max_position_embeddings=1024,
                                 original_max_position_embeddings=1024, rope_scaling=LONGROPE))
    assert c.rope_scaling_dict["attention_factor"] == 1.0 and c.max_model_len_limit == 1024
    assert ModelConfig.from_hf(dict(BASE, model_type="granite")).attention_scale == 1.0
    assert ModelConfig.from_hf(dict(BASE, model_type="llama")).attention_scale == 16 ** -0.5


def test_orbax_round_trip_keeps_longrope(tiny_root, tmp_path):
    """The Orbax store's jaxllm_config.json gives back the same hashable config (the factor lists as
    tuples) and the same short and long frequencies."""
    from checkpoints.orbax_store import read_orbax_config, save_orbax

    ckpt = load_checkpoint(make_tiny_hf("phi3_longrope", tiny_root))
    save_orbax(str(tmp_path / "orbax"), ckpt.config, {"embed": np.asarray(ckpt.params["embed"])})
    back = read_orbax_config(str(tmp_path / "orbax"))
    assert back == ckpt.config and hash(back) == hash(ckpt.config) and back.rotary_dim == 12
    np.testing.assert_array_equal(longrope_long_frequencies(back), longrope_long_frequencies(ckpt.config))


def test_quantized_phi3_checkpoint_refused(tiny_root, tmp_path):
    """A quantization_config over phi3's fused projections is refused in one line naming the file."""
    import json
    import shutil

    from checkpoints.errors import CheckpointError
    from tests.checkpoints.fp8_tiny import ct_config

    src = make_tiny_hf("phi3", tiny_root)
    dst = str(tmp_path / "phi3-fp8")
    shutil.copytree(src, dst)
    with open(f"{dst}/config.json") as f:
        cfg = json.load(f)
    with open(f"{dst}/config.json", "w") as f:
        json.dump(dict(cfg, quantization_config=ct_config("channel", None)), f)
    with pytest.raises(CheckpointError, match=r"^\S+/config\.json: quantization_config with model_type 'phi3' "
                                              r"is not supported \(its fused qkv_proj / gate_up_proj") as e:
        load_checkpoint(dst)
    assert "\n" not in str(e.value)


def test_granite_scale_reaches_the_pallas_kernel(tiny_root, monkeypatch):
    """Granite's attention_multiplier (0.09, not 1/sqrt(16)) goes through the Pallas prefill kernel
    (interpret mode on CPU) as its sm_scale: logits equal HF's."""
    import jax.numpy as jnp

    import jaxllm.parallel.ops as ops
    from jaxllm.models.llama import build_model
    from tests.engine_checks import logits_of

    calls = []
    real = ops.ragged_paged_attention

    def interpreted(*args, **kwargs):
        calls.append((kwargs["impl"], kwargs["sm_scale"]))
        return real(*args, **kwargs, interpret=True)

    monkeypatch.setattr(ops, "ragged_paged_attention", interpreted)
    path = make_tiny_hf("granite", tiny_root)
    ckpt = load_checkpoint(path)
    c = ckpt.config
    model = build_model(c, ckpt.params, jnp.float32, attention_impl="pallas")
    seqs = [[3, 9, 27], list(range(40, 73))]
    got = logits_of(model, c, seqs, 8)  # [T, V]: one jitted forward
    want = np.concatenate(hf_logits(path, seqs))
    assert calls and all(call == ("pallas", 0.09) for call in calls), calls
    np.testing.assert_array_less(np.abs(got[:len(want)] - want).max(), 1e-4)
