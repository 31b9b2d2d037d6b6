"""Model parity with HF transformers on tiny random checkpoints of every supported architecture."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints import load_checkpoint
from jaxllm.models.dense_batch import prefill_batch
from jaxllm.models.llama import build_model
from pallas_kernels import KVCache
from tests.engine_checks import logits_of
from tests.models.hf_tiny import TINY_CONFIGS, hf_logits, make_tiny_hf


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tiny_hf"))


def run_model(path, seqs, block_size=8):
    ckpt = load_checkpoint(path)
    c = ckpt.config
    model = build_model(c, ckpt.params, jnp.float32)
    logits = logits_of(model, c, seqs, block_size)  # [sum(len), V]: one jitted forward
    offsets = np.cumsum([0] + [len(s) for s in seqs])
    return ckpt, [logits[offsets[i]:offsets[i + 1]] for i in range(len(seqs))]


def assert_logits_match_hf(path, lens=(1, 7, 33, 70)):
    """Random prompts (seed 0) of `lens` tokens, prefilled in one ragged batch: our logits equal HF
    transformers' per-sequence forwards within 1e-4, the reference not degenerate.
    -> [(ours, HF's)] per prompt."""
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 256, n).tolist() for n in lens]  # different lengths, one batch
    _, ours = run_model(path, seqs)
    pairs = list(zip(ours, hf_logits(path, seqs)))
    for got, want in pairs:
        assert got.shape == want.shape
        assert np.abs(want).max() > 0.05, "reference logits are degenerate: the comparison would be weak"
        np.testing.assert_array_less(np.abs(got - want).max(), 1e-4)
    return pairs


@pytest.mark.parametrize("layer_loop", ["scan", "unroll"])
@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_logits_match_transformers(arch, layer_loop, tiny_root, monkeypatch):
    monkeypatch.setenv("JAXLLM_LAYER_LOOP", layer_loop)
    for got, want in assert_logits_match_hf(make_tiny_hf(arch, tiny_root)):
        assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.99


def test_config_switches_are_read(tiny_root):
    """Each tiny architecture really exercises its special feature (not silently a plain llama)."""
    cfgs = {a: load_checkpoint(make_tiny_hf(a, tiny_root)).config for a in ("llama3_rope", "mistral", "qwen2", "qwen3")}
    assert cfgs["llama3_rope"].rope_scaling_dict["rope_type"] == "llama3"
    assert cfgs["mistral"].sliding_window == 12 and cfgs["mistral"].head_dim == 24
    assert cfgs["qwen2"].attention_bias and cfgs["qwen2"].tie_word_embeddings
    assert cfgs["qwen3"].qk_norm and cfgs["qwen3"].head_dim == 32


@pytest.mark.parametrize("layer_loop", ["scan", "unroll"])
def test_layer_loop_lowering(layer_loop, tiny_root, monkeypatch):
    """scan: the lowered step holds one layer body whatever the depth (a while loop); unroll: no
    loop over layers, and every layer's weights are separate arguments of the program."""
    monkeypatch.setenv("JAXLLM_LAYER_LOOP", layer_loop)
    path = make_tiny_hf("llama", tiny_root)
    ckpt = load_checkpoint(path)
    c = ckpt.config
    model = build_model(c, ckpt.params, jnp.float32)
    tokens, positions, meta, nb = prefill_batch([[1, 2, 3]], 8)
    cache = KVCache.zeros(c.num_layers, nb, 8, c.num_kv_heads, c.head_dim, jnp.float32)
    assert model.layer_loop == layer_loop
    lowered = jax.jit(lambda *a: model(*a)).lower(tokens, positions, cache, meta)
    text = lowered.as_text()
    qkv = c.num_heads + 2 * c.num_kv_heads  # q, k, v fused into one weight (models/fusion.py)
    stacked_wqkv = "tensor<%dx%dx%dx%dx" % (c.num_layers, c.hidden_size, qkv, c.head_dim)
    layer_whiles = [ln for ln in text.splitlines() if "stablehlo.while" in ln and stacked_wqkv in ln]
    from flax import nnx

    names = {p[-1] for p, _ in nnx.to_flat_state(nnx.state(model))}
    assert {"wqkv", "w_gate_up"} <= names and not names & {"wq", "wk", "wv", "w_gate", "w_up"}, names
    if layer_loop == "scan":
        assert layer_whiles  # the stacked weights ride through the layer loop
    else:
        assert stacked_wqkv not in text  # no stacked weight anywhere in the program
        wqkv = [x for p, x in nnx.to_flat_state(nnx.state(model)) if p[-1] == "wqkv"]
        assert len(wqkv) == c.num_layers and all(x.shape == (c.hidden_size, qkv, c.head_dim) for x in wqkv)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_stacked_matmul_path_matches_transformers(arch, tiny_root, monkeypatch):
    """JAXLLM_STACKED_MATMUL=1 (GPU experiment; interpret mode here): the projections of a step of
    <= 64 tokens read the stacked weights in place through the Pallas kernel; logits still match HF."""
    import jaxllm.models.projections as projections

    calls = []
    real = projections.stacked_matmul
    monkeypatch.setattr(projections, "stacked_matmul", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    monkeypatch.setenv("JAXLLM_STACKED_MATMUL", "1")
    monkeypatch.setenv("JAXLLM_LAYER_LOOP", "scan")  # the experiment reads the stacked weights
    path = make_tiny_hf(arch, tiny_root)
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, 256, n).tolist() for n in (1, 7, 33)]  # 41 tokens: the kernel's range
    _, ours = run_model(path, seqs)
    assert len(calls) >= 3, calls  # qkv/o/gate_up (fused) at least (down's K=96 is not a multiple of 64)
    E = load_checkpoint(path).config.hidden_size
    assert (E, 2 * 96) in [tuple(s[1:]) for s in calls], calls  # the fused gate/up weight [L, E, 2F]
    for got, want in zip(ours, hf_logits(path, seqs)):
        np.testing.assert_array_less(np.abs(got - want).max(), 1e-4)
