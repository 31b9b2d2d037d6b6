"""Shared checks for tests that run a real engine, and the independent reference forward they compare with."""


def assert_clean(engine):
    """Nothing left behind: no requests, every KV block free, block-pool invariants hold, no penalty
    rows held by the runner."""
    assert not engine.has_unfinished_requests()
    s = engine.get_stats()
    assert s["num_free_blocks"] == s["num_blocks"], s
    assert s["num_running"] == 0 and s["num_waiting"] == 0, s
    assert not engine.scheduler.requests and not engine.kv.req_blocks
    engine.kv.pool.check_invariants()
    r = engine.runner
    assert not r._rows and len(r._free_rows) == r.num_rows - 1, "penalty rows leaked"


def assert_warm_and_greedy(engine, logits, check=(1,)):
    """A warmed-up engine serving mixed traffic (prompts of 3, 17, 50 and 8 random tokens, 4 greedy
    tokens each: prefill, mixed and decode steps) compiles nothing, and the outputs of the prompts
    at indices ``check`` are greedy under an independent reference: ``logits(seq)`` -> [len(seq), V],
    one full-sequence forward of the same weights without the engine (no paging), whose argmax at
    the position before each output token is that token."""
    import numpy as np

    from jaxllm import LLM, SamplingParams

    r = engine.runner
    compiled = r.compile_count
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 256, n).tolist() for n in (3, 17, 50, 8)]
    outs = LLM("tiny", engine=engine).generate([{"prompt_token_ids": p} for p in prompts],
                                               SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
    assert r.compile_count == compiled, "a step compiled after warm-up"
    for i in check:
        p, got = prompts[i], list(outs[i].outputs[0].token_ids)
        ref = logits(p + got)
        assert got == [int(ref[len(p) - 1 + k].argmax()) for k in range(len(got))], i


def logits_of(model, c, seqs, block_size=8, share=False):
    """The independent reference forward: `model` on each of `seqs` (lists of token ids) in one
    dense prefill batch through a fresh f32 cache, no engine → logits [sum(len), V] f32 numpy.
    ``share``: model_forward's (one compiled program per model structure; see the caveat there)."""
    import jax.numpy as jnp

    from jaxllm.models.dense_batch import prefill_batch
    from pallas_kernels import KVCache

    tokens, positions, meta, nblocks = prefill_batch(seqs, block_size)
    cache = KVCache.zeros(c.num_layers, nblocks + 1, block_size, c.num_kv_heads, c.head_dim, jnp.float32)
    return jit_logits(model, tokens, positions, cache, meta, share=share)  # [sum(len), V] f32


_SHARED_FORWARD = []  # model_forward's process-wide jitted forward (share=True), made on first use


def _forward(graphdef, switches, state, *args):
    """`switches` is only part of the jit key (see model_forward)."""
    from flax import nnx

    m = nnx.merge(graphdef, state)
    hidden, cache = m(*args)
    return m.compute_logits(hidden), cache


def model_forward(model, share=False):
    """-> (fwd, state): ``fwd(state, *args)`` runs ``model(*args)`` then its compute_logits as ONE
    jitted program -> (logits, the returned cache); ``fwd.lower(state, *args)`` lowers it.

    ``share``: one jitted function for every model of the process, keyed by the model's graphdef
    (structure, static config, layout; the weights are ``state``, an argument) and the $JAXLLM_*
    environment, so two models of one architecture, shapes, quantization and sharding (a tp=4
    forward built twice, the fp32 references of three checkpoints) run one compiled program instead
    of compiling it again. A cached program is NOT retraced: a test that changes another trace-time
    switch between calls (quant_dot.ENABLED, a monkeypatched kernel, jax.default_backend) must not
    share. Without ``share``, a fresh jit per call (nothing reused)."""
    import functools
    import os

    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)
    if not share:
        return jax.jit(functools.partial(_forward, graphdef, None)), state
    if not _SHARED_FORWARD:
        _SHARED_FORWARD.append(jax.jit(_forward, static_argnums=(0, 1)))
    jitted = _SHARED_FORWARD[0]
    switches = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("JAXLLM_")))
    fwd = functools.partial(jitted, graphdef, switches)
    fwd.lower = functools.partial(jitted.lower, graphdef, switches)
    return fwd, state


def jit_logits(model, *args, with_cache=False, share=False):
    """`model(*args)` then its compute_logits as ONE jitted program (model_forward, ``share`` there:
    op-by-op dispatch of the eager forward is several times slower on CPU; same model, same math)
    → logits [T, V] numpy, or (logits, the returned cache) with `with_cache`."""
    import numpy as np

    fwd, state = model_forward(model, share=share)
    logits, cache = fwd(state, *args)
    return (np.asarray(logits), cache) if with_cache else np.asarray(logits)


def build(path, quantization, layer_loop="scan"):
    """(model, config) of the checkpoint at `path` in f32 with weight-only `quantization` (or None)."""
    import jax.numpy as jnp

    from checkpoints import load_checkpoint
    from jaxllm.models.llama import build_model

    ckpt = load_checkpoint(path)
    return build_model(ckpt.config, ckpt.params, jnp.float32, layer_loop=layer_loop,
                       quantization=quantization), ckpt.config


def returns_within(fn, guard: float = 20.0) -> bool:
    """fn() returned (run on a helper thread; the guard only keeps a broken close from hanging the test)."""
    import threading

    t = threading.Thread(target=fn, daemon=True)
    t.start()
    t.join(guard)
    return not t.is_alive()


def threads_named(prefix: str) -> list:
    """The live threads whose name starts with ``prefix`` (a DaemonPool's workers)."""
    import threading

    return [t for t in threading.enumerate() if t.name.startswith(prefix)]
