"""fp8 KV cache scales calibrated once at engine start, independent of user traffic.

`calculate_kv_scales=True` (the default; vLLM's flag name): before warm-up the engine runs ONE fixed
calibration prefill through the model into a small private cache in the model dtype (unquantized,
never the engine's cache: no block is taken from the pool, nothing enters the prefix cache), and
sets each layer's per-kv-head K and V scale to `HEADROOM * absmax / 448` of the K / V rows it
wrote (pallas_kernels/kv_quant.py). An fp8 checkpoint that stores KV scales (`self_attn.k_scale` /
`v_scale`, checkpoints/hf_fp8.py) skips the calibration: its scales are used as stored
(`checkpoint_scales`), as vLLM does, whatever `calculate_kv_scales` says. The scales then never change, so a request's output does not
depend on what the server saw first (the runner's cache is `scales_fixed`: its writes compute no
absmax). `calculate_kv_scales=False`: every scale is 1.0 (vLLM's
uncalibrated default).

The calibration sequence (`calibration_ids`): the Zen of Python (CPython's `this` module, in every
Python install; 857 characters) through the model's tokenizer with its special tokens (BOS where the
model has one, as a prompt gets), or, for a model without a tokenizer (dummy weights),
CALIBRATION_LEN ids drawn by numpy's default_rng(CALIBRATION_SEED); at most max_model_len tokens.
It is not bench/perplexity.py's default text (bench/data/coriolanus_act1.txt), so that measure
stays held out.
"""
from __future__ import annotations

import codecs
import contextlib
import dataclasses
import io

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.models.dense_batch import prefill_batch
from pallas_kernels import KVCache
from pallas_kernels.kv_quant import HEADROOM, amax_scale

CALIBRATION_LEN = 256  # ids of the tokenizer-less calibration sequence
CALIBRATION_SEED = 0


def calibration_text() -> str:
    """The Zen of Python, as `import this` prints it (rot13-decoded from the module's source)."""
    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the text
        import this
    return codecs.decode(this.s, "rot13")


def calibration_ids(tokenizer, vocab_size: int, max_len: int) -> list[int]:
    """The fixed calibration token ids (module docstring): tokenized text, else seeded ids."""
    if getattr(tokenizer, "has_text", True):
        ids = list(tokenizer.encode(calibration_text()))
    else:
        ids = np.random.default_rng(CALIBRATION_SEED).integers(0, vocab_size, CALIBRATION_LEN).tolist()
    if not ids:
        raise ValueError("calculate_kv_scales: the calibration text tokenized to no tokens")
    return ids[:max_len]


def calibrated_scales(model, ids: list[int], block_size: int, cache_sharding=None, scale_sharding=None):
    """(k_scale, v_scale) [L, kvh] f32 each: HEADROOM x the absmax of each layer's and kv head's K / V
    over one prefill of `ids` through `model` (into a cache sharded like the engine's when
    `cache_sharding`; the scales placed with `scale_sharding`, as KVCache.zeros places them)."""
    c = model.config
    tokens, positions, meta, nblocks = prefill_batch([ids], block_size)
    cache = KVCache.zeros(c.num_layers, nblocks, block_size, c.num_kv_heads, c.head_dim, model.dtype,
                          sharding=cache_sharding)  # private, model dtype: the unquantized K/V
    graphdef, state = nnx.split(model)

    def run(state, cache, tokens, positions, meta):
        _, cache = nnx.merge(graphdef, state)(tokens, positions, cache, meta)
        # every slot of the private cache is a written row or zero: its absmax is the rows'
        amax = [jnp.max(jnp.abs(x.astype(jnp.float32)), axis=(1, 2, 4)) for x in (cache.k, cache.v)]  # [L, kvh]
        # a head whose calibration K/V is all zero gets 1.0, never 0 (kv_quant's "unset")
        return tuple(jnp.where(a > 0, amax_scale(a), 1.0) for a in amax)

    out_shardings = None if scale_sharding is None else (scale_sharding, scale_sharding)
    return jax.jit(run, out_shardings=out_shardings)(state, cache, tokens, positions, meta)


def start_scales(model, tokenizer, block_size: int, max_len: int, scale_sharding=None, cache_sharding=None):
    """An fp8 engine's calibrated (k_scale, v_scale) [L, kvh] f32, placed with `scale_sharding`, and
    the start-up line that says on how many tokens and in how long. build_engine runs it before it
    allocates the KV cache, so the calibration's transient memory is free again by then (with
    calculate_kv_scales=False it does not run: the runner's cache starts at 1.0)."""
    import time

    t0 = time.perf_counter()
    ids = calibration_ids(tokenizer, model.config.vocab_size, max_len)
    k, v = jax.block_until_ready(calibrated_scales(model, ids, block_size, cache_sharding, scale_sharding))
    source = "the Zen of Python" if getattr(tokenizer, "has_text", True) else "seeded ids"
    return k, v, (f"fp8 KV scales: calibrated on {len(ids)} tokens ({source}), {HEADROOM:g} x absmax / 448 "
                  f"in {time.perf_counter() - t0:.2f}s")


def checkpoint_scales(kv_scales, kv_repeat: int = 1, scale_sharding=None):
    """An fp8 checkpoint's KV scales (checkpoints/hf_fp8.py `kv_scales`: k, v [L, kv_heads] f32 and
    the tensor names) → (k_scale, v_scale) [L, kv_heads x kv_repeat] placed with `scale_sharding`
    (each checkpoint kv head's scale repeated like the head itself under tensor parallelism), and the
    start-up line. Used as stored, vLLM's convention and the cache's: an e4m3 value x stands for
    x * scale (no HEADROOM: the checkpoint's calibration chose the range)."""
    k, v, names = kv_scales
    k, v = (np.repeat(np.asarray(a, np.float32), kv_repeat, axis=1) for a in (k, v))  # [L, kvh]
    place = (lambda a: jax.device_put(a, scale_sharding)) if scale_sharding is not None else jnp.asarray
    per = "per tensor" if all(np.all(a == a[:, :1]) for a in (k, v)) else "per kv head"
    return place(k), place(v), (f"fp8 KV scales: from the checkpoint ({names}, {per}; K {k.min():.3g}..{k.max():.3g}, "
                                f"V {v.min():.3g}..{v.max():.3g}), not calibrated")


def set_scales(runner, k_scale, v_scale) -> None:
    """Replaces the fp8 runner cache's [L, kvh] scales (same shapes and shardings, `scales_fixed` kept:
    no step recompiles)."""
    kc = runner.kv_cache
    if k_scale.shape != kc.k_scale.shape or v_scale.shape != kc.v_scale.shape:
        raise ValueError(f"k_scale / v_scale must be {kc.k_scale.shape}, got {k_scale.shape} / {v_scale.shape}")
    runner.kv_cache = dataclasses.replace(kc, k_scale=k_scale, v_scale=v_scale)
