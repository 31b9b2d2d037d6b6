"""Google Gemma 2, Gemma 3 text and Gemma 1 against HF transformers on tiny random checkpoints
(tests/models/hf_tiny.py GEMMA_CONFIGS: head_dim 256, a 12-token window on the sliding layers, soft-caps
that bite, drawn norm weights): prefill logits, greedy through the engine (paged, batched, prefix cache
reused) against HF generate, Gemma 2 through the Pallas kernels (interpret mode), int8 weights, the
config fields refused in one line, dummy presets and the Orbax config round trip. gemma3_mm: a
Gemma3ForConditionalGeneration checkpoint (gemma-3-4b/12b/27b's class), its text model loaded alone."""
import numpy as np
import pytest

from checkpoints import load_checkpoint
from jaxllm.models.config import ModelConfig, ModelConfigError
from tests.models.hf_tiny import GEMMA_CONFIGS, hf_logits, make_tiny_hf
from tests.models.test_parity_hf import assert_logits_match_hf

PROMPT_LENS = (1, 7, 33, 70)  # past the 12-token window: the sliding layers mask


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tiny_gemma"))


@pytest.mark.parametrize("arch", sorted(GEMMA_CONFIGS))
def test_logits_match_transformers(arch, tiny_root):
    """One ragged batch of 1, 7, 33 and 70 tokens equals HF's per-sequence forwards (fp32, eager)."""
    assert_logits_match_hf(make_tiny_hf(arch, tiny_root), PROMPT_LENS)


def test_config_fields_are_read(tiny_root):
    """Each tiny config really exercises its features (not silently a plain Llama)."""
    g2, g3, g1 = (load_checkpoint(make_tiny_hf(a, tiny_root)).config for a in ("gemma2", "gemma3", "gemma"))
    for c in (g2, g3, g1):
        assert c.norm_offset and c.hidden_act == "gelu_tanh" and c.tie_word_embeddings
        assert c.embedding_multiplier == 8.0  # sqrt(hidden_size 64)
    assert g2.head_dim == 256 and g2.attention_scale == 144 ** -0.5 and g2.sandwich_norms and not g2.qk_norm
    assert (g2.attn_logit_softcap, g2.final_logit_softcap, g2.sliding_window) == (1.0, 3.0, 12)
    assert g2.layer_types == ("sliding_attention", "full_attention")
    assert g3.qk_norm and g3.sandwich_norms and g3.rope_local_theta == 10000.0 and g3.rope_theta == 1e6
    assert g3.rope_scaling_dict == {"rope_type": "linear", "factor": 8.0}
    assert g3.layer_types == ("sliding_attention", "sliding_attention", "full_attention")
    assert g3.attn_logit_softcap is None and g3.final_logit_softcap is None
    assert g1.layer_types is None and not g1.sandwich_norms and g1.attention_scale == 32 ** -0.5


def hf_greedy(path, prompts, n):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    model.generation_config.eos_token_id = None  # random weights: never stop early
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])  # the explicit mask: a token equal to pad_token_id is no padding here
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                 pad_token_id=0)
            out.append(gen[0, len(p):].tolist())
    return out


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_mm"])  # gemma3_mm: gemma3's text model in the multimodal class
def test_engine_greedy_matches_hf_generate(arch, tiny_root):
    """Four prompts batched through the engine (paged cache, block 16; steps of 64 tokens, so the
    40-token prompt's prefill is chunked and two step programs compile), 8 greedy tokens each: HF
    generate's tokens. Served twice: the second round's prompts hit the prefix cache (sliding layers
    only mask, so a cached block's keys depend on its tokens and positions alone) and give the same tokens."""
    from jaxllm import LLM, SamplingParams
    from jaxllm.config import EngineConfig
    from jaxllm.engine.factory import build_engine

    path = make_tiny_hf(arch, tiny_root)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, 256, n).tolist() for n in (5, 14, 28, 40)]
    engine = build_engine(EngineConfig(model=path, max_model_len=128, block_size=16, max_num_seqs=4,
                                       max_num_batched_tokens=64), compile_cache=False, warmup=False)
    assert engine.kv.enable_caching
    llm = LLM("tiny", engine=engine)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    want = hf_greedy(path, prompts, 8)
    for round_ in range(2):
        hits = engine.kv.prefix_hits
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert [list(o.outputs[0].token_ids) for o in outs] == want, round_
    assert engine.kv.prefix_hits - hits == 16 + 32  # round 2 reused the full blocks of the 28- and 40-token prompts


def test_gemma2_through_pallas_kernels(tiny_root, monkeypatch):
    """Gemma 2's softmax scale (144 ** -0.5), attention soft-cap (1.0) and per-layer window (12 on layer 0,
    none on layer 1) reach the Pallas prefill and decode kernels (interpret mode) at head_dim 256:
    prefill and decode logits equal HF's."""
    import jax.numpy as jnp

    import jaxllm.parallel.ops as ops
    from jaxllm.models.llama import build_model
    from tests.engine_checks import model_forward
    from tests.parallel.tp_forward import PROMPTS, two_prompt_steps
    from pallas_kernels import KVCache

    calls = []
    real = ops.ragged_paged_attention

    def interpreted(q, cache, layer, metadata, **kwargs):
        calls.append((kwargs["impl"], metadata.decode_only, kwargs["sm_scale"], kwargs["sliding_window"],
                      kwargs["soft_cap"], q.shape[-1]))
        return real(q, cache, layer, metadata, **kwargs, interpret=True)

    monkeypatch.setattr(ops, "ragged_paged_attention", interpreted)
    path = make_tiny_hf("gemma2", tiny_root)
    ckpt = load_checkpoint(path)
    c = ckpt.config
    model = build_model(c, ckpt.params, jnp.float32, attention_impl="pallas")
    fwd, state = model_forward(model)  # not shared: the kernel is monkeypatched
    a, b = PROMPTS[0], PROMPTS[2]  # 17 and 40 tokens
    prefill_step, decode_step = two_prompt_steps(a, b)
    cache = KVCache.zeros(c.num_layers, 16, 16, c.num_kv_heads, c.head_dim, jnp.float32)
    (tokens, positions, meta), (dec_tokens, dec_positions, dec_meta) = prefill_step, decode_step
    prefill, cache = fwd(state, tokens, positions, cache, meta)
    decode, _ = fwd(state, dec_tokens, dec_positions, cache, dec_meta)  # tokens 7 and 11 after each prompt
    scale = 144 ** -0.5
    assert set(calls) == {("pallas", decode, scale, window, 1.0, 256)
                          for decode in (False, True) for window in (12, None)}
    want_a, want_b, want_a7, want_b11 = hf_logits(path, [a, b, a + [7], b + [11]])
    prefill = np.asarray(prefill)
    np.testing.assert_array_less(np.abs(prefill[:len(a)] - want_a).max(), 1e-4)
    np.testing.assert_array_less(np.abs(prefill[len(a):len(a) + len(b)] - want_b).max(), 1e-4)
    np.testing.assert_array_less(np.abs(np.asarray(decode) - np.stack([want_a7[-1], want_b11[-1]])).max(), 1e-4)


def test_int8_weights(tiny_root):
    """--quantization int8 goes through the same projections: Gemma 3's logits stay within
    tests/models/test_quant.py's int8 bounds of HF's fp32 ones (measured: 0.12 max error, logits up to 4.4)."""
    from tests.engine_checks import build, logits_of
    from tests.models.test_quant import MAX_LOGIT_ERR, MIN_GREEDY_AGREE

    path = make_tiny_hf("gemma3", tiny_root)
    model, c = build(path, "int8", layer_loop="unroll")
    assert model.quantization == "int8"
    seqs = [list(range(3, 40))]
    got = logits_of(model, c, seqs)
    want = hf_logits(path, seqs)[0]
    err = np.abs(got - want).max()
    assert 0 < err < MAX_LOGIT_ERR["int8"], err
    assert (got.argmax(-1) == want.argmax(-1)).mean() > MIN_GREEDY_AGREE["int8"]


def test_scan_layer_loop_refused(tiny_root):
    """Gemma 2/3's layers differ (window, rope): they always unroll; an explicit scan is refused in one
    line. Gemma 1's layers are alike: either loop."""
    from jaxllm.models.llama import layer_loop_mode

    g2, g1 = (load_checkpoint(make_tiny_hf(a, tiny_root)).config for a in ("gemma2", "gemma"))
    assert layer_loop_mode("auto", g2) == "unroll" and layer_loop_mode("scan", g1) == "scan"
    with pytest.raises(ValueError, match=r"^JAXLLM_LAYER_LOOP=scan is not supported for model_type='gemma2': "
                                         r"its layers differ \(layer_types") as e:
        layer_loop_mode("scan", g2)
    assert "\n" not in str(e.value)


BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)


@pytest.mark.parametrize("cfg,message", [
    (dict(BASE, model_type="llama", attn_logit_softcapping=50.0),
     "attn_logit_softcapping=50.0 is only supported for model_type 'gemma2' / 'gemma3_text' (got 'llama')"),
    (dict(BASE, model_type="qwen3", query_pre_attn_scalar=144),
     "query_pre_attn_scalar=144 is only supported for model_type 'gemma2'"),
    (dict(BASE, model_type="gemma2", layer_types=["sliding_attention", "chunked_attention"]),
     "layer_types[1]='chunked_attention' is not supported (sliding_attention / full_attention)"),
    (dict(BASE, model_type="gemma2", layer_types=["full_attention"]),
     "layer_types='a list of 1' must list one type per layer (num_hidden_layers=2)"),
    (dict(BASE, model_type="gemma2", hidden_activation="gelu"),
     "hidden_activation='gelu' is not supported for model_type 'gemma2' (only 'gelu_pytorch_tanh')"),
    (dict(BASE, model_type="gemma", hidden_act="silu"),
     "hidden_act='silu' is not supported for model_type 'gemma' (only 'gelu' / 'gelu_pytorch_tanh')"),
    (dict(BASE, model_type="gemma2", final_logit_softcapping=-1.0),
     "final_logit_softcapping=-1.0 must be a finite number > 0 or null"),
    (dict(BASE, model_type="gemma3_text", use_bidirectional_attention=True),
     "use_bidirectional_attention=True is not supported (only causal attention)"),
    (dict(BASE, model_type="gemma3_text",
          rope_parameters={"sliding_attention": {"rope_type": "linear", "factor": 2.0}}),
     "rope_parameters.sliding_attention.rope_type='linear' is not supported"),
    (dict(model_type="gemma3", text_config=dict(BASE, final_logit_softcapping=30.0)),
     "text_config.final_logit_softcapping=30.0 is not supported for model_type 'gemma3' (HF's "
     "Gemma3ForConditionalGeneration ignores it; only null)"),
    (dict(model_type="gemma3", text_config=dict(BASE, model_type="gemma2")),
     "text_config.model_type='gemma2' is not supported for model_type 'gemma3' (only 'gemma3_text')"),
    (dict(model_type="gemma3", text_config=[]), "text_config=[] must be an object"),
])
def test_bad_fields_refused_in_one_line(cfg, message):
    with pytest.raises(ModelConfigError) as e:
        ModelConfig.from_hf(cfg, source="config.json")
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_hf_defaults_and_old_config_format():
    """Fields a Gemma config.json leaves out take HF's defaults (Gemma 2: soft-caps 50 / 30, every other
    layer sliding from layer 0; Gemma 3: sliding_window_pattern 6, rope bases 1e6 / 1e4, no caps; all:
    head_dim 256, tied); Gemma 3's pre-transformers-5 rope fields (rope_theta, rope_scaling,
    rope_local_base_freq) read like its rope_parameters."""
    g2 = ModelConfig.from_hf(dict(BASE, model_type="gemma2", num_hidden_layers=4))
    assert (g2.attn_logit_softcap, g2.final_logit_softcap) == (50.0, 30.0)
    assert g2.head_dim == 256 and g2.tie_word_embeddings
    assert g2.layer_types == ("sliding_attention", "full_attention") * 2 and g2.sliding_window == 4096
    g3 = ModelConfig.from_hf(dict(BASE, model_type="gemma3_text", num_hidden_layers=7))
    assert g3.layer_types == ("sliding_attention",) * 5 + ("full_attention", "sliding_attention")
    assert (g3.rope_theta, g3.rope_local_theta, g3.attn_logit_softcap, g3.rope_scaling) == (1e6, 1e4, None, None)
    old = ModelConfig.from_hf(dict(BASE, model_type="gemma3_text", rope_theta=1e6, rope_local_base_freq=1e4,
                                   rope_scaling={"rope_type": "linear", "factor": 8.0}, sliding_window_pattern=2))
    assert old.rope_scaling_dict == {"rope_type": "linear", "factor": 8.0} and old.rope_local_theta == 1e4
    assert old.layer_types == ("sliding_attention", "full_attention")


def test_dummy_presets_and_orbax_round_trip(tiny_root, tmp_path):
    """The dummy presets have the real models' shapes and features; the Orbax store's config comes back
    equal and hashable (layer_types a tuple)."""
    from checkpoints.dummy import dummy_config
    from checkpoints.orbax_store import read_orbax_config, save_orbax

    g2, g3 = dummy_config("gemma-2-9b"), dummy_config("gemma-3-1b")
    assert g2.num_layers == 42 and g2.layer_types[:2] == ("sliding_attention", "full_attention")
    assert g3.num_kv_heads == 1 and g3.layer_types[5] == "full_attention" and g3.sliding_window == 512
    assert g3.layer_types.count("sliding_attention") == 22 and g3.rope_local_theta == 1e4
    g27 = dummy_config("gemma-3-27b")  # the multimodal class's config: its text model
    assert (g27.num_layers, g27.num_heads, g27.num_kv_heads, g27.head_dim, g27.vocab_size) == (62, 32, 16, 128, 262208)
    assert g27.attention_scale == 168 ** -0.5 and g27.layer_types.count("full_attention") == 10
    assert g27.rope_scaling_dict == {"rope_type": "linear", "factor": 8.0} and g27.eos_token_ids == (1, 106)
    assert 26.5e9 < g27.num_params < 27.5e9  # the text model of the 27B (its ~0.4B vision tower left out)
    ckpt = load_checkpoint(make_tiny_hf("gemma3", tiny_root))
    save_orbax(str(tmp_path / "orbax"), ckpt.config, {"embed": np.asarray(ckpt.params["embed"])})
    back = read_orbax_config(str(tmp_path / "orbax"))
    assert back == ckpt.config and hash(back) == hash(ckpt.config)


def test_gemma3_multimodal_config_defaults():
    """A Hub-style gemma-3-4b-it config.json (text_config lists only what differs from Gemma3TextConfig's
    defaults, rope_scaling the older way) reads as transformers 5 fills it: 8 heads, 4 KV heads, vocab
    262208, 5 sliding : 1 full, linear rope 8 on the full layers only; the composite's eos ids and tying
    win; the vision config is not read. An absent text_config is Gemma3TextConfig() itself."""
    import transformers

    raw = dict(architectures=["Gemma3ForConditionalGeneration"], model_type="gemma3", eos_token_id=[1, 106],
               text_config=dict(hidden_size=2560, intermediate_size=10240, model_type="gemma3_text",
                                num_hidden_layers=34, rope_scaling={"factor": 8.0, "rope_type": "linear"},
                                sliding_window=1024), vision_config=dict(model_type="siglip_vision_model"))
    c = ModelConfig.from_hf(raw)
    hf = transformers.Gemma3Config(**raw).text_config
    assert (c.architecture, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (
        "gemma3_text", hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim, hf.vocab_size) == (
        "gemma3_text", 8, 4, 256, 262208)
    assert c.layer_types == tuple(hf.layer_types) and c.layer_types.count("full_attention") == 5
    assert (c.sliding_window, c.max_position_embeddings, c.rms_norm_eps) == (1024, 131072, 1e-6)
    assert c.rope_scaling_dict == {"rope_type": "linear", "factor": 8.0} and c.rope_theta == 1e6
    assert c.rope_local_theta == hf.rope_parameters["sliding_attention"]["rope_theta"] == 1e4
    assert c.attention_scale == 256 ** -0.5 and c.eos_token_ids == (1, 106) and c.bos_token_id == 2
    assert c.tie_word_embeddings and c.has_lm_head and c.qk_norm and c.sandwich_norms
    bare = ModelConfig.from_hf(dict(model_type="gemma3"))
    hf = transformers.Gemma3TextConfig()
    assert (bare.hidden_size, bare.intermediate_size, bare.num_layers, bare.eos_token_ids) == (
        hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers, (hf.eos_token_id,))


def test_gemma3_multimodal_tensor_names(tiny_root, tmp_path, caplog):
    """transformers 5.24's save_pretrained writes the multimodal class's text model as language_model.model.*
    (the Hub's layout); transformers' in-memory names (model.language_model.*, model.vision_tower.*, lm_head)
    load the same parameters. The vision tower and projector are skipped, said in one log line; an untied
    composite reads lm_head.weight."""
    import logging
    import os
    import shutil

    from safetensors.numpy import load_file, save_file

    path = make_tiny_hf("gemma3_mm", tiny_root)
    stored = load_file(os.path.join(path, "model.safetensors"))
    assert "language_model.model.embed_tokens.weight" in stored and any(k.startswith("vision_tower.") for k in stored)
    with caplog.at_level(logging.INFO, logger="jaxllm.checkpoints"):
        old = load_checkpoint(path).params
    lines = [r.getMessage() for r in caplog.records if "multimodal checkpoint" in r.getMessage()]
    assert len(lines) == 1 and "text model only" in lines[0] and "vision tower / projector tensors are skipped" in lines[0]
    new_dir = str(tmp_path / "new_names")
    shutil.copytree(path, new_dir)
    prefix = "language_model.model."  # → model.language_model.*; vision_tower.* → model.vision_tower.* (etc.)
    renamed = {"model.language_model." + k[len(prefix):] if k.startswith(prefix) else "model." + k: v
               for k, v in stored.items()}
    emb = stored["language_model.model.embed_tokens.weight"]  # [V, E]
    renamed["lm_head.weight"] = emb[::-1].copy()  # read only when untied
    save_file(renamed, os.path.join(new_dir, "model.safetensors"))
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in renamed
    assert any(k.startswith("model.vision_tower.") for k in renamed)
    new = load_checkpoint(new_dir).params
    assert sorted(new) == sorted(old) and "lm_head" not in new
    for k in old:
        np.testing.assert_array_equal(np.asarray(new[k]), np.asarray(old[k]), err_msg=k)
    import json

    with open(os.path.join(new_dir, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(new_dir, "config.json"), "w") as f:
        json.dump(dict(cfg, tie_word_embeddings=False), f)
    untied = load_checkpoint(new_dir)
    assert not untied.config.tie_word_embeddings and untied.config.has_lm_head
    np.testing.assert_array_equal(np.asarray(untied.params["lm_head"]), emb[::-1].T)  # kept [E, V]
