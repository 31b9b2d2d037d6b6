"""The per-tensor HF name map (checkpoints/hf_tensor_map.py) against the loader's own assembly
(checkpoints/assemble.py + hf_names.py: the reference, independent code), the fused-weight inverse
load_weights reads partial updates back with (jaxllm/runner/weight_update.py) against
jaxllm/models/fusion.py's own `unfuse_numpy`, and the refusal of quantized projections. No engine."""
from __future__ import annotations

import types

import jax
import numpy as np
import pytest
from flax import nnx

from checkpoints.assemble import assemble_params
from checkpoints.hf_names import llama_names
from checkpoints.hf_tensor_map import canonical_name, hf_tensor_map
from jaxllm.models.config import ModelConfig
from jaxllm.models.fusion import FUSED, placement_plan, unfuse_numpy
from jaxllm.models.llama import build_model, param_shapes
from jaxllm.runner.weight_update import WeightUpdater, _inverse_fn
from tests.models.hf_tiny import ARCH_CONFIGS, GEMMA_CONFIGS, TINY_CONFIGS


def _config(name: str) -> ModelConfig:
    """tests/models/hf_tiny.py's tiny config as config.json would hold it (its model_type is its name)."""
    return ModelConfig.from_hf(dict({**TINY_CONFIGS, **ARCH_CONFIGS, **GEMMA_CONFIGS}[name][1], model_type=name))


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3", "phi3", "gemma2"])
def test_every_tensor_lands_where_the_loader_puts_it(name):
    """untied lm_head (llama), tied + q/k/v bias (qwen2), q/k norms (qwen3), fused qkv/gate_up (phi3),
    sandwich norms (gemma2)."""
    c = _config(name)
    rng = np.random.default_rng(0)
    entries = hf_tensor_map(c)
    hf = {n: rng.standard_normal(e.hf_shape).astype(np.float32) for n, e in entries.items()}
    assembled = assemble_params(c, llama_names(c, hf.get, "test"), "test")
    covered = set()
    for n, e in entries.items():
        for t in e.targets:
            want = assembled[t.param] if t.layer is None else assembled[t.param][t.layer]
            np.testing.assert_array_equal(t.convert(hf[n]), want, err_msg=f"{n} -> {t.param}[{t.layer}]")
            covered.add((t.param, t.layer))
    shapes = param_shapes(c)  # every param of every layer is written by some tensor
    assert covered == {(p, i if p.startswith("layers.") else None) for p in shapes
                       for i in (range(c.num_layers) if p.startswith("layers.") else [0])}


def test_names_resolve_as_the_loader_reads_them():
    assert canonical_name("model.language_model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
    assert canonical_name("language_model.lm_head.weight") == "lm_head.weight"
    assert canonical_name("layers.3.input_layernorm.weight") == "model.layers.3.input_layernorm.weight"
    assert canonical_name("lm_head.weight") == "lm_head.weight"


@pytest.mark.parametrize("tp,kv_repeat", [(1, 1), (2, 1), (4, 2)])
def test_fused_parts_read_back_as_fusion_unfuses_them(tp, kv_repeat):
    rng = np.random.default_rng(tp)
    E, H, K, D, F = 8, 2 * tp, max(1, tp // kv_repeat), 3, 2 * tp  # K: the checkpoint's kv heads
    shapes = {"layers.wq": (E, H, D), "layers.wk": (E, K, D), "layers.wv": (E, K, D),
              "layers.w_gate": (E, F), "layers.w_up": (E, F)}
    for held, parts, fn in placement_plan(shapes, kv_repeat, tp):
        if fn is None:
            continue
        xs = [rng.standard_normal(shapes[p]).astype(np.float32) for p in parts]
        fused = fn(np, *xs)
        got = [fused.ravel()[pos] for pos in _inverse_fn(fn, [shapes[p] for p in parts])]
        axis = FUSED[held][1]
        ref = unfuse_numpy(fused, [np.repeat(x, kv_repeat, axis=-2).shape[axis] if p in ("layers.wk", "layers.wv")
                                   else x.shape[axis] for p, x in zip(parts, xs)], axis, tp)
        for p, x, g, r in zip(parts, xs, got, ref):
            np.testing.assert_array_equal(g, x, err_msg=held)
            if kv_repeat > 1 and p in ("layers.wk", "layers.wv"):
                r = r[..., ::kv_repeat, :]  # each kv head repeated kv_repeat times in a row
            np.testing.assert_array_equal(r, x, err_msg=held)


def test_quantized_projections_are_refused_by_name_and_norms_still_load():
    c = _config("llama")
    rng = np.random.default_rng(1)
    params = {k: rng.standard_normal(v).astype(np.float32) * 0.1 for k, v in param_shapes(c).items()}
    model = build_model(c, params, np.float32, quantization="int8", layer_loop="unroll")
    runner = types.SimpleNamespace(state=nnx.split(model)[1], layout=None, state_dtype=np.float32)
    up = WeightUpdater(runner, c)
    q = rng.standard_normal((c.num_heads * c.head_dim, c.hidden_size)).astype(np.float32)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.q_proj\.weight: the model holds layers\.wq "
                                         r"quantized"):
        up.collect([("model.layers.1.self_attn.q_proj.weight", q)], np.float32)
    norm = rng.standard_normal(c.hidden_size).astype(np.float32)
    up.apply(runner, up.collect([("model.layers.1.input_layernorm.weight", norm)], np.float32))
    leaves = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(runner.state)}
    held = next(x for k, x in leaves.items() if "[1]" in k and "input_norm" in k)
    np.testing.assert_array_equal(np.asarray(held), norm)


def _state(c, params, loop):
    return nnx.split(build_model(c, {k: v.copy() for k, v in params.items()}, np.float32, layer_loop=loop))[1]


@pytest.mark.parametrize("loop", ["scan", "unroll"])
def test_updates_equal_a_model_built_from_the_new_tensors(loop):
    """Stacked (scan) and per-layer (unroll) leaves: a full push of HF tensors equals the model
    build_model makes from the loader's assembly of the same tensors; a partial one (one q_proj) equals
    the old assembly with that layer's wq swapped in."""
    c = _config("qwen2")  # tied, q/k/v bias, one kv head
    rng = np.random.default_rng(2)
    entries = hf_tensor_map(c)
    hf_old, hf_new = ({n: rng.standard_normal(e.hf_shape).astype(np.float32) for n, e in entries.items()}
                      for _ in range(2))
    old = assemble_params(c, hf_old.get, "old")
    runner = types.SimpleNamespace(state=_state(c, old, loop), layout=None, state_dtype=np.float32)
    up = WeightUpdater(runner, c)
    q = "model.layers.1.self_attn.q_proj.weight"
    up.apply(runner, up.collect([(q, hf_new[q])], np.float32))
    mixed = {k: v.copy() for k, v in old.items()}
    mixed["layers.wq"][1] = assemble_params(c, hf_new.get, "new")["layers.wq"][1]
    for got, want in zip(jax.tree.leaves(runner.state), jax.tree.leaves(_state(c, mixed, loop))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    up.apply(runner, up.collect(hf_new.items(), np.float32))
    for got, want in zip(jax.tree.leaves(runner.state), jax.tree.leaves(_state(c, assemble_params(c, hf_new.get, "new"),
                                                                                  loop))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
