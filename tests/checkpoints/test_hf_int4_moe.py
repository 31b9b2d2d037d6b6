"""AWQ / GPTQ / compressed-tensors pack-quantized mixture-of-experts checkpoints (checkpoints/hf_int4_experts.py):
tiny Mixtral / Qwen3-MoE / Qwen2-MoE checkpoints packed here word by word (tests/checkpoints/int4_tiny.py:
attention projections, every expert, Qwen2-MoE's shared expert; router and LM head full precision) load
with their experts kept 4-bit, exactly the weights they stand for ((q - z) * s), and their logits equal
the fp32 reference checkpoint's on each expert path; an act-order expert is refused in one line."""
import os

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from checkpoints import load_checkpoint
from checkpoints.errors import CheckpointError
from jaxllm.models.llama import build_model
from jaxllm.models.quant import QuantWeight, dequantize_experts
from tests.checkpoints.int4_tiny import write_int4
from tests.engine_checks import logits_of
from tests.models.hf_tiny import make_tiny_hf

# tiny configs: hidden 64, mixtral F 96 (4 experts), qwen3_moe / qwen2_moe F 48 (8 experts), qwen2_moe's shared
# expert 80; groups of 32 (mixtral: 2 along E, 3 along F) or 16
CASES = {  # name -> (arch, method, group, sym, gptq checkpoint_format)
    "mixtral-awq": ("mixtral", "awq", 32, False, "gptq"),
    "qwen3-gptq-sym": ("qwen3_moe", "gptq", 16, True, "gptq"),
    "qwen2-ct-asym": ("qwen2_moe", "compressed", 16, False, "gptq"),
}
SEQS = [np.random.default_rng(3).integers(0, 256, n).tolist() for n in (5, 40)]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("int4moe"))


def make(root: str, name: str) -> tuple[str, str]:
    arch, method, group, sym, fmt = CASES[name]
    return write_int4(make_tiny_hf(arch, root), os.path.join(root, name), method, group, sym=sym, fmt=fmt)


@pytest.mark.parametrize("name", list(CASES))
def test_experts_kept_4bit_and_logits_equal_reference(name, root, monkeypatch):
    ck_dir, ref_dir = make(root, name)
    ck, ref = load_checkpoint(ck_dir), load_checkpoint(ref_dir)
    sym = CASES[name][3]
    for p in ("layers.we_gate", "layers.we_up", "layers.we_down"):
        w = ck.params[p]
        assert isinstance(w, QuantWeight) and w.method == "int4" and (w.offset is None) == sym, p
        assert w.q.shape == np.shape(ref.params[p]) and w.scale.shape[2] == w.q.shape[2] // CASES[name][2]
        np.testing.assert_array_equal(np.asarray(dequantize_experts(w, np.float32, np)), ref.params[p], err_msg=p)
    if CASES[name][0] == "qwen2_moe":  # the shared expert (dense names) dequantized to fp32 on load
        assert not isinstance(ck.params["layers.w_down"], QuantWeight)
        np.testing.assert_array_equal(ck.params["layers.w_down"], ref.params["layers.w_down"])
    c = ck.config
    model = build_model(c, dict(ck.params), jnp.float32, layer_loop="unroll", attention_impl="reference")
    full = build_model(c, dict(ref.params), jnp.float32, layer_loop="unroll", attention_impl="reference")
    assert model.quantization == "int4"
    monkeypatch.setenv("JAXLLM_MOE", "dense")
    want = logits_of(full, c, SEQS)  # fp32: the paths agree within 1e-5 (tests/models/test_moe.py)
    assert np.abs(want).max() > 0.5
    for impl in (("grouped", "dense", "gather") if name == "mixtral-awq" else ("gather",)):
        monkeypatch.setenv("JAXLLM_MOE", impl)
        got = logits_of(model, c, SEQS)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max(), err_msg=impl)


def test_quantization_int8_requantizes_the_experts(root):
    """--quantization int8 on a 4-bit MoE checkpoint: the experts (like the projections) dequantized, then
    quantized per expert and output channel."""
    ck_dir, ref_dir = make(root, "mixtral-awq")
    ck = load_checkpoint(ck_dir)
    model = build_model(ck.config, dict(ck.params), jnp.float32, quantization="int8", layer_loop="unroll")
    w = model.layers[1].arrays()["we_down"]  # [X, F, E], scale [X, E]
    assert w.q.dtype == jnp.int8 and w.scale.shape == (ck.config.num_experts, ck.config.hidden_size)
    want = load_checkpoint(ref_dir).params["layers.we_down"][1]  # what the 4-bit checkpoint stands for
    s = np.asarray(w.scale)[:, None, :]
    assert np.all(np.abs(np.asarray(w.q, np.float32) * s - want) <= s * 0.5 + 1e-7)  # int8 rounding of it


def test_act_order_expert_is_refused(root, tmp_path):
    ck_dir, _ = make(root, "qwen3-gptq-sym")
    bad = str(tmp_path / "actorder")
    os.makedirs(bad)
    for f in os.listdir(ck_dir):
        if f != "model.safetensors":
            os.symlink(os.path.join(ck_dir, f), os.path.join(bad, f))
    t = load_file(os.path.join(ck_dir, "model.safetensors"))
    name = "model.layers.1.mlp.experts.5.down_proj.g_idx"
    t[name] = t[name][::-1].copy()
    save_file(t, os.path.join(bad, "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"tensor model.layers.1.mlp.experts.5.down_proj.g_idx is not "
                                              r"i // group_size \(an act-order checkpoint\)") as e:
        load_checkpoint(bad)
    assert "\n" not in str(e.value)
