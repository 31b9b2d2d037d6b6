"""RoPE scaling types beyond default/linear/llama3 (jaxllm/models/rope.py): yarn and dynamic NTK, checked
against HF transformers' ROPE_INIT_FUNCTIONS and tiny HF models at positions past the original length,
through HF safetensors, GGUF and the Orbax store."""
import json
import os

import numpy as np
import pytest

from checkpoints import load_checkpoint
from checkpoints.errors import CheckpointError
from jaxllm.models.config import ModelConfig, ModelConfigError
from jaxllm.models.rope import rope_parameters
from tests.models.hf_tiny import ROPE_CONFIGS, hf_logits, make_tiny_hf
from tests.models.test_parity_hf import run_model

YARN = ["qwen2_yarn", "llama_yarn_mscale", "llama_yarn_attn_notrunc"]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tiny_rope"))


def hf_config(name: str):
    import transformers

    cls_name, kwargs = ROPE_CONFIGS[name]
    return getattr(transformers, cls_name)(**kwargs)


def close(got, want, tol=1e-4):
    assert got.shape == want.shape
    assert np.abs(want).max() > 0.05, "reference logits are degenerate: the comparison would be weak"
    np.testing.assert_array_less(np.abs(got - want).max(), tol)


@pytest.mark.parametrize("name", sorted(ROPE_CONFIGS))
def test_frequencies_and_attention_factor_match_transformers(name):
    """inv_freq and the cos/sin factor equal HF's rope init function's (dynamic: at the length vLLM scales
    for, max_position_embeddings * factor); each variant really scales (not the default frequencies)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = hf_config(name)
    kind = cfg.rope_parameters["rope_type"]
    seq_len = {"seq_len": cfg.max_position_embeddings * 4} if kind == "dynamic" else {}
    want_inv, want_factor = ROPE_INIT_FUNCTIONS[kind](cfg, None, **seq_len)
    mc = ModelConfig.from_hf(cfg.to_dict())
    inv, factor = rope_parameters(mc)
    np.testing.assert_allclose(inv, want_inv.numpy(), rtol=1e-6)
    assert factor == pytest.approx(want_factor, rel=1e-9)
    d = mc.head_dim
    plain = 1.0 / (mc.rope_theta ** (np.arange(0, d, 2) / d))  # unscaled RoPE
    assert np.abs(inv - plain).max() > 1e-3 * plain.max()
    assert (factor != 1.0) == (kind == "yarn")


@pytest.mark.parametrize("name", YARN)
def test_yarn_logits_match_transformers_past_original_length(name, tiny_root):
    """Sequences past original_max_position_embeddings (32): logits equal HF's (fp32, eager)."""
    path = make_tiny_hf(name, tiny_root)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 256, n).tolist() for n in (7, 33, 100)]
    ckpt, ours = run_model(path, seqs)
    assert ckpt.config.rope_scaling_dict["rope_type"] == "yarn"
    for got, want in zip(ours, hf_logits(path, seqs)):
        close(got, want)


def test_dynamic_is_vllm_fixed_scaling(tiny_root):
    """dynamic (original length 16, factor 4): one NTK base for every position, the one HF computes for a
    sequence of max_position_embeddings * factor = 64 tokens (vLLM's scaling). A 64-token sequence
    matches HF exactly; a 24-token one matches HF's 64-token run on its 24 positions, not HF's own
    24-token run (HF rescales per sequence length: the documented difference)."""
    path = make_tiny_hf("llama_dynamic", tiny_root)
    assert load_checkpoint(path).config.max_model_len_limit == 64
    rng = np.random.default_rng(1)
    long = rng.integers(0, 256, 64).tolist()
    short = long[:24]
    _, (ours_long, ours_short) = run_model(path, [long, short])
    (hf_long,), (hf_short,) = hf_logits(path, [long]), hf_logits(path, [short])  # fresh models: no cached base
    close(ours_long, hf_long)
    close(ours_short, hf_long[:24])
    assert np.abs(ours_short - hf_short).max() > 1e-3


def test_gguf_yarn_metadata_loads_like_hf(tiny_root):
    """A GGUF written the way llama.cpp's converter writes yarn (rope.scaling.type/factor/
    original_context_length): the same rope scaling, logits equal HF's past the original length."""
    from tests.checkpoints.gguf_tiny import write_gguf_from_hf

    hf_dir = make_tiny_hf("qwen2_yarn", tiny_root)
    path = write_gguf_from_hf(hf_dir, os.path.join(tiny_root, "qwen2_yarn.gguf"))
    seqs = [list(range(3, 90))]
    ckpt, ours = run_model(path, seqs)
    assert ckpt.format == "gguf"
    assert ckpt.config.rope_scaling_dict == load_checkpoint(hf_dir).config.rope_scaling_dict
    close(ours[0], hf_logits(hf_dir, seqs)[0])


def test_gguf_yarn_attention_factor_and_betas_and_refused_keys(tiny_root):
    """yarn_attn_factor / yarn_beta_fast / yarn_beta_slow map onto HF's names; a key HF's yarn has no
    equivalent for (DeepSeek's yarn_log_multiplier) is refused in one line naming it and its value."""
    from tests.checkpoints.gguf_tiny import write_gguf_from_hf

    hf_dir = make_tiny_hf("llama_yarn_attn_notrunc", tiny_root)
    path = write_gguf_from_hf(hf_dir, os.path.join(tiny_root, "attn.gguf"))
    s = load_checkpoint(path).config.rope_scaling_dict
    assert (s["rope_type"], s["factor"], s["original_max_position_embeddings"]) == ("yarn", 4.0, 32)
    assert (s["attention_factor"], s["beta_fast"], s["beta_slow"]) == (1.25, 16.0, 2.0)
    bad = write_gguf_from_hf(hf_dir, os.path.join(tiny_root, "logmul.gguf"),
                             extra_f32={"rope.scaling.yarn_log_multiplier": 0.25})
    with pytest.raises(CheckpointError, match=r"^\S+logmul\.gguf: llama\.rope\.scaling\.yarn_log_multiplier=0\.25 "
                                              r"is not supported with yarn \(only 0\.0\)$"):
        load_checkpoint(bad)


def test_orbax_round_trip_keeps_yarn(tiny_root, tmp_path):
    """The Orbax store's jaxllm_config.json gives back the same (hashable) config and frequencies."""
    from checkpoints.orbax_store import read_orbax_config, save_orbax

    ckpt = load_checkpoint(make_tiny_hf("llama_yarn_attn_notrunc", tiny_root))
    save_orbax(str(tmp_path / "orbax"), ckpt.config, {"embed": np.asarray(ckpt.params["embed"])})
    back = read_orbax_config(str(tmp_path / "orbax"))
    assert back == ckpt.config and hash(back) == hash(ckpt.config)
    assert dict(back.rope_scaling)["truncate"] is False
    np.testing.assert_array_equal(rope_parameters(back)[0], rope_parameters(ckpt.config)[0])


def test_max_model_len_limit_as_vllm_derives_it():
    """Qwen2.5's long-context recipe (max_position_embeddings 32768, yarn factor 4 over 32768) serves
    131072 positions; other types keep max_position_embeddings."""
    base = dict(model_type="qwen2", vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                num_attention_heads=1, max_position_embeddings=32768)
    qwen = ModelConfig.from_hf(dict(base, rope_scaling={"type": "yarn", "factor": 4.0,
                                                        "original_max_position_embeddings": 32768}))
    assert qwen.max_model_len_limit == 131072
    no_orig = ModelConfig.from_hf(dict(base, rope_scaling={"rope_type": "yarn", "factor": 2.0}))
    assert dict(no_orig.rope_scaling)["original_max_position_embeddings"] == 32768  # HF's default
    assert no_orig.max_model_len_limit == 65536
    linear = ModelConfig.from_hf(dict(base, rope_scaling={"rope_type": "linear", "factor": 2.0}))
    assert linear.max_model_len_limit == ModelConfig.from_hf(base).max_model_len_limit == 32768


@pytest.mark.parametrize("scaling, message", [
    ({"rope_type": "mrope", "factor": 2.0},
     r"^cfg: rope_type='mrope' is not supported \(default, linear, llama3, yarn, dynamic, longrope\)$"),
    ({"rope_type": "longrope", "factor": 2.0},  # longrope runs (Phi-3), but needs its factor lists
     r"^cfg: rope_scaling\.short_factor=None must be a list of 4 numbers > 0 \(rotary_dim // 2\)$"),
    ({"rope_type": "dynamic", "alpha": 1000.0},
     r"^cfg: rope_scaling\.alpha=1000\.0 \(dynamic NTK-alpha scaling\) is not supported"),
    ({"rope_type": "dynamic"}, r"^cfg: rope_scaling\.factor is missing \(rope_type 'dynamic' needs it\)$"),
    ({"rope_type": "yarn", "factor": "4"}, r"^cfg: rope_scaling\.factor='4' must be a number >= 0$"),
])
def test_bad_rope_scaling_is_one_line(scaling, message):
    cfg = dict(model_type="llama", vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
               num_attention_heads=1, rope_scaling=scaling)
    with pytest.raises(ModelConfigError, match=message) as e:
        ModelConfig.from_hf(json.loads(json.dumps(cfg)), source="cfg")
    assert "\n" not in str(e.value)


def test_engine_max_model_len_defaults_to_the_scaled_length(tiny_root):
    """build_engine: max_model_len defaults to, and may not pass, the dynamic model's scaled length
    (max_position_embeddings 16 * factor 4)."""
    from jaxllm.config import EngineConfig
    from jaxllm.engine.factory import build_engine

    path = make_tiny_hf("llama_dynamic", tiny_root)
    engine = build_engine(EngineConfig(model=path), compile_cache=False, warmup=False)
    assert engine.config.max_model_len == 64
    with pytest.raises(ValueError, match=r"^max_model_len=65 is invalid: the model supports at most 64 positions$"):
        build_engine(EngineConfig(model=path, max_model_len=65), compile_cache=False, warmup=False)
