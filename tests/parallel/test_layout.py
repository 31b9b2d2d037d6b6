"""The sharding table, fit checks and errors, and parameter placement (no engine)."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from checkpoints.dummy import dummy_config
from jaxllm.config import EngineConfig
from jaxllm.engine.factory import build_engine
from jaxllm.models.fusion import unfuse_numpy
from jaxllm.models.llama import MODEL_AXES, PARAM_AXES, model_param_shapes, param_shapes
from jaxllm.parallel import TPLayout, logical_to_spec, make_mesh, valid_tp_sizes

TINY = dummy_config("tiny-llama")  # 8 heads / 4 kv heads


def test_megatron_specs():
    assert logical_to_spec(PARAM_AXES["layers.wq"]) == P(None, None, "tp", None)  # column-parallel
    assert logical_to_spec(PARAM_AXES["layers.wk"]) == P(None, None, "tp", None)
    assert logical_to_spec(PARAM_AXES["layers.w_gate"]) == P(None, None, "tp")
    assert logical_to_spec(PARAM_AXES["layers.wo"]) == P(None, "tp", None, None)  # row-parallel
    assert logical_to_spec(PARAM_AXES["layers.w_down"]) == P(None, "tp", None)
    assert logical_to_spec(PARAM_AXES["embed"]) == P("tp", None)  # vocab-parallel
    assert logical_to_spec(PARAM_AXES["lm_head"]) == P(None, "tp")
    assert logical_to_spec(PARAM_AXES["layers.input_norm"]) == P(None, None)
    assert logical_to_spec(MODEL_AXES["layers.wqkv"]) == P(None, None, "tp", None)  # fused, shard-major
    assert logical_to_spec(MODEL_AXES["layers.bqkv"]) == P(None, "tp", None)
    assert logical_to_spec(MODEL_AXES["layers.w_gate_up"]) == P(None, None, "tp")
    with pytest.raises(KeyError, match="'bogus'"):
        logical_to_spec(("bogus",))


def test_plans():
    assert valid_tp_sizes(TINY) == [1, 2, 4, 8]
    plans = {tp: TPLayout.plan(TINY, tp) for tp in (2, 4, 8)}
    assert [plans[t].kv_repeat for t in (2, 4, 8)] == [1, 1, 2]
    assert plans[8].model_config(TINY).num_kv_heads == 8
    assert all(p.shard_vocab for p in plans.values())
    smol = dummy_config("smollm2-135m")  # 9 heads / 3 kv heads
    assert TPLayout.plan(smol, 3).kv_repeat == 1
    odd_vocab = dataclasses.replace(TINY, vocab_size=510)
    assert not TPLayout.plan(odd_vocab, 4).shard_vocab  # 510 % 4: embed/lm_head replicated


def test_errors_name_the_numbers():
    with pytest.raises(ValueError, match=r"tensor_parallel_size=5 .*num_attention_heads=8 .*\[1, 2, 4, 8\]"):
        TPLayout.plan(TINY, 5)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=16 .*16 devices .*only 8 cpu"):
        make_mesh(16)
    h24 = dataclasses.replace(TINY, num_heads=24, num_kv_heads=3)  # q heads of a device span 2 kv heads
    with pytest.raises(ValueError, match=r"tensor_parallel_size=8 .*num_key_value_heads=3"):
        TPLayout.plan(h24, 8)
    with pytest.raises(ValueError, match=r"intermediate_size=100 is not divisible by 8"):
        TPLayout.plan(dataclasses.replace(TINY, intermediate_size=100), 8)
    # Through the engine, before any weights load.
    with pytest.raises(ValueError, match=r"tensor_parallel_size=5 does not fit.*num_attention_heads=8"):
        build_engine(EngineConfig(model="dummy:tiny-llama", tensor_parallel_size=5), compile_cache=False)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=16 .*only 8 cpu device"):
        build_engine(EngineConfig(model="dummy:tiny-llama", tensor_parallel_size=16), compile_cache=False)


def own_slices(params: dict, d: int, tp: int, rep: int) -> dict[str, np.ndarray]:
    """What device d of tp must hold of each fused weight, from the unfused checkpoint params: its
    q heads, then its (repeated) k heads, then its v heads; its gate columns, then its up columns."""
    def heads(x, repeat=1):  # [.., n, D] → device d's heads
        x = np.repeat(x, repeat, axis=-2)
        n = x.shape[-2] // tp
        return x[..., d * n:(d + 1) * n, :]

    def cols(x):
        n = x.shape[-1] // tp
        return x[..., d * n:(d + 1) * n]

    out = {"layers.wqkv": np.concatenate([heads(params["layers.wq"]), heads(params["layers.wk"], rep),
                                          heads(params["layers.wv"], rep)], axis=-2),
           "layers.w_gate_up": np.concatenate([cols(params["layers.w_gate"]), cols(params["layers.w_up"])], axis=-1)}
    if "layers.bq" in params:
        out["layers.bqkv"] = np.concatenate([heads(params["layers.bq"]), heads(params["layers.bk"], rep),
                                             heads(params["layers.bv"], rep)], axis=-2)
    return out


@pytest.mark.parametrize("tp,bias,split", [(2, False, False), (8, True, False), (4, True, True), (8, False, True)])
def test_place_params_fuses_per_shard_and_replicates_kv(tp, bias, split):
    cfg0 = dataclasses.replace(TINY, attention_bias=bias)
    rng = np.random.default_rng(0)
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in param_shapes(cfg0).items()}
    layout = TPLayout.plan(cfg0, tp)
    placed = layout.place_params(cfg0, dict(params), jnp.float32, split_layers=split)
    cfg = layout.model_config(cfg0)
    shapes = model_param_shapes(cfg)
    assert set(placed) == set(shapes) and "layers.wq" not in placed
    assert ("layers.bqkv" in placed) == bias
    for name, value in placed.items():
        layers = value if isinstance(value, list) else [value]
        if isinstance(value, list):
            assert len(value) == cfg.num_layers and all(a.shape == shapes[name][1:] for a in value)
        else:
            assert value.shape == shapes[name]
        spec = tuple(layout.spec(MODEL_AXES[name]))[1 if split and name.startswith("layers.") else 0:]
        for arr in layers:
            expected = tuple(n // tp if ax == "tp" else n for n, ax in zip(arr.shape, spec + (None,) * 8))
            assert len(arr.addressable_shards) == tp
            assert all(s.data.shape == expected for s in arr.addressable_shards), (name, expected)
    # Device d's shard of each fused weight is exactly its own q/k/v (gate/up) slices.
    for d in range(tp):
        for name, want in own_slices(params, d, tp, layout.kv_repeat).items():
            value = placed[name]
            if split:
                got = np.stack([np.asarray(a.addressable_shards[d].data) for a in value])
            else:
                got = np.asarray(value.addressable_shards[d].data)
            np.testing.assert_array_equal(got, want, err_msg=f"{name} device {d}")
    # kv head of q head h is h // (H/K) in the checkpoint and h // (H/K') in the placed model: same weights.
    H, K, K2 = TINY.num_heads, TINY.num_kv_heads, cfg.num_kv_heads
    wqkv = np.stack([np.asarray(a) for a in placed["layers.wqkv"]]) if split else np.asarray(placed["layers.wqkv"])
    wq, wk, wv = unfuse_numpy(wqkv, (H, K2, K2), -2, tp)
    np.testing.assert_array_equal(wq, params["layers.wq"])
    for h in range(H):
        np.testing.assert_array_equal(wk[:, :, h // (H // K2)], params["layers.wk"][:, :, h // (H // K)])
        np.testing.assert_array_equal(wv[:, :, h // (H // K2)], params["layers.wv"][:, :, h // (H // K)])


def test_dummy_weights_born_sharded():
    from checkpoints import load_checkpoint

    layout = TPLayout.plan(TINY, 8)  # kv heads replicated: wk/wv load replicated, then repeat
    params = load_checkpoint("dummy:tiny-llama", dtype=jnp.float32, shardings=layout.load_shardings).params
    assert params["layers.wq"].sharding.spec == P(None, None, "tp", None)
    assert params["layers.wq"].addressable_shards[0].data.shape == (2, 64, 1, 8)
    assert params["embed"].addressable_shards[0].data.shape == (512 // 8, 64)
    assert params["layers.wk"].is_fully_replicated
    host = {k: np.asarray(v) for k, v in params.items()}
    placed = layout.place_params(TINY, params, jnp.float32)
    assert placed["layers.wqkv"].addressable_shards[0].data.shape == (2, 64, 1 + 1 + 1, 8)  # q, k, v head
    for d in range(8):  # fused on device from sharded wq and replicated wk/wv: still each device's own heads
        for name, want in own_slices(host, d, 8, layout.kv_repeat).items():
            np.testing.assert_array_equal(np.asarray(placed[name].addressable_shards[d].data), want)


@pytest.mark.parametrize("impl,decode_only", [("pallas_prefill", False), ("pallas_decode", True)])
def test_pallas_kernels_per_device_under_shard_map(impl, decode_only):
    """The GPU path (Pallas kernels, here in interpret mode) on heads-sharded q/k/v and a kv-head
    sharded cache equals the single-device reference, cache write included."""
    import jax

    from jaxllm.parallel import ops
    from tests.pallas_kernels.pk_cases import Config, make_case, valid_tokens

    cfg = Config(4, 4 if decode_only else 24, 40, block_size=8, num_kv_heads=4, q_per_kv=2, head_dim=16,
                 decode_only=decode_only)
    case = make_case(cfg, 0)
    rng = np.random.default_rng(1)
    k, v = (rng.standard_normal((cfg.num_tokens, 4, 16)).astype(np.float32) for _ in range(2))
    layout = TPLayout.plan(dataclasses.replace(TINY, num_heads=8, num_kv_heads=4), 4)
    args = (case.q, k, v, case.cache, case.layer, case.metadata)
    want, want_cache = jax.jit(lambda *a: ops.paged_attention(*a, None, impl="reference"))(*args)
    sharded_cache = jax.device_put(case.cache, layout.cache_sharding())
    got, got_cache = jax.jit(lambda *a: ops.paged_attention(*a, layout, impl=impl, interpret=True))(
        case.q, k, v, sharded_cache, case.layer, case.metadata)
    assert got.addressable_shards[0].data.shape == (cfg.num_tokens, 2, 16)  # 8 q heads / 4 devices
    ok = valid_tokens(case)
    np.testing.assert_allclose(np.asarray(got)[ok], np.asarray(want)[ok], atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(got_cache.k), np.asarray(want_cache.k))


def test_orbax_restores_into_shards(tmp_path):
    from checkpoints import load_checkpoint
    from checkpoints.orbax_store import save_orbax

    rng = np.random.default_rng(0)
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in param_shapes(TINY).items()}
    save_orbax(str(tmp_path / "orbax"), TINY, params)
    layout = TPLayout.plan(TINY, 8)
    ckpt = load_checkpoint(str(tmp_path / "orbax"), dtype=jnp.float32, shardings=layout.load_shardings)
    assert ckpt.format == "orbax"
    assert ckpt.params["layers.w_up"].addressable_shards[0].data.shape == (2, 64, 128 // 8)
    assert ckpt.params["layers.wk"].is_fully_replicated  # repeated to 8 kv heads next
    placed = layout.place_params(TINY, ckpt.params, jnp.float32)
    assert placed["layers.wqkv"].addressable_shards[0].data.shape == (2, 64, 3, 8)
    wq, _, wv = unfuse_numpy(np.asarray(placed["layers.wqkv"]), (8, 8, 8), -2, 8)
    np.testing.assert_array_equal(wq, params["layers.wq"])
    np.testing.assert_array_equal(wv, np.repeat(params["layers.wv"], 2, axis=2))
    gate, up = unfuse_numpy(np.asarray(placed["layers.w_gate_up"]), (128, 128), -1, 8)
    np.testing.assert_array_equal(up, params["layers.w_up"])


def test_cli_flags_import_no_jax():
    """The multi-host flags live in jaxllm.parallel.cli, which the gRPC server's host side imports."""
    import os
    import subprocess
    import sys

    code = ("import sys, serving.__main__ as m, jaxllm.generate; m.build_parser(); "
            "bad = [x for x in sys.modules if x == 'jax' or x.startswith('jax.')]; assert not bad, bad")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("method,split", [("int8", False), ("fp8", True)])
def test_place_params_quantized_scales_follow_the_weight_sharding(method, split):
    """tp=2: q is sharded like the weight, the per-output-channel scale like the weight's output axes
    (row-parallel wo/w_down: scale replicated, the absmax reduced over the sharded input axis), and
    the gathered QuantWeight equals the single-device quantization of the same fused weight."""
    from jaxllm.models.quant import QUANT_PARAMS, QuantWeight, quantize, scale_axes

    tp = 2
    rng = np.random.default_rng(1)
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in param_shapes(TINY).items()}
    layout = TPLayout.plan(TINY, tp)
    full = layout.place_params(TINY, dict(params), jnp.float32)
    placed = layout.place_params(TINY, dict(params), jnp.float32, split_layers=split, quantization=method)
    for name, n in QUANT_PARAMS.items():
        layers = placed[name] if split else [placed[name]]
        lead = 1 if split else 0
        w_spec = tuple(layout.spec(MODEL_AXES[name]))[lead:]
        s_spec = tuple(layout.spec(scale_axes(MODEL_AXES[name], n)))[lead:]
        for arr in layers:
            assert isinstance(arr, QuantWeight)
            for a, spec in ((arr.q, w_spec), (arr.scale, s_spec)):
                expected = tuple(d // tp if ax == "tp" else d for d, ax in zip(a.shape, spec + (None,) * 8))
                assert all(s.data.shape == expected for s in a.addressable_shards), (name, expected)
        want = quantize(np.asarray(full[name]), method, n, stacked=True)
        got_q = np.stack([np.asarray(a.q) for a in layers]) if split else np.asarray(layers[0].q)
        got_s = np.stack([np.asarray(a.scale) for a in layers]) if split else np.asarray(layers[0].scale)
        np.testing.assert_array_equal(got_s, np.asarray(want.scale), err_msg=name)
        np.testing.assert_array_equal(got_q.astype(np.float32), np.asarray(want.q).astype(np.float32), err_msg=name)
    assert any("tp" in tuple(layout.spec(scale_axes(MODEL_AXES[k], n))) for k, n in QUANT_PARAMS.items())
