"""jaxllm/models/moe.py: routing and the grouped (ragged_dot) experts against a dense pure-jnp reference
written here (every expert on every token, a numpy top-k), and the MoE config fields and refusals."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.models.config import ModelConfig, ModelConfigError
from jaxllm.models.moe import dense_experts, gather_experts, grouped_experts, moe_mlp, route


def reference_moe(x, w_router, w_gate, w_up, w_down, k, renorm):
    """numpy: softmax routing, top-k by a stable sort (lower index wins ties), each token's k experts
    run one by one and weight-summed. w_gate/w_up [X, E, F], w_down [X, F, E]."""
    x = np.asarray(x, np.float64)
    logits = x @ np.asarray(w_router, np.float64)  # [T, X]
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        top = np.argsort(-p[t], kind="stable")[:k]
        w = p[t, top] / (p[t, top].sum() if renorm else 1.0)
        for e, we in zip(top, w):
            g, u = x[t] @ w_gate[e], x[t] @ w_up[e]
            out[t] += we * ((g / (1 + np.exp(-g)) * u) @ w_down[e])
    return out


def weights(rng, X, E, F, scale=0.3):
    f = lambda *s: rng.normal(0, scale, s).astype(np.float32)  # noqa: E731
    return f(E, X), f(X, E, F), f(X, E, F), f(X, F, E)


@pytest.mark.parametrize("T,X,k,renorm", [(1, 4, 2, True), (7, 8, 2, False), (33, 8, 3, True), (5, 4, 4, True),
                                           (9, 6, 1, False)])
def test_moe_matches_reference(T, X, k, renorm):
    rng = np.random.default_rng(T * 100 + X)
    E, F = 16, 12
    x = rng.normal(0, 1, (T, E)).astype(np.float32)
    wr, wg, wu, wd = weights(rng, X, E, F)
    gate_up = np.concatenate([wg, wu], axis=-1)  # [X, E, 2F]: the tp=1 fused layout
    want = reference_moe(x, wr, wg, wu, wd, k, renorm)
    for impl in ("grouped", "dense", "gather", "loop"):
        got = np.asarray(jax.jit(lambda *a: moe_mlp(*a, k, renorm, impl=impl))(x, wr, gate_up, wd))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=impl)


def test_route_picks_top_k_and_renormalizes():
    logits_w = np.eye(4, dtype=np.float32)  # router = identity: logits = x
    x = np.array([[0.0, 3.0, 1.0, 2.0]], np.float32)
    w, e = route(x, logits_w, 2, renormalize=False)
    p = np.exp(x[0]) / np.exp(x[0]).sum()
    assert e.tolist() == [[1, 3]]
    np.testing.assert_allclose(np.asarray(w[0]), p[[1, 3]], rtol=1e-6)
    w, _ = route(x, logits_w, 2, renormalize=True)
    np.testing.assert_allclose(np.asarray(w[0]), p[[1, 3]] / p[[1, 3]].sum(), rtol=1e-6)


def test_ties_and_all_tokens_to_one_expert():
    """A zero router: every expert ties, so every token goes to experts 0..k-1 (the lower index wins,
    as in the reference); a router that prefers expert 3 for every token: one group holds all rows,
    the others are empty."""
    rng = np.random.default_rng(5)
    T, X, E, F, k = 11, 6, 16, 8, 2
    x = rng.normal(0, 1, (T, E)).astype(np.float32)
    _, wg, wu, wd = weights(rng, X, E, F)
    gate_up = np.concatenate([wg, wu], axis=-1)
    zero = np.zeros((E, X), np.float32)
    _, experts = route(x, zero, k, True)
    assert (np.asarray(experts) == [0, 1]).all()
    one = np.zeros((E, X), np.float32)
    one[:, 3] = 50.0  # logits of expert 3 dominate wherever sum(x) > 0 ...
    x = np.abs(x)  # ... which holds for every token here
    _, experts = route(x, one, 1, True)
    assert (np.asarray(experts) == 3).all()
    for router, kk in ((zero, k), (one, 1), (one, 2)):
        want = reference_moe(x, router, wg, wu, wd, kk, True)
        w, e = route(x, router, kk, True)
        got = np.asarray(grouped_experts(jnp.asarray(x), w, e, jnp.asarray(gate_up), jnp.asarray(wd)))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(dense_experts(x, w, e, gate_up, wd)), want, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(gather_experts(x, w, e, gate_up, wd)), want, rtol=1e-4, atol=1e-5)


def test_grouped_computes_only_routed_rows():
    """The grouped path's matmuls are ragged_dots over T*k rows (not T*X): its program holds two
    ragged_dot_generals, a [T*k, 2F] one, and no [T, X, F] intermediate (the dense path's). (How
    ragged_dot lowers is the backend's: on GPU a grouped GEMM, tests/pallas_kernels/test_moe_export.py.)"""
    T, X, E, F, k = 5, 8, 16, 12, 2
    args = (jnp.ones((T, E)), jnp.ones((E, X)), jnp.ones((X, E, 2 * F)), jnp.ones((X, F, E)))
    text = str(jax.make_jaxpr(lambda *a: moe_mlp(*a, k, True, impl="grouped"))(*args))
    assert text.count("ragged_dot_general") == 2 and f"f32[{T * k},{2 * F}]" in text
    assert f"f32[{X},{T},{F}]" not in text
    dense = str(jax.make_jaxpr(lambda *a: moe_mlp(*a, k, True, impl="dense"))(*args))
    assert "ragged_dot" not in dense and f"f32[{X},{T},{2 * F}]" in dense


def test_loop_reads_only_routed_experts():
    """The loop path (expert parallelism's small batches) skips an expert no token is routed to: with its
    weights NaN (never routed: its router column -1e9), the output is finite and the reference's; the dense
    path, which computes it at weight 0, is NaN."""
    rng = np.random.default_rng(7)
    T, X, E, F, k = 3, 6, 16, 12, 2
    x = rng.normal(0, 1, (T, E)).astype(np.float32)
    wr, wg, wu, wd = weights(rng, X, E, F)
    x[:, 0] = 1.0  # a constant feature, so that
    wr[:, 4], wr[0, 4] = 0.0, -1e4  # expert 4's router logit is -1e4 for every token
    want = reference_moe(x, wr, wg, wu, wd, k, True)
    gate_up = np.concatenate([wg, wu], axis=-1)
    gate_up[4], wd[4] = np.nan, np.nan
    run = lambda impl: np.asarray(jax.jit(lambda *a: moe_mlp(*a, k, True, impl=impl))(x, wr, gate_up, wd))  # noqa: E731
    np.testing.assert_allclose(run("loop"), want, rtol=1e-4, atol=1e-5)
    assert np.isnan(run("dense")).all()


def test_auto_is_gather_or_dense_on_cpu_grouped_elsewhere(monkeypatch):
    from jaxllm.models.moe import moe_impl

    monkeypatch.delenv("JAXLLM_MOE", raising=False)
    assert moe_impl() == "dense"  # this machine: CPU
    assert moe_impl(rows=2, num_experts=8) == "gather" and moe_impl(rows=8, num_experts=8) == "dense"
    assert moe_impl(rows=2, num_experts=8, expert_parallel=True) == "loop"  # only a device's routed experts
    assert moe_impl(rows=8, num_experts=8, expert_parallel=True) == "dense"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert moe_impl() == "grouped" and moe_impl("dense") == "dense"


def test_bad_impl_env_is_one_line(monkeypatch):
    monkeypatch.setenv("JAXLLM_MOE", "sparse")
    with pytest.raises(ValueError, match="JAXLLM_MOE='sparse' is invalid"):
        moe_mlp(jnp.ones((1, 4)), jnp.ones((4, 2)), jnp.ones((2, 4, 4)), jnp.ones((2, 2, 4)), 1, True)


_BASE = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=2)


def test_config_fields():
    c = ModelConfig.from_hf(dict(_BASE, model_type="mixtral", num_local_experts=4, num_experts_per_tok=2,
                                 sliding_window=None, router_jitter_noise=0.1))
    assert (c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size, c.norm_topk_prob) == (4, 2, 32, True)
    assert c.sliding_window is None and c.mlp_size == 32
    q = ModelConfig.from_hf(dict(_BASE, model_type="qwen3_moe", num_experts=8, num_experts_per_tok=2,
                                 moe_intermediate_size=8))
    assert (q.num_experts, q.moe_intermediate_size, q.norm_topk_prob, q.qk_norm) == (8, 8, False, True)
    # params: attention + 8 experts x 3 x 16 x 8 + router; active: 2 of the 8 experts
    assert q.num_params - q.num_active_params == 6 * 3 * 16 * 8


@pytest.mark.parametrize("extra,field", [
    (dict(decoder_sparse_step=2), "decoder_sparse_step=2"),
    (dict(mlp_only_layers=[0]), "mlp_only_layers=[0]"),
    (dict(shared_expert_intermediate_size=64), "shared_expert_intermediate_size=64"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok=9"),
    (dict(num_experts=0), "num_experts=0"),
])
def test_config_refusals_name_the_field(extra, field):
    cfg = dict(_BASE, model_type="qwen3_moe", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=8)
    with pytest.raises(ModelConfigError, match=field.replace("[", r"\[").replace("]", r"\]")) as e:
        ModelConfig.from_hf({**cfg, **extra})
    assert "\n" not in str(e.value)


def test_moe_forward_exports_for_cuda(monkeypatch):
    """The whole tiny-mixtral forward (bf16, unrolled layers: the GPU default) exports for CUDA, its
    experts as XLA ragged dots (chlo.ragged_dot composites, the grouped GEMM on GPU): two per layer, of
    T*k rows, and no dense [T, X, ...] expert intermediate."""
    from checkpoints.dummy import dummy_config, dummy_params
    from jaxllm.models.llama import build_model
    from tests.models.moe_export import export_step_for_cuda, ragged_dots

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    c = dummy_config("tiny-mixtral")
    model = build_model(c, dummy_params(c, jnp.bfloat16), jnp.bfloat16, layer_loop="unroll",
                        attention_impl="reference")
    text = export_step_for_cuda(model, c)  # T = 7 tokens
    T, k, X, E, F = 7, c.num_experts_per_tok, c.num_experts, c.hidden_size, c.moe_intermediate_size
    dots = ragged_dots(text)
    want = {(f"tensor<{T * k}x{E}xbf16>, tensor<{X}x{E}x{2 * F}xbf16>, tensor<{X}xi32>",
             f"tensor<{T * k}x{2 * F}xbf16>"),
            (f"tensor<{T * k}x{F}xbf16>, tensor<{X}x{F}x{E}xbf16>, tensor<{X}xi32>", f"tensor<{T * k}x{E}xbf16>")}
    assert len(dots) == 2 * c.num_layers and set(dots) == want, dots
    assert f"tensor<{X}x{T}x{F}x" not in text and f"tensor<{X}x{T}x{2 * F}x" not in text


@pytest.mark.parametrize("preset,total,active", [("mixtral-8x7b", 46.7e9, 12.9e9), ("qwen3-30b-a3b", 30.5e9, 3.3e9)])
def test_moe_presets_have_the_published_sizes(preset, total, active):
    from checkpoints.dummy import dummy_config

    c = dummy_config(preset)
    assert abs(c.num_params / total - 1) < 0.02 and abs(c.num_active_params / active - 1) < 0.03, c


def test_moe_unrolls_the_layer_loop_on_cpu(monkeypatch):
    from checkpoints.dummy import dummy_config
    from jaxllm.models.llama import layer_loop_mode

    monkeypatch.delenv("JAXLLM_LAYER_LOOP", raising=False)
    assert layer_loop_mode(None, dummy_config("tiny-mixtral")) == "unroll"
    assert layer_loop_mode(None, dummy_config("tiny-llama")) == "scan"
    assert layer_loop_mode("scan", dummy_config("tiny-mixtral")) == "scan"
