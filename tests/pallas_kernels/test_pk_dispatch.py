"""Dispatch by backend / impl name, and errors at the edge."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import AttentionMetadata, KVCache, ragged_paged_attention
from pallas_kernels.attention import resolve_impl
from tests.pallas_kernels.pk_cases import Config, make_case


def _md(decode_only):
    return AttentionMetadata(jnp.zeros(2, jnp.int32), jnp.zeros((2, 1), jnp.int32), jnp.ones(2, jnp.int32),
                             jnp.arange(3, dtype=jnp.int32), decode_only=decode_only)


def test_resolve_impl_on_cpu_is_reference():
    assert resolve_impl(None, _md(True)) == "reference"
    assert resolve_impl(None, _md(False)) == "reference"
    assert resolve_impl("pallas", _md(True)) == "pallas_decode"
    assert resolve_impl("pallas", _md(False)) == "pallas_prefill"
    with pytest.raises(ValueError, match="unknown attention impl 'flash'"):
        resolve_impl("flash", _md(True))


def test_env_var_overrides_the_backend_choice(monkeypatch):
    monkeypatch.setenv("JAXLLM_ATTENTION_IMPL", "pallas")
    assert resolve_impl(None, _md(True)) == "pallas_decode"
    assert resolve_impl(None, _md(False)) == "pallas_prefill"
    assert resolve_impl("reference", _md(True)) == "reference"  # an explicit impl still wins
    monkeypatch.setenv("JAXLLM_ATTENTION_IMPL", "reference")
    assert resolve_impl(None, _md(False)) == "reference"
    monkeypatch.setenv("JAXLLM_ATTENTION_IMPL", "flash")
    with pytest.raises(ValueError, match="JAXLLM_ATTENTION_IMPL='flash'"):
        resolve_impl(None, _md(True))


def test_default_impl_on_cpu_is_the_reference():
    from tests.pallas_kernels.pk_cases import dense_attention, valid_tokens

    case = make_case(Config(3, 10, 40, block_size=8, num_kv_heads=1, q_per_kv=2), 0)
    out = np.asarray(jax.jit(ragged_paged_attention)(case.q, case.cache, case.layer, case.metadata))
    ok = valid_tokens(case)
    np.testing.assert_allclose(out[ok], dense_attention(case)[ok], atol=2e-5, rtol=2e-5)


def test_decode_kernel_rejects_mixed_batches():
    case = make_case(Config(2, 6, 20, block_size=8, num_kv_heads=1, q_per_kv=2), 0)
    with pytest.raises(ValueError, match="decode_only"):
        ragged_paged_attention(case.q, case.cache, case.layer, case.metadata, impl="pallas_decode", interpret=True)


def test_shape_errors_name_the_field():
    cache = KVCache.zeros(1, 4, 8, 2, 16, jnp.float32)
    md = _md(False)
    with pytest.raises(ValueError, match="num_heads 3 is not a multiple of num_kv_heads 2"):
        ragged_paged_attention(jnp.zeros((2, 3, 16)), cache, 0, md)
    with pytest.raises(ValueError, match="head_dim 32 != cache head_dim 16"):
        ragged_paged_attention(jnp.zeros((2, 4, 32)), cache, 0, md)
    with pytest.raises(ValueError, match="slot_mapping has 2 tokens but q has 5"):
        ragged_paged_attention(jnp.zeros((5, 4, 16)), cache, 0, md)


def test_first_pallas_call_does_not_retrigger_compiles():
    """A function jitted before the process's first pallas_call must not compile again after it
    (jax registers a trace-context config lazily on that call; importing pallas_kernels pre-empts it)."""
    import os
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import jax, jax.numpy as jnp
        from tests.pallas_kernels.pk_cases import Config, make_case
        from pallas_kernels import ragged_paged_attention
        f = jax.jit(lambda x: x * 2)
        f(jnp.ones(3))
        case = make_case(Config(2, 2, 20, block_size=8, num_kv_heads=1, q_per_kv=2, decode_only=True), 0)
        ragged_paged_attention(case.q, case.cache, case.layer, case.metadata, impl="pallas_decode", interpret=True)
        f(jnp.ones(3))
        print("CACHE", f._cache_size())
    """)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": root}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120,
                         cwd=root)
    assert "CACHE 1" in out.stdout, out.stdout + out.stderr
