"""The mixture-of-experts MLP of Mixtral and Qwen3-MoE: a router picks each token's top-k experts,
each picked expert runs its own SwiGLU MLP on the token, and the outputs are summed with the
routing weights.

Routing (as HF's MixtralTopKRouter / Qwen3MoeTopKRouter): logits = x @ router in the model dtype,
softmax in f32, top-k (ties: the lower expert index first, `lax.top_k`), the k weights renormalised
to sum to 1 when `norm_topk_prob` (always for Mixtral). Router jitter is a training knob: ignored.

Experts ("grouped", the default off CPU): only the T*k routed (token, expert) pairs are computed. The
assignments are sorted by expert (stable), the tokens gathered in that order, and two
`jax.lax.ragged_dot`s (gate/up, then down) multiply each expert's contiguous group of rows by that
expert's weights; group_sizes [X] says where each group ends. Shapes stay static (T*k rows whatever
the routing). The rows are then put back in (token, slot) order and weight-summed. On GPU
ragged_dot lowers to XLA's ragged dot (a grouped GEMM); on CPU jax expands it densely (every expert
over every row, in a dot form XLA CPU runs slowly: bench/RESULTS.md, "MoE").

"dense" (the CPU default from T*k >= X rows, `JAXLLM_MOE=dense`): every expert on every token as dots
batched over the experts, the unrouted outputs masked out by a zero weight; the bench's "same MoE
computed densely". "gather" (the CPU default below X rows, a small decode batch): each assignment
gathers its expert's weights, so only the routed experts are read. "loop" (the CPU default for a small
batch under expert parallelism): a loop over the experts running, by `lax.cond`, only those some token is
routed to. All four are tested against a numpy reference (tests/models/test_moe.py).

Tensor parallelism: each expert's intermediate axis is split over "tp" like the dense MLP's
(w_gate_up column-parallel in shard-major order, w_down row-parallel, jaxllm/models/fusion.py); the
router and its choices are replicated. Under `shard_map` every device runs the same sort and its
own slice of every expert, and one psum adds the partial outputs (the dense MLP's one all-reduce).
Expert parallelism (`layout.expert_parallel`, --enable-expert-parallel): the expert axis is split over
"tp" instead, X/tp whole experts a device; every device still routes every token, `local_assignments`
keeps the assignments to its own experts (the others weight 0), the path runs on its experts only
(small batches: "loop", so a device reads just its routed experts), and the same psum adds the
partial outputs (jaxllm/parallel/README.md, "Expert parallelism").

Quantized experts (`--quantization int8|fp8|int4`, or an fp8 / AWQ / GPTQ checkpoint's): `w_gate_up` /
`w_down` are QuantWeights with one scale per expert and output channel (or block scales: an fp8
checkpoint's, int4's groups, with AWQ / GPTQ offsets); each
path's matmuls are moe_quant.py's (the 8-bit q converted in the dot, the scale on its output). Their
scales shard like the weights' output axes (block scales and offsets like the weights).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxllm.models import moe_quant
from jaxllm.models.quant import QuantWeight, expert_scale_axes
from jaxllm.parallel.rules import TP

MOE_ENV = "JAXLLM_MOE"
MOE_IMPLS = ("auto", "grouped", "dense", "gather", "loop")


def moe_impl(impl: str | None = None, rows: int | None = None, num_experts: int | None = None,
             expert_parallel: bool = False) -> str:
    """`impl` or $JAXLLM_MOE: "grouped", "dense", "gather", "loop", or "auto" (the default): grouped off
    CPU; on CPU, where jax expands ragged_dot into a slow dense form, "gather" while the step's `rows`
    (T*k) are fewer than `num_experts` (all of the model's: a small decode batch; only the routed experts'
    weights are read), else "dense". Under `expert_parallel` "loop" instead of "gather": a device's
    share of the assignments is unknown at trace time, so gather would read T*k whole experts on every
    device; the loop reads only its experts that some token was routed to."""
    impl = impl or os.environ.get(MOE_ENV, "auto") or "auto"
    if impl not in MOE_IMPLS:
        raise ValueError(f"{MOE_ENV}={impl!r} is invalid: must be one of {', '.join(MOE_IMPLS)}")
    if impl == "auto":
        if jax.default_backend() != "cpu":
            return "grouped"
        small = rows is not None and num_experts is not None and rows < num_experts
        return ("loop" if expert_parallel else "gather") if small else "dense"
    return impl


def route(x: jax.Array, w_router: jax.Array, top_k: int, renormalize: bool) -> tuple[jax.Array, jax.Array]:
    """x [T, E], w_router [E, X] → (weights [T, k] f32, experts [T, k] int32), best first."""
    logits = jnp.einsum("te,ex->tx", x, w_router).astype(jnp.float32)  # [T, X]
    probs = jax.nn.softmax(logits, axis=-1)  # [T, X] f32
    weights, experts = jax.lax.top_k(probs, top_k)  # [T, k], [T, k]
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


def _swiglu(gate_up: jax.Array) -> jax.Array:
    """[..., 2F] (one device's gate columns, then its up columns: shard-major, fusion.py) → [..., F]."""
    gate, up = jnp.split(gate_up, 2, axis=-1)
    return jax.nn.silu(gate) * up


def grouped_experts(x: jax.Array, weights: jax.Array, experts: jax.Array, w_gate_up: jax.Array,
                    w_down: jax.Array) -> jax.Array:
    """x [T, E], weights/experts [T, k], w_gate_up [X, E, 2F], w_down [X, F, E] → [T, E]: each token's
    k experts, weight-summed, computing only the T*k routed rows (ragged_dot over expert groups)."""
    T, k = experts.shape
    X = w_gate_up.shape[0]
    flat = experts.reshape(-1)  # [T*k] expert of assignment (token t, slot j) at t*k + j
    order = jnp.argsort(flat, stable=True)  # [T*k] assignments grouped by expert
    group_sizes = jnp.bincount(flat, length=X).astype(jnp.int32)  # [X], sums to T*k
    rows = x[order // k]  # [T*k, E] each assignment's token, in expert order
    if isinstance(w_gate_up, QuantWeight):
        row_expert = jnp.minimum(flat[order], X - 1)  # [T*k] each sorted row's expert (EP's id X: any, weight 0)
        h = _swiglu(moe_quant.grouped_dot(rows, w_gate_up, group_sizes, row_expert))  # [T*k, F]
        y = moe_quant.grouped_dot(h, w_down, group_sizes, row_expert)  # [T*k, E] in expert order
    else:
        h = _swiglu(jax.lax.ragged_dot(rows, w_gate_up, group_sizes))  # [T*k, F]
        y = jax.lax.ragged_dot(h, w_down, group_sizes)  # [T*k, E] in expert order
    unsort = jnp.zeros_like(order).at[order].set(jnp.arange(T * k, dtype=order.dtype))  # [T*k] inverse perm
    y = y[unsort].reshape(T, k, -1)  # [T, k, E] back in (token, slot) order
    return jnp.einsum("tke,tk->te", y.astype(jnp.float32), weights).astype(x.dtype)


def dense_experts(x: jax.Array, weights: jax.Array, experts: jax.Array, w_gate_up: jax.Array,
                  w_down: jax.Array) -> jax.Array:
    """Same contract as `grouped_experts`, computed with every expert on every token; the experts a
    token was not routed to get weight 0. Written as dots batched over the experts (x broadcast to
    [X, T, E]): XLA CPU runs "xte,xef->xtf" as X GEMMs, but "te,xef->txf" ~10x slower (bench/RESULTS.md)."""
    T = x.shape[0]
    X = w_gate_up.shape[0]
    combine = jnp.zeros((T, X), jnp.float32).at[jnp.arange(T)[:, None], experts].add(weights)  # [T, X]
    if isinstance(w_gate_up, QuantWeight):  # one expert at a time (moe_quant.py: no converted copy of all)
        return moe_quant.dense_loop(x, combine, w_gate_up, w_down, _swiglu).astype(x.dtype)
    xb = jnp.broadcast_to(x, (X,) + x.shape)  # [X, T, E]
    h = _swiglu(jnp.einsum("xte,xef->xtf", xb, w_gate_up))  # [X, T, F]
    y = jnp.einsum("xtf,xfe->xte", h, w_down)  # [X, T, E]
    return jnp.einsum("xte,tx->te", y.astype(jnp.float32), combine).astype(x.dtype)


def gather_experts(x: jax.Array, weights: jax.Array, experts: jax.Array, w_gate_up: jax.Array,
                   w_down: jax.Array) -> jax.Array:
    """Same contract as `grouped_experts`: each of the T*k assignments gathers its expert's weights
    ([T*k, E, 2F] and [T*k, F, E]) and runs one batched matvec. Reads T*k experts' weights (copying
    them once): below X rows, less than the dense form's X; above, more."""
    T, k = experts.shape
    flat = jnp.minimum(experts.reshape(-1), w_gate_up.shape[0] - 1)  # [T*k]: token t's slot j at t*k + j
    # (an id past the experts, another device's under EP, weighted 0, reads the last one)
    rows = jnp.repeat(x, k, axis=0)  # [T*k, E]
    if isinstance(w_gate_up, QuantWeight):  # the routed experts' q gathered in 8 bits, then converted
        h = _swiglu(moe_quant.gather_dot("re,ref->rf", rows, w_gate_up, flat))  # [T*k, F]
        y = moe_quant.gather_dot("rf,rfe->re", h, w_down, flat).reshape(T, k, -1)  # [T, k, E]
    else:
        h = _swiglu(jnp.einsum("re,ref->rf", rows, w_gate_up[flat]))  # [T*k, F]
        y = jnp.einsum("rf,rfe->re", h, w_down[flat]).reshape(T, k, -1)  # [T, k, E]
    return jnp.einsum("tke,tk->te", y.astype(jnp.float32), weights).astype(x.dtype)


def loop_experts(x: jax.Array, weights: jax.Array, experts: jax.Array, w_gate_up: jax.Array,
                 w_down: jax.Array) -> jax.Array:
    """Same contract as `grouped_experts`: a loop over the experts that runs (`lax.cond`) only those some
    token is routed to, each on every token, the outputs weighted like dense's. Reads the distinct routed
    experts' weights and nothing else (no copies); under expert parallelism a device's own routed experts."""
    T = x.shape[0]
    X = w_gate_up.shape[0]
    combine = jnp.zeros((T, X), jnp.float32).at[jnp.arange(T)[:, None], experts].add(weights)  # [T, X]
    hit = jnp.zeros((X,), jnp.bool_).at[experts.reshape(-1)].set(True)  # [X]; an id past X (EP) is dropped
    return moe_quant.dense_loop(x, combine, w_gate_up, w_down, _swiglu, hit).astype(x.dtype)


def moe_mlp(x: jax.Array, w_router: jax.Array, w_gate_up: jax.Array, w_down: jax.Array, top_k: int,
            renormalize: bool, layout=None, impl: str | None = None) -> jax.Array:
    """One layer's MoE MLP: x [T, E] (replicated) → [T, E] (replicated). `w_gate_up` [X, E, 2F] fused
    shard-major and `w_down` [X, F, E]: under a TPLayout `layout`, F sharded on "tp", or with
    `layout.expert_parallel` X sharded on "tp" (whole experts, gate/up plainly concatenated)."""
    weights, experts = route(x, w_router, top_k, renormalize)  # [T, k] each, replicated
    X = w_gate_up.shape[0]
    ep = layout is not None and layout.expert_parallel
    local_x = X // layout.tp if ep else X  # experts on one device
    path = moe_impl(impl, x.shape[0] * top_k, X, ep)  # CPU, small batch: gather (EP: loop), else dense
    fn = {"grouped": grouped_experts, "dense": dense_experts, "gather": gather_experts, "loop": loop_experts}[path]
    if layout is None:
        return fn(x, weights, experts, w_gate_up, w_down)

    def local(x, weights, experts, w_gate_up, w_down):  # TP: this device's F/tp slice of every expert
        if ep:  # EP: its X/tp whole experts; the other devices' assignments get weight 0 here
            weights, experts = local_assignments(weights, experts, jax.lax.axis_index(TP) * local_x, local_x)
        return jax.lax.psum(fn(x, weights, experts, w_gate_up, w_down), TP)

    specs = (P(), P(), P(), _spec(layout, w_gate_up, ("experts", "embed", "expert_mlp2")),
             _spec(layout, w_down, ("experts", "expert_mlp", "embed")))
    return jax.shard_map(local, mesh=layout.mesh, in_specs=specs, out_specs=P(),
                         check_vma=False)(x, weights, experts, w_gate_up, w_down)


def local_assignments(weights: jax.Array, experts: jax.Array, first, n: int) -> tuple[jax.Array, jax.Array]:
    """Expert parallelism: the replicated routing (weights [T, k] f32, experts [T, k] global ids) as
    one device's, whose experts are [first, first + n): ids made local, and an assignment to another
    device's expert gets weight 0 and the id `n` (one past the local experts). Every path copes with
    that id: grouped's bincount and ragged_dot leave its rows out (sorted last, in no group: zero
    rows), dense's and loop's scatters drop it, gather clips it to a local expert (weighted 0)."""
    ids = experts - first  # [T, k]
    here = (ids >= 0) & (ids < n)  # [T, k]
    return jnp.where(here, weights, 0.0), jnp.where(here, ids, n).astype(jnp.int32)


def _spec(layout, w, axes: tuple[str, ...]):
    """The shard_map spec of an expert weight: its axes', or a QuantWeight's (q like the weight, the
    scale like its output axes: `quant.expert_scale_axes`)."""
    if isinstance(w, QuantWeight):  # block scales [X, in/B, out] (fp8 checkpoint, int4, AWQ/GPTQ offsets): like the weight
        s = layout.spec(axes if w.scale.ndim == w.q.ndim else expert_scale_axes(axes))
        return QuantWeight(layout.spec(axes), s, None if w.offset is None else s, w.packed, w.pack_axis)
    return layout.spec(axes)
