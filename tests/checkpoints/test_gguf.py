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
