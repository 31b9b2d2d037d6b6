"""fp8 KV cache scales calibrated at engine start (jaxllm/runner/kv_calibration.py): a request's
output does not depend on which request the server saw first, the scales are HEADROOM x the
calibration prefill's per-layer per-kv-head absmax / 448, calibration leaves no block or prefix-cache
entry behind, and calculate_kv_scales=False gives vLLM's fixed 1.0."""
import dataclasses
import re

import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints import load_checkpoint
from jaxllm import LLM, SamplingParams
from jaxllm.config import EngineConfig
from jaxllm.engine.factory import build_engine
from jaxllm.models.dense_batch import prefill_batch
from jaxllm.models.llama import build_model
from jaxllm.runner.kv_calibration import CALIBRATION_LEN, calibration_ids, set_scales
from pallas_kernels import KVCache
from pallas_kernels.kv_quant import HEADROOM
from tests.engine_checks import assert_clean, jit_logits
from tests.models.hf_tiny import make_tiny_hf

BLOCK = 16
MAX_LEN = 128
# the request under test, and a very short, very different one that may come before it
PROMPT = np.random.default_rng(7).integers(0, 256, 60).tolist()
SHORT = [3]


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return make_tiny_hf("llama", str(tmp_path_factory.mktemp("tiny_hf_kvcal")))


def _engine(path, **kw):
    return build_engine(EngineConfig(model=path, max_model_len=MAX_LEN, block_size=BLOCK, max_num_seqs=4,
                                     max_num_batched_tokens=64, kv_cache_dtype="fp8", **kw),
                        compile_cache=False, warmup=False)


@pytest.fixture(scope="module")
def calibrated(path):
    """One default fp8 engine for the tests that only read its start-up state (scales, tokenizer, HLO):
    no request changes the scales (test_same_request_same_output_whatever_came_first asserts it)."""
    return _engine(path)


def _generate(engine, prompt):
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=5)
    out = LLM("tiny", engine=engine).generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    o = out[0].outputs[0]
    return o.token_ids, [{t: lp.logprob for t, lp in step.items()} for step in o.logprobs]


def test_same_request_same_output_whatever_came_first(path, calibrated):
    """PROMPT as the first request after start vs after a 1-token first request: identical token ids
    and top-5 logprobs, bit for bit (before calibration, the 1-token prompt set every scale); the
    scales are set before any request and never move; no block is leaked or left in the prefix cache."""
    first = calibrated  # no request before this one: the other tests on it read state only
    scales0 = [np.asarray(first.runner.kv_cache.k_scale), np.asarray(first.runner.kv_cache.v_scale)]
    assert first.get_stats()["num_free_blocks"] == first.get_stats()["num_blocks"]
    assert not first.kv.pool.cached, "calibration left blocks in the prefix cache"
    ids_first, lps_first = _generate(first, PROMPT)

    after = _engine(path)
    _generate(after, SHORT)
    ids_after, lps_after = _generate(after, PROMPT)
    assert ids_after == ids_first
    assert lps_after == lps_first  # exact: same scales, same executables, same values
    for e in (first, after):
        kc = e.runner.kv_cache
        np.testing.assert_array_equal(np.asarray(kc.k_scale), scales0[0])  # never moved
        np.testing.assert_array_equal(np.asarray(kc.v_scale), scales0[1])
        assert_clean(e)


def test_scales_are_the_calibration_prefill_absmax(path, calibrated):
    """Independent reference: the calibration sequence (256 ids from default_rng(0): this model has no
    tokenizer) prefilled through the f32 model into an f32 cache; each layer's and kv head's scale is
    HEADROOM x its |K| / |V| max / 448. The scales differ across layers and heads (not one constant)."""
    e = calibrated
    ckpt = load_checkpoint(path)
    c = ckpt.config
    ids = np.random.default_rng(0).integers(0, c.vocab_size, 256).tolist()[:MAX_LEN]
    assert calibration_ids(e.tokenizer, c.vocab_size, MAX_LEN) == ids
    model = build_model(c, ckpt.params, jnp.float32)
    tokens, positions, meta, nblocks = prefill_batch([ids], BLOCK)
    _, ref = jit_logits(model, tokens, positions, KVCache.zeros(c.num_layers, nblocks, BLOCK, c.num_kv_heads,
                                                                c.head_dim, jnp.float32), meta, with_cache=True)
    for name in ("k", "v"):
        rows = np.asarray(getattr(ref, name)).reshape(c.num_layers, -1, c.num_kv_heads, c.head_dim)[:, :len(ids)]
        want = np.abs(rows).max(axis=(1, 3)) * HEADROOM / 448  # [L, kvh]
        got = np.asarray(getattr(e.runner.kv_cache, f"{name}_scale"))
        np.testing.assert_allclose(got, want, rtol=1e-5)
        assert len(np.unique(got)) == got.size, got


def test_no_calculate_kv_scales_is_fixed_one(path, capsys):
    """calculate_kv_scales=False: every scale 1.0 (vLLM's uncalibrated default), said at start-up;
    the default start-up line names the calibration."""
    e = _engine(path, calculate_kv_scales=False)
    assert "fp8 KV scales: fixed 1.0 (calculate_kv_scales=False)" in capsys.readouterr().err
    kc = e.runner.kv_cache
    assert (np.asarray(kc.k_scale) == 1.0).all() and (np.asarray(kc.v_scale) == 1.0).all()
    assert len(_generate(e, PROMPT)[0]) == 8
    assert (np.asarray(e.runner.kv_cache.k_scale) == 1.0).all()  # the first write does not move them
    _engine(path)
    assert (f"fp8 KV scales: calibrated on {MAX_LEN} tokens (seeded ids), {HEADROOM:g} x absmax / 448"
            in capsys.readouterr().err)
    with pytest.raises(ValueError, match=r"^k_scale / v_scale must be \(2, 2\), got \(2, 3\) / \(2, 3\)$"):
        set_scales(e.runner, jnp.ones((2, 3)), jnp.ones((2, 3)))  # the tiny model: 2 layers, 2 kv heads
    with pytest.raises(ValueError, match=r"^calculate_kv_scales=1 is invalid: must be a bool$"):
        EngineConfig(calculate_kv_scales=1).validate()


def test_calibration_ids_from_the_tokenizer():
    """With a tokenizer: the Zen of Python encoded with special tokens (BOS as a prompt gets),
    cut at max_len; without one: CALIBRATION_LEN seeded ids."""
    class Tok:
        def encode(self, text, add_special_tokens=True):
            assert add_special_tokens
            self.text = text
            return [1] + [ord(ch) for ch in text]

    tok = Tok()
    ids = calibration_ids(tok, 300, 50)
    assert tok.text.startswith("The Zen of Python, by Tim Peters\n\nBeautiful is better than ugly.\n")
    assert "Namespaces are one honking great idea" in tok.text
    assert ids == [1] + [ord(ch) for ch in tok.text[:49]]

    class NoText:
        has_text = False

    assert calibration_ids(NoText(), 300, 10_000) == np.random.default_rng(0).integers(0, 300, CALIBRATION_LEN).tolist()


def _absmax_reductions(hlo: str, kvh: int) -> list[str]:
    """Reductions of [T, kvh, head_dim] rows to [kvh] f32 over tokens and head_dim: the first-write
    absmax (pallas_kernels/kv_quant.py first_write_scale), one per K and V in the layer scan's body."""
    return [ln.strip() for ln in hlo.splitlines()
            if re.search(rf"= f32\[{kvh}\]\S* reduce\(", ln) and "dimensions={0,2}" in ln]


def test_engine_decode_step_computes_no_kv_absmax(calibrated):
    """build_engine's fp8 cache has fixed scales (set at start): the optimized CPU HLO of its decode
    step holds no per-write absmax. The same step on the same cache with `scales_fixed=False` (a raw cache's first-write path) holds the two
    (K and V), so the pattern does match what it looks for."""
    r = calibrated.runner
    assert r.kv_cache.scales_fixed
    kvh = r.kv_cache.k_scale.shape[1]
    inp = r._padding_inputs(*r.buckets.pick(1, 1, True))  # the smallest decode bucket
    assert inp.metadata.decode_only
    fixed = r._step_lowering(inp).compile().as_text()
    assert _absmax_reductions(fixed, kvh) == []
    fixed_cache, r.kv_cache = r.kv_cache, dataclasses.replace(r.kv_cache, scales_fixed=False)
    try:
        first_write = r._step_lowering(inp).compile().as_text()
    finally:
        r.kv_cache = fixed_cache  # the shared engine keeps its fixed scales
    assert len(_absmax_reductions(first_write, kvh)) == 2, _absmax_reductions(first_write, kvh)
