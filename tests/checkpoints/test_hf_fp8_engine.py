"""An fp8 HF checkpoint served by the engine: no flag runs it as fp8 (the resolved config says so,
the weights stay 8-bit), greedy output follows the numpy-dequantized fp32 reference; with
`kv_cache_dtype="fp8"` its stored KV scales (`self_attn.k_scale` / `v_scale`, or the older
`kv_scale`) replace the start-up calibration, broadcast over kv heads, and the start-up line says
where the scales came from; without stored scales the calibration runs as before."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints import load_checkpoint
from jaxllm import LLM, SamplingParams
from jaxllm.config import EngineConfig
from jaxllm.engine.factory import build_engine
from jaxllm.models.llama import build_model
from tests.checkpoints.fp8_tiny import ct_config, make_fp8
from tests.engine_checks import logits_of

K_VALS, V_VALS = [0.031, 0.047], [0.011, 0.023]  # per layer (2 layers)


def _engine(path, **kw):
    return build_engine(EngineConfig(model=path, max_model_len=128, block_size=16, max_num_seqs=2,
                                     max_num_batched_tokens=64, **kw), compile_cache=False, warmup=False)


def test_engine_runs_fp8_checkpoint_as_fp8_without_flag(tmp_path):
    fp8_dir, ref_dir = make_fp8(str(tmp_path), "ct", ct_config("channel", True), "channel")
    e = _engine(fp8_dir)
    assert e.config.quantization == "fp8"
    leaves = jax.tree.leaves(e.runner.state)
    # CPU, one device: the four held projections' q as uint8 bits of float8 (quant_dot.holds_fp8_bits)
    assert sum(x.dtype == jnp.uint8 for x in leaves) == 4
    assert not any(x.dtype == jnp.float32 and x.ndim == 4 and x.shape[1] == 256 and x.shape[-1] == 64
                   for x in leaves)  # no fp32 copy of wqkv [L, E, H+2K, D] held
    prompt = np.random.default_rng(5).integers(0, 256, 12).tolist()
    out = LLM("tiny", engine=e).generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=4),
                                         use_tqdm=False)[0].outputs[0].token_ids
    ref = load_checkpoint(ref_dir)
    seq = prompt + list(out)
    want = logits_of(build_model(ref.config, ref.params, jnp.float32), ref.config, [seq])
    assert list(out) == [int(want[len(prompt) - 1 + k].argmax()) for k in range(len(out))]


@pytest.mark.parametrize("stored,names", [
    ({"self_attn.k_scale": K_VALS, "self_attn.v_scale": V_VALS}, "self_attn.k_scale/self_attn.v_scale"),
    ({"self_attn.kv_scale": K_VALS}, "self_attn.kv_scale"),
    ({"self_attn.k_scale": [[0.02, 0.03], [0.04, 0.05]], "self_attn.v_scale": [[0.01, 0.02], [0.03, 0.04]]},
     "self_attn.k_scale/self_attn.v_scale"),
])
def test_kv_scales_come_from_the_checkpoint(tmp_path, capsys, stored, names):
    qc = dict(ct_config("tensor", False), kv_cache_scheme={"num_bits": 8, "type": "float", "strategy": "tensor",
                                                           "dynamic": False, "symmetric": True})
    fp8_dir, _ = make_fp8(str(tmp_path), "kv", qc, "tensor", kv_scales=stored)
    e = _engine(fp8_dir, kv_cache_dtype="fp8")
    k_want = np.broadcast_to(np.asarray(stored[names.split("/")[0]], np.float32).reshape(2, -1), (2, 2))
    v_want = np.broadcast_to(np.asarray(stored[names.split("/")[-1]], np.float32).reshape(2, -1), (2, 2))
    np.testing.assert_array_equal(np.asarray(e.runner.kv_cache.k_scale), k_want)
    np.testing.assert_array_equal(np.asarray(e.runner.kv_cache.v_scale), v_want)
    err = capsys.readouterr().err
    assert f"fp8 KV scales: from the checkpoint ({names}, " in err and "calibrated on" not in err
    out = LLM("tiny", engine=e).generate([{"prompt_token_ids": [5, 6, 7]}],
                                         SamplingParams(temperature=0, max_tokens=2, logprobs=1), use_tqdm=False)
    assert all(np.isfinite(lp.logprob) for step in out[0].outputs[0].logprobs for lp in step.values())


def test_kv_scales_without_stored_ones_are_calibrated_and_auto_cache_ignores_them(tmp_path, capsys):
    plain, _ = make_fp8(str(tmp_path), "nokv", ct_config("tensor", False), "tensor")
    e = _engine(plain, kv_cache_dtype="fp8")
    assert load_checkpoint(plain).kv_scales is None
    assert "fp8 KV scales: calibrated on" in capsys.readouterr().err
    assert float(np.asarray(e.runner.kv_cache.k_scale).min()) > 0
    with_kv, _ = make_fp8(str(tmp_path), "kv-auto", ct_config("tensor", False), "tensor",
                          kv_scales={"self_attn.k_scale": K_VALS, "self_attn.v_scale": V_VALS})
    _engine(with_kv)  # kv_cache_dtype auto: the stored scales are not used (vLLM: 1.0 unless fp8)
    assert "fp8 KV scales" not in capsys.readouterr().err


def test_bad_kv_scale_is_one_line(tmp_path):
    from checkpoints.errors import CheckpointError

    d, _ = make_fp8(str(tmp_path), "kv-bad", ct_config("tensor", False), "tensor",
                    kv_scales={"self_attn.k_scale": [0.1, -1.0], "self_attn.v_scale": V_VALS})
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.1\.self_attn\.k_scale = \[-1\.0\]: a KV scale "
                                              r"must be finite and > 0$"):
        load_checkpoint(d)


def test_checkpoint_scales_follow_repeated_kv_heads():
    """Under tensor parallelism with tp > kv heads each checkpoint kv head is repeated before fusing
    (fusion.placement_plan); each repeated head must get its own head's stored scale."""
    from jaxllm.models.fusion import placement_plan
    from jaxllm.runner.kv_calibration import checkpoint_scales

    k = np.array([[0.1, 0.2], [0.3, 0.4]], np.float32)  # [L=2, K=2]
    v = k * 10
    ks, vs, line = checkpoint_scales((k, v, "self_attn.k_scale/self_attn.v_scale"), kv_repeat=2)
    # which checkpoint head each repeated head is: the placement's own repetition of a wk whose
    # kv-head axis holds the head ids
    (held, _, fn), = [p for p in placement_plan(["layers.wq", "layers.wk", "layers.wv"], 2, 1)]
    ids = np.arange(2, dtype=np.float32)[None, None, :, None]  # [L=1, E=1, K, D=1]
    fused = fn(np, np.full((1, 1, 4, 1), -1.0, np.float32), ids, ids)  # [1, 1, H + 2*2K, 1]
    heads = fused[0, 0, 4:8, 0].astype(int)  # the repeated k heads' checkpoint ids
    np.testing.assert_array_equal(np.asarray(ks), k[:, heads])
    np.testing.assert_array_equal(np.asarray(vs), v[:, heads])
    assert "per kv head" in line and "from the checkpoint (self_attn.k_scale/self_attn.v_scale" in line
