"""Dummy weights (presets, seeded per parameter) and the Orbax store (convert → load)."""
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints import load_checkpoint
from checkpoints.dummy import dummy_config, dummy_params
from jaxllm.models.llama import param_shapes
from tests.models.hf_tiny import hf_logits, make_tiny_hf
from tests.models.test_parity_hf import run_model


@pytest.mark.parametrize("preset", ["llama-2-7b", "llama-2-13b", "llama-3-8b", "qwen2.5-0.5b", "phi-3-mini",
                                    "granite-3-8b"])
def test_presets_have_the_published_shapes(preset):
    c = dummy_config(preset)
    expected = {"llama-2-7b": 6.74e9, "llama-2-13b": 13.0e9, "llama-3-8b": 8.03e9, "qwen2.5-0.5b": 0.494e9,
                "phi-3-mini": 3.82e9, "granite-3-8b": 8.17e9}
    assert abs(c.num_params / expected[preset] - 1) < 0.02, c.num_params


def test_dummy_weights_are_seeded_per_parameter():
    c = dummy_config("tiny-llama")
    a = dummy_params(c, jnp.float32, seed=3)
    b = dummy_params(c, jnp.float32, seed=3)
    other = dummy_params(c, jnp.float32, seed=4)
    assert set(a) == set(param_shapes(c))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
        if not k.endswith("norm"):
            assert float(jnp.abs(a[k]).max()) <= 1e-3 and not np.array_equal(a[k], other[k])


def test_dummy_weights_sharded_equal_unsharded():
    c = dummy_config("tiny-llama")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("tp",))
    sh = {"layers.wq": jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, None, "tp", None))}
    a = dummy_params(c, jnp.float32, seed=0, shardings=sh)
    b = dummy_params(c, jnp.float32, seed=0)
    np.testing.assert_array_equal(a["layers.wq"], b["layers.wq"])


def test_convert_to_orbax_and_load(tmp_path):
    hf_dir = make_tiny_hf("qwen2", str(tmp_path))
    dst = tmp_path / "orbax"
    r = subprocess.run([sys.executable, "-m", "checkpoints.convert", hf_dir, str(dst)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    seqs = [[1, 2, 3, 4, 5, 6], list(range(10, 50))]
    ckpt, ours = run_model(str(dst), seqs)
    assert ckpt.format == "orbax" and ckpt.config.attention_bias
    for got, want in zip(ours, hf_logits(hf_dir, seqs)):
        np.testing.assert_array_less(np.abs(got - want).max(), 1e-4)
    r2 = subprocess.run([sys.executable, "-m", "checkpoints.convert", hf_dir, str(dst)], capture_output=True,
                        text=True, timeout=300)
    assert r2.returncode == 2 and "already holds" in r2.stderr
    assert load_checkpoint(str(dst)).params["embed"].shape == (256, 64)
