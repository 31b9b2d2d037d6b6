"""leading_dot: the projections' contraction (x's axes after the tokens axis against w's leading axes),
checked against numpy's einsum, and compiled without a copy of the weight where jnp.einsum's spec for
the attention output projection ("thd,hde->te") makes XLA CPU copy wo into a transposed layout."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.models.leading_dot import leading_dot

SPECS = {"te,ehd->thd": ((5, 32), (32, 6, 8)), "thd,hde->te": ((5, 6, 8), (6, 8, 32)),
         "te,ef->tf": ((5, 32), (32, 48)), "tf,fe->te": ((5, 48), (48, 32))}


@pytest.mark.parametrize("spec", sorted(SPECS))
def test_matches_einsum(spec):
    xs, ws = SPECS[spec]
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal(xs).astype(np.float32), rng.standard_normal(ws).astype(np.float32)
    np.testing.assert_allclose(np.asarray(leading_dot(jnp.asarray(x), jnp.asarray(w))), np.einsum(spec, x, w),
                               rtol=1e-5, atol=1e-5)


def test_shape_mismatch_is_named():
    with pytest.raises(ValueError, match=r"leading_dot: x \(5, 6, 8\) does not match .* \(8, 6, 32\)"):
        leading_dot(jnp.zeros((5, 6, 8)), jnp.zeros((8, 6, 32)))


def _weight_copies(fn, x, w) -> int:
    """Copy / transpose instructions of w's element count in the compiled CPU HLO."""
    text = jax.jit(fn).lower(x, w).compile().as_text()
    return sum(1 for ln in text.splitlines()
               if re.search(r"= bf16\[([\d,]+)\]\S* (?:copy|transpose|fusion)\(", ln)
               and np.prod([int(d) for d in re.search(r"bf16\[([\d,]+)\]", ln).group(1).split(",")]) == w.size
               and "kind=kCustom" not in ln)


def test_wo_contraction_copies_no_weight():
    x = jnp.ones((4, 16, 64), jnp.bfloat16)  # [T, H, d]
    w = jnp.ones((16, 64, 512), jnp.bfloat16)  # wo [H, d, E]
    assert _weight_copies(lambda a, b: jnp.einsum("thd,hde->te", a, b), x, w) >= 1  # the check can fail
    assert _weight_copies(leading_dot, x, w) == 0
