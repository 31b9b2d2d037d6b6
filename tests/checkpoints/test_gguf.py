"""GGUF loader: names, rotary un-permutation, config from metadata and every quant type the gguf
package can write, checked against transformers on the source HF model."""
import numpy as np
import pytest

from checkpoints import load_checkpoint
from checkpoints.hf import load_hf_dir
from jaxllm.models import prequantized
from jaxllm.models.quant import QuantWeight, dequantize
from tests.checkpoints.gguf_tiny import write_gguf_from_hf
from tests.models.hf_tiny import hf_logits, make_tiny_hf
from tests.models.test_parity_hf import run_model

SEQS = [[5, 9, 200, 17, 3, 3, 64], list(range(40, 90))]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tiny_gguf"))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "granite"])
def test_f32_gguf_matches_transformers(arch, tiny_root):
    """phi3: fused attn_qkv / ffn_up split, partial rotary from rope.dimension_count, the sliding window;
    granite: its four scalars from the metadata, Q/K un-permuted as llama's."""
    hf_dir = make_tiny_hf(arch, tiny_root)
    path = write_gguf_from_hf(hf_dir, f"{tiny_root}/{arch}.gguf")
    ckpt, ours = run_model(path, SEQS)
    assert ckpt.format == "gguf" and ckpt.config.architecture == arch
    for got, want in zip(ours, hf_logits(hf_dir, SEQS)):
        np.testing.assert_array_less(np.abs(got - want).max(), 1e-4)


# Per-type bound on max |w - w_q| relative to max |w| (block quantization error).
QUANT_TOL = {"F16": 1e-3, "BF16": 1e-2, "Q8_0": 1e-2, "Q5_0": 0.07, "Q5_1": 0.07, "Q4_0": 0.15, "Q4_1": 0.15}


@pytest.mark.parametrize("qtype", sorted(QUANT_TOL))
def test_quantized_gguf_dequantizes_close_to_source(qtype, tiny_root):
    hf_dir = make_tiny_hf("llama", tiny_root)
    path = write_gguf_from_hf(hf_dir, f"{tiny_root}/llama-{qtype}.gguf", qtype)
    got = load_checkpoint(path).params
    prequantized.dequantize_all(got, "test")  # Q8_0 projections come as int8 + block scales
    _, want = load_hf_dir(hf_dir)
    for name in ("layers.wq", "layers.wk", "layers.w_down", "embed"):
        err = np.abs(got[name] - want[name]).max() / np.abs(want[name]).max()
        assert err < QUANT_TOL[qtype], (name, err)
        assert err > 0 or qtype in ("F16",), "the weights were not quantized at all"
    _, ours = run_model(path, SEQS)
    ref = hf_logits(hf_dir, SEQS)
    agree = np.mean([(o.argmax(-1) == r.argmax(-1)).mean() for o, r in zip(ours, ref)])
    assert agree > (0.9 if qtype.startswith(("F", "BF", "Q8")) else 0.5)


def test_smollm2_gguf_config_from_metadata():
    ckpt = load_checkpoint("smollm2-135m")
    c = ckpt.config
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size) == (30, 9, 3, 64, 576)
    assert c.tie_word_embeddings and c.rope_theta == 100000.0 and c.vocab_size == 49152
    assert "lm_head" not in ckpt.params
    assert ckpt.params["embed"].dtype == np.float32
    wq = ckpt.params["layers.wq"]  # the file's Q4_1, kept 4-bit on every backend (JAXLLM_GGUF_Q4=auto)
    assert isinstance(wq, QuantWeight) and wq.method == "int4" and wq.offset is not None
    assert np.isfinite(dequantize(wq, 1, stacked=True, dtype=np.float32, xp=np)).all()


def test_phi3_longrope_gguf_refused(tiny_root):
    """llama.cpp stores Phi-3 longrope as rope_factors_long / rope_factors_short tensors: refused in one line."""
    from checkpoints.errors import CheckpointError

    hf_dir = make_tiny_hf("phi3", tiny_root)
    path = write_gguf_from_hf(hf_dir, f"{tiny_root}/phi3-longrope.gguf",
                              extra_tensors={"rope_factors_long.weight": np.ones(4),
                                             "rope_factors_short.weight": np.ones(4)})
    with pytest.raises(CheckpointError, match=r"^\S+phi3-longrope\.gguf: rope_factors_long/rope_factors_short "
                                              r"\(Phi-3 longrope in GGUF\) are not supported; load the HF checkpoint"):
        load_checkpoint(path)


@pytest.mark.parametrize("name", ["gemma2_gguf", "gemma3_gguf"])
def test_gemma_gguf_matches_transformers(name, tiny_root):
    """llama.cpp's Gemma 2 / 3 layout (convert_hf_to_gguf.py's Gemma2Model / Gemma3Model): every norm stored
    as 1 + w, the sandwich norms as post_attention_norm / ffn_norm / post_ffw_norm, soft-caps, window and the
    full layers' linear rope in the metadata. Logits equal HF's within 1e-4 past the 12-token window and the
    config equals the HF checkpoint's (but the token ids the tiny GGUF has no tokenizer for, and rms_norm_eps
    which GGUF stores as float32)."""
    import dataclasses

    import gguf

    hf_dir = make_tiny_hf(name, tiny_root)
    path = write_gguf_from_hf(hf_dir, f"{tiny_root}/{name}.gguf")
    stored = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}
    assert {"blk.0.post_attention_norm.weight", "blk.0.ffn_norm.weight", "blk.0.post_ffw_norm.weight"} <= set(stored)
    _, hf_params = load_hf_dir(hf_dir)
    np.testing.assert_allclose(stored["output_norm.weight"], hf_params["final_norm"] + 1, rtol=0, atol=1e-6)
    ckpt, ours = run_model(path, SEQS)
    want = load_checkpoint(hf_dir).config
    no_ids = dict(bos_token_id=None, eos_token_ids=(), rms_norm_eps=1e-6)
    assert dataclasses.replace(ckpt.config, **no_ids) == dataclasses.replace(want, **no_ids)
    assert ckpt.config.sliding_window == 12 and ckpt.config.layer_types.count("full_attention") == 1
    for got, want_logits in zip(ours, hf_logits(hf_dir, SEQS)):
        np.testing.assert_array_less(np.abs(got - want_logits).max(), 1e-4)


def _metadata_only_gguf(path: str, arch: str, layers: int, hidden: int, heads: int, head_dim: int) -> str:
    import gguf

    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(layers)
    w.add_context_length(8192)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(4 * hidden)
    w.add_head_count(heads)
    w.add_head_count_kv(heads // 2)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(256)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("arch,layers,hidden,heads,head_dim,scalar", [
    ("gemma2", 46, 4608, 32, 128, 144),  # Gemma 2 27B: hidden / heads (its HF query_pre_attn_scalar 144)
    ("gemma2", 42, 3584, 16, 256, 256),  # 9B: head_dim
    ("gemma3", 62, 5376, 32, 128, 168),  # Gemma 3 27B: hidden / heads (HF's 168)
    ("gemma3", 34, 2560, 8, 256, 256),   # 4B: head_dim
])
def test_gemma_gguf_query_scale_and_defaults(arch, layers, hidden, heads, head_dim, scalar, tmp_path):
    """No GGUF key carries query_pre_attn_scalar: llama.cpp takes hidden / heads for the 27B models (known by
    their layer count) and head_dim otherwise, which is each real model's HF value. Absent keys read as llama.cpp
    and HF default them: Gemma 2's soft-caps 50 / 30 and window 4096, Gemma 3's sliding rope base 10000."""
    from checkpoints.gguf_loader import gguf_config, open_gguf

    c = gguf_config(open_gguf(_metadata_only_gguf(str(tmp_path / "m.gguf"), arch, layers, hidden, heads, head_dim)),
                    "m.gguf")
    assert c.attention_scale == scalar ** -0.5 and c.head_dim == head_dim and c.norm_offset and c.sandwich_norms
    assert c.sliding_window == 4096 and c.tie_word_embeddings
    if arch == "gemma2":
        assert (c.attn_logit_softcap, c.final_logit_softcap) == (50.0, 30.0)
        assert c.layer_types[:2] == ("sliding_attention", "full_attention")
    else:
        assert c.rope_local_theta == 10000.0 and c.qk_norm and c.final_logit_softcap is None
        assert c.layer_types[:6] == ("sliding_attention",) * 5 + ("full_attention",)
