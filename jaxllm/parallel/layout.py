"""TPLayout: how one model is laid out on a tensor-parallel mesh, and parameter placement.

`TPLayout.plan(config, tp)` validates that the model fits `tp` (errors name the numbers) and
decides the two model-dependent choices:

* KV-head replication. With tp <= num_kv_heads, kv heads are sharded (num_kv_heads % tp == 0).
  With tp > num_kv_heads (tp % num_kv_heads == 0), every kv head is repeated r = tp / num_kv_heads
  times in wk/wv/bk/bv before they are fused into wqkv/bqkv (and so in the KV cache), making an equivalent model with tp kv heads and
  exactly one kv head per device: q head h of the original uses kv head h // (H/K); in the repeated
  model it uses kv head h // (H/(K·r)), a copy of the same head, and the q heads on device d all map
  to kv head d. Per-device memory equals that at tp = num_kv_heads (the minimum possible with a
  whole head per device); the cache's total grows r× like vLLM's replication.
* Vocabulary: embed / lm_head are vocab-parallel when vocab_size % tp == 0 (always true for the
  presets and SmolLM2), otherwise replicated.

`place_params` also fuses wq/wk/wv → wqkv, bq/bk/bv → bqkv and w_gate/w_up → w_gate_up in
shard-major order (jaxllm/models/fusion.py), so each device's shard of a fused weight is exactly its
own q, k, v (gate, up) slices.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxllm.models.config import ModelConfig
from jaxllm.models.fusion import KV_PARAMS, placement_plan
from jaxllm.parallel.mesh import make_mesh
from jaxllm.parallel.rules import (CACHE_AXES, CACHE_SCALE_AXES, LOGICAL_AXIS_RULES, TP, expert_parallel_rules,
                                   logical_to_spec)

__all__ = ["KV_PARAMS", "TPLayout", "check_fits", "valid_tp_sizes"]


def valid_tp_sizes(config: ModelConfig, limit: int | None = None, expert_parallel: bool = False) -> list[int]:
    H, K, F = config.num_heads, config.num_kv_heads, config.mlp_size
    return [t for t in range(1, (limit or H) + 1)
            if H % t == 0 and (K % t == 0 or t % K == 0) and config.shared_expert_intermediate_size % t == 0
            and (config.num_experts % t == 0 if expert_parallel else F % t == 0)]


def check_fits(config: ModelConfig, tp: int, expert_parallel: bool = False) -> None:
    """ValueError naming the numbers when the model cannot be split `tp` ways (with `expert_parallel`:
    whole experts per device, so num_experts rather than moe_intermediate_size must divide by tp)."""
    H, K, F = config.num_heads, config.num_kv_heads, config.mlp_size
    if expert_parallel and not config.is_moe:
        raise ValueError(f"enable_expert_parallel=True is invalid for this model: the {config.architecture} "
                         f"model has no experts (num_experts=0); expert parallelism needs a MoE model")
    problem = None
    if H % tp:
        problem = f"num_attention_heads={H} is not divisible by {tp}"
    elif K % tp and tp % K:
        problem = (f"num_key_value_heads={K} is neither divisible by {tp} (to shard kv heads) nor a divisor "
                   f"of it (to replicate each kv head {tp}/{K} times)")
    elif expert_parallel and config.num_experts % tp:
        problem = f"num_experts={config.num_experts} is not divisible by {tp} (enable_expert_parallel: whole experts per device)"
    elif F % tp and not expert_parallel:
        name = "moe_intermediate_size" if config.is_moe else "intermediate_size"
        problem = f"{name}={F} is not divisible by {tp}"
    elif config.shared_expert_intermediate_size % tp:
        problem = f"shared_expert_intermediate_size={config.shared_expert_intermediate_size} is not divisible by {tp}"
    if problem:
        raise ValueError(f"tensor_parallel_size={tp} does not fit the model: {problem}; "
                         f"valid sizes for this model: {valid_tp_sizes(config, expert_parallel=expert_parallel)}")


@dataclasses.dataclass(frozen=True)
class TPLayout:
    mesh: Mesh
    tp: int
    kv_repeat: int  # each checkpoint kv head appears kv_repeat times (1: kv heads are sharded)
    shard_vocab: bool  # embed / lm_head split on the vocabulary axis
    expert_parallel: bool = False  # MoE experts whole, X/tp per device (`rules.expert_parallel_rules`)

    @staticmethod
    def plan(config: ModelConfig, tp: int, mesh: Mesh | None = None, expert_parallel: bool = False) -> "TPLayout":
        mesh = make_mesh(tp) if mesh is None else mesh
        if mesh.shape[TP] != tp:
            raise ValueError(f"mesh axis {TP!r} has size {mesh.shape[TP]}, expected tensor_parallel_size={tp}")
        check_fits(config, tp, expert_parallel)
        K = config.num_kv_heads
        return TPLayout(mesh, tp, tp // K if tp > K else 1, config.vocab_size % tp == 0, expert_parallel)

    # ----- specs and shardings ---------------------------------------------------------------
    @property
    def rules(self) -> dict[str, str | None]:
        rules = dict(LOGICAL_AXIS_RULES, vocab=TP if self.shard_vocab else None)
        return expert_parallel_rules(rules) if self.expert_parallel else rules

    @property
    def expert_tp(self) -> int:
        """How many ways each expert's F axis is split (and its gate/up fused shard-major): tp, or 1 under EP."""
        return 1 if self.expert_parallel else self.tp

    def spec(self, logical_axes: tuple[str | None, ...]) -> P:
        return logical_to_spec(logical_axes, self.rules)

    def sharding(self, logical_axes: tuple[str | None, ...]) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(logical_axes))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def cache_sharding(self) -> NamedSharding:
        return self.sharding(CACHE_AXES)

    def cache_scale_sharding(self) -> NamedSharding:
        """An fp8 cache's [num_layers, num_kv_heads] scales: each device holds its heads' scales."""
        return self.sharding(CACHE_SCALE_AXES)

    def model_config(self, config: ModelConfig) -> ModelConfig:
        """The config the sharded model runs: num_kv_heads × kv_repeat (same function)."""
        if self.kv_repeat == 1:
            return config
        return dataclasses.replace(config, num_kv_heads=config.num_kv_heads * self.kv_repeat)

    def param_shardings(self, config: ModelConfig) -> dict[str, NamedSharding]:
        """Shardings of a checkpoint's parameters (`param_shapes`, unfused) at `config`'s shapes."""
        from jaxllm.models.llama_params import PARAM_AXES, param_shapes

        return {name: self.sharding(PARAM_AXES[name]) for name in param_shapes(config)}

    def model_shardings(self, config: ModelConfig) -> dict[str, NamedSharding]:
        """Shardings of the parameters the model holds (`model_param_shapes(model_config(config))`: fused)."""
        from jaxllm.models.llama_params import MODEL_AXES, model_param_shapes

        return {name: self.sharding(MODEL_AXES[name]) for name in model_param_shapes(self.model_config(config))}

    def load_shardings(self, config: ModelConfig) -> dict[str, NamedSharding]:
        """Shardings to load a checkpoint (original shapes, unfused) into: the column-parallel
        shardings the fused weights are made of, except kv projections that get repeated
        afterwards, which load replicated (they are small)."""
        out = self.param_shardings(config)
        if self.kv_repeat > 1:
            for name in KV_PARAMS:
                if name in out:
                    out[name] = self.replicated
        return out

    # ----- placement -------------------------------------------------------------------------
    def place_params(self, config: ModelConfig, params: dict, dtype, split_layers: bool = False,
                     quantization: str | None = None) -> dict[str, jax.Array | list[jax.Array]]:
        """Checkpoint params (numpy on the host, or jax arrays; `param_shapes(config)`) → the
        sharded model's held params (`model_param_shapes(model_config(config))`: kv heads repeated,
        wqkv/bqkv/w_gate_up fused in shard-major order); with `split_layers` each stacked
        "layers.*" parameter becomes a list of per-layer arrays (the "unroll" layer loop, see
        jaxllm/models/llama.py).

        Numpy arrays go straight from host memory to their shards (each device receives only its
        slice; the full model never sits on one device; repetition and fusion happen on the host one
        layer at a time when split). Pops from `params` as it goes so host copies can be freed.

        `quantization` ("int8" / "fp8" / "int4"): each per-layer projection (`QUANT_PARAMS`) is quantized on
        device right after it is placed (a QuantWeight: q sharded like the weight, the per-output-
        channel scale like the weight's output axes, `scale_axes`; int4's group scales like the weight). Params that are QuantWeights already
        (an fp8 checkpoint's projections, a GGUF's Q8_0 ones) are placed as they are, sharded the same way."""
        from jaxllm.models.llama_params import MODEL_AXES
        from jaxllm.models.quant import (EXPERT_QUANT_PARAMS, QUANT_PARAMS, QuantWeight, expert_scale_axes, quantize,
                                         quantize_experts, scale_axes)

        out = {}
        for held, sources, fn in placement_plan(params, self.kv_repeat, self.tp, self.expert_tp):
            xs = [params.pop(s) for s in sources]
            axes = MODEL_AXES[held]
            if isinstance(xs[0], QuantWeight) and held in EXPERT_QUANT_PARAMS:  # an fp8 checkpoint's experts:
                # [L, X, in, out], the contracted axis at 2; per-channel scales [L, X, out]
                out[held] = self._place_quant(xs, axes, 2, fn, config.num_layers, split_layers,
                                              channel_axes=expert_scale_axes(axes))
                continue
            if isinstance(xs[0], QuantWeight):  # an fp8 checkpoint's / Q8_0 projection: placed as stored
                out[held] = self._place_quant(xs, axes, QUANT_PARAMS[held], fn, config.num_layers, split_layers)
                continue
            if split_layers and held.startswith("layers."):
                sh = self.sharding(axes[1:])  # one layer's slice
                out[held] = _place_layers(xs, config.num_layers, fn, dtype, sh)
            else:
                out[held] = _place(xs, fn, dtype, self.sharding(axes))
            del xs
            if quantization and held in QUANT_PARAMS:
                n = QUANT_PARAMS[held]
                stacked = not isinstance(out[held], list)
                lead = 0 if stacked else 1  # a per-layer weight has no "layers" axis
                q_sh = self.sharding(axes[lead:])
                s_sh = self.sharding(scale_axes(axes, n)[lead:])
                quant = lambda w, n=n, st=stacked: quantize(w, quantization, n, st)  # noqa: E731
                if quantization == "int4":  # group scales [(L,) in..., in_last/g, out...]: sharded like the weight,
                    s_sh = q_sh  # split finer where a group would straddle two devices (a row-parallel w_down)
                    quant = lambda w, n=n, st=stacked, lead=lead: self._int4_whole_groups(  # noqa: E731
                        quantize(w, "int4", n, st), axes, n - lead)
                f = jax.jit(quant, out_shardings=QuantWeight(q_sh, s_sh))
                out[held] = f(out[held]) if stacked else [f(w) for w in out[held]]
            elif quantization and held in EXPERT_QUANT_PARAMS:  # per expert and output channel, scale [(L,) X, out]
                lead = 0 if not isinstance(out[held], list) else 1
                s_axes = expert_scale_axes(axes)
                quant = lambda w: quantize_experts(w, quantization)  # noqa: E731
                if quantization == "int4":  # group scales [(L,) X, in/g, out] like the weight (q int4, unpacked
                    s_axes = axes  # under TP), split finer where a group of w_down's F would straddle two devices
                    quant = lambda w, lead=lead: self._int4_whole_groups(  # noqa: E731
                        quantize_experts(w, "int4"), axes, 2 - lead)
                sh = QuantWeight(self.sharding(axes[lead:]), self.sharding(s_axes[lead:]))
                f = jax.jit(quant, out_shardings=sh)
                out[held] = [f(w) for w in out[held]] if lead else f(out[held])
        return out

    def _int4_whole_groups(self, w, axes: tuple[str, ...], axis: int):
        """`--quantization int4`'s QuantWeight with its group scales repeated along `axis` (the last
        contracted one) where that axis is sharded and a group would straddle two devices (`_whole_blocks`:
        finer blocks, each with its group's scale, the same weight)."""
        from jaxllm.models.quant import QuantWeight

        if self.rules.get(axes[len(axes) - w.q.ndim + axis]) != TP:
            return w
        return QuantWeight(w.q, _whole_blocks(w.q, w.scale, axis, self.tp))

    def _place_quant(self, xs: list, axes: tuple[str, ...], n: int, fn, num_layers: int, split_layers: bool,
                     channel_axes: tuple[str, ...] | None = None):
        """Pre-quantized parts (QuantWeights of numpy, stacked) → the held QuantWeight (a list per
        layer when `split_layers`): q sharded like the weight, a per-channel scale like the weight's
        output axes, block scales ([L, in..., in_last/B, out...]) like the weight. kv-head repetition
        and shard-major fusion (`fn`) act on the output axes, which q and scale share at the end. Experts:
        `n` = 2 (the blocked axis is q's axis 2) and `channel_axes` their per-channel scale's axes."""
        from jaxllm.models.quant import QuantWeight, scale_axes

        blocked = xs[0].scale.ndim == xs[0].q.ndim
        s_axes = axes if blocked else channel_axes or scale_axes(axes, n)
        qs, ss = [x.q for x in xs], [x.scale for x in xs]
        os_ = None if xs[0].offset is None else [x.offset for x in xs]  # 4-bit asymmetric: like the block scales
        if blocked and self.rules.get(axes[n]) == TP:  # the blocked axis (the last contracted one) is
            # sharded (a row-parallel w_down): its blocks must not straddle shards: finer blocks, same
            # scales (and offsets: each finer block keeps its group's s and m, the same weight)
            ss = [_whole_blocks(q, sc, n, self.tp) for q, sc in zip(qs, ss)]
            os_ = None if os_ is None else [_whole_blocks(q, o, n, self.tp) for q, o in zip(qs, os_)]
        q_dt, s_dt = qs[0].dtype, ss[0].dtype
        if split_layers:
            q = _place_layers(qs, num_layers, fn, q_dt, self.sharding(axes[1:]))
            s = _place_layers(ss, num_layers, fn, s_dt, self.sharding(s_axes[1:]))
            o = [None] * num_layers if os_ is None else _place_layers(os_, num_layers, fn, os_[0].dtype,
                                                                       self.sharding(s_axes[1:]))
            return [QuantWeight(a, b, c) for a, b, c in zip(q, s, o)]
        o = None if os_ is None else _place(os_, fn, os_[0].dtype, self.sharding(s_axes))
        return QuantWeight(_place(qs, fn, q_dt, self.sharding(axes)), _place(ss, fn, s_dt, self.sharding(s_axes)), o)


def _whole_blocks(q, scale, axis: int, tp: int):
    """Block scales [L, in..., nb, out...] (blocks of B = q.shape[axis] / nb along `axis`) repeated r
    times along it (blocks of B / r, each with its block's scale: the same weight), r the least
    divisor of B for which nb * r splits evenly over tp devices (r = B at worst: the axis, sharded,
    divides by tp). Only for an axis that is sharded: wo's blocks run along head_dim, wqkv's along
    the hidden axis, neither split."""
    nb = scale.shape[axis]
    bsz = q.shape[axis] // nb
    r = next(r for r in range(1, bsz + 1) if bsz % r == 0 and (nb * r) % tp == 0)
    repeat = jnp.repeat if isinstance(scale, jax.Array) else np.repeat  # numpy (a checkpoint's) or traced (int4 at load)
    return scale if r == 1 else repeat(scale, r, axis=axis)


def _place(xs: list, fn, dtype, sharding: NamedSharding) -> jax.Array:
    """fn(xp, *xs) (xs[0] if fn is None) in `dtype`, placed with `sharding`: jitted on device when
    any input is a jax array, else computed on the host and sent shard by shard."""
    if any(isinstance(x, jax.Array) for x in xs):
        x = xs[0]
        if fn is None and x.dtype == jnp.dtype(dtype) and x.sharding == sharding:
            return x
        return jax.jit(lambda *a: (a[0] if fn is None else fn(jnp, *a)).astype(dtype), out_shardings=sharding)(*xs)
    return _from_host([np.asarray(x) for x in xs], fn, dtype, sharding)


def _place_layers(xs: list, num_layers: int, fn, dtype, sharding: NamedSharding) -> list[jax.Array]:
    """Per layer i: fn(xp, *(x[i] for x in xs)) placed like `_place` (one compile for all layers)."""
    if any(isinstance(x, jax.Array) for x in xs):
        f = jax.jit(lambda i, *a: (lambda p: p[0] if fn is None else fn(jnp, *p))([x[i] for x in a]).astype(dtype),
                    out_shardings=sharding)
        return [f(jnp.int32(i), *xs) for i in range(num_layers)]
    return [_from_host([np.asarray(x[i]) for x in xs], fn, dtype, sharding) for i in range(num_layers)]


def _from_host(xs: list[np.ndarray], fn, dtype, sharding: NamedSharding) -> jax.Array:
    a = xs[0] if fn is None else fn(np, *xs)
    a = a.astype(jnp.dtype(dtype), copy=False)
    return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])
