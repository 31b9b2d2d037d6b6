"""Fused projections: Q/K/V in one weight (wqkv), gate/up in one (w_gate_up), in shard-major order.

Checkpoints keep handing over separate wq/wk/wv (bq/bk/bv) and w_gate/w_up (`PARAM_AXES`, the
loaders' contract); `build_model` / `TPLayout.place_params` fuse them as they place them, so every
loader (HF, GGUF, Orbax, dummy) gives the model the same held layout (`MODEL_AXES` in llama_params.py):

    wqkv      [.., E, H+2K, D]  = per device d of tp: its H/tp q heads, its K/tp k heads, its K/tp v heads
    bqkv      [.., H+2K, D]       (the same order)
    w_gate_up [.., E, 2F]       = per device d: its F/tp gate columns, then its F/tp up columns

Sharded on the fused axis ("qkv_heads" / "mlp2" on "tp"), device d's block holds exactly the q, k, v
(gate, up) slices that the unfused column-parallel weights would give it; at tp=1 the order is plain
concatenation. K is the model's kv heads: with tp > num_kv_heads each checkpoint kv head is repeated
(layout.kv_repeat) before fusing. The model splits a fused output with `split_fused`, which keeps
each device's part where it is (no collective).
"""
from __future__ import annotations

import jax
import numpy as np

from jaxllm.parallel.ops import constrain

# held name -> (checkpoint names fused in that order, the fused axis counted from the end)
FUSED: dict[str, tuple[tuple[str, ...], int]] = {
    "layers.wqkv": (("layers.wq", "layers.wk", "layers.wv"), -2),
    "layers.bqkv": (("layers.bq", "layers.bk", "layers.bv"), -2),
    "layers.w_gate_up": (("layers.w_gate", "layers.w_up"), -1),
    "layers.we_gate_up": (("layers.we_gate", "layers.we_up"), -1),  # [.., X, E, 2F]: per expert, like w_gate_up
}
# Fused MoE expert weights: fused for layout.expert_tp (tp, or 1 under expert parallelism)
EXPERT_FUSED = ("layers.we_gate_up",)
# Checkpoint params whose kv-head axis (-2) is repeated layout.kv_repeat times before fusing.
KV_PARAMS = ("layers.wk", "layers.wv", "layers.bk", "layers.bv")
FUSED_PARTS = {part: held for held, (parts, _) in FUSED.items() for part in parts}
# each fused projection's output: (its fused logical axis, the logical axes of each part's output),
# what `split_fused` (the decoder) takes
FUSED_OUTPUTS: dict[str, tuple[str, tuple[tuple[str, ...], ...]]] = {
    "wqkv": ("qkv_heads", (("tokens", "heads", "head_dim"), ("tokens", "kv_heads", "head_dim"),
                           ("tokens", "kv_heads", "head_dim"))),
    "w_gate_up": ("mlp2", (("tokens", "mlp"), ("tokens", "mlp"))),
}


def fuse(xp, parts, axis: int, tp: int, names: tuple[str, ...] | None = None):
    """Arrays equal in all axes but `axis` (negative) → one array, concatenated on `axis` in
    shard-major order: [part0 slice of shard 0, part1 slice of shard 0, ..., part0 slice of shard 1, ...].
    `xp`: numpy or jax.numpy (placement runs on the host or on device); `names` label errors."""
    a = parts[0].ndim + axis
    for i, p in enumerate(parts):
        if p.shape[a] % tp:
            name = names[i] if names else f"part {i}"
            raise ValueError(f"cannot fuse {name}: its axis {a} (size {p.shape[a]}, shape {tuple(p.shape)}) "
                             f"is not divisible by tensor_parallel_size={tp}")
    split = [p.reshape(p.shape[:a] + (tp, p.shape[a] // tp) + p.shape[a + 1:]) for p in parts]  # [.., tp, n/tp, ..]
    out = xp.concatenate(split, axis=a + 1)  # [.., tp, sum(n)/tp, ..]
    return out.reshape(out.shape[:a] + (out.shape[a] * out.shape[a + 1],) + out.shape[a + 2:])


def placement_plan(names, kv_repeat: int, tp: int, expert_tp: int | None = None
                   ) -> list[tuple[str, tuple[str, ...], object]]:
    """For checkpoint param `names`: [(held name, checkpoint names it is made of, fn(xp, *arrays))].
    fn repeats kv heads `kv_repeat` times and fuses in shard-major order for `tp` (the MoE experts'
    gate/up for `expert_tp`, default tp: 1 under expert parallelism, where each expert is whole on one
    device and its gate/up are plainly concatenated); plain params map to themselves with fn None."""
    names = list(names)
    plan, done = [], set()
    for name in names:
        held = FUSED_PARTS.get(name)
        if held is None:
            plan.append((name, (name,), None))
            continue
        if held in done:
            continue
        done.add(held)
        parts, axis = FUSED[held]
        missing = [p for p in parts if p not in names]
        if missing:
            raise ValueError(f"parameters missing to build {held}: {', '.join(missing)}")

        n = tp if expert_tp is None or held not in EXPERT_FUSED else expert_tp

        def fn(xp, *arrays, parts=parts, axis=axis, n=n):
            arrays = [xp.repeat(x, kv_repeat, axis=-2) if kv_repeat > 1 and p in KV_PARAMS else x
                      for p, x in zip(parts, arrays)]
            return fuse(xp, arrays, axis, n, parts)

        plan.append((held, parts, fn))
    return plan


def split_fused(y: jax.Array, sizes: tuple[int, ...], layout, fused_axis: str,
                part_axes: tuple[tuple[str, ...], ...]) -> list[jax.Array]:
    """A fused projection's output y [T, sum(sizes), *rest] (shard-major, see module doc) → its parts
    [T, size_i, *rest], each sharded like the unfused projection's output (`part_axes`). Reshaping
    the fused axis to [tp, n/tp] and slicing the local axis keeps every part on the device that
    computed it."""
    tp = 1 if layout is None else layout.tp
    T, n, rest = y.shape[0], y.shape[1], tuple(y.shape[2:])
    rest_axes = tuple(part_axes[0][2:])
    y = y.reshape((T, tp, n // tp) + rest)  # [T, tp, n/tp, *rest]: axis 1 is the device
    y = constrain(y, layout, ("tokens", fused_axis, None) + rest_axes)
    out, start = [], 0
    for size, axes in zip(sizes, part_axes):
        part = y[:, :, start:start + size // tp]  # [T, tp, size/tp, *rest]
        start += size // tp
        out.append(constrain(part.reshape((T, size) + rest), layout, axes))
    return out


def unfuse_numpy(fused: np.ndarray, sizes: tuple[int, ...], axis: int, tp: int) -> list[np.ndarray]:
    """Inverse of `fuse` on the host (tests, converters): the parts in their own order."""
    a = fused.ndim + axis
    x = fused.reshape(fused.shape[:a] + (tp, fused.shape[a] // tp) + fused.shape[a + 1:])
    bounds = np.cumsum([0] + [s // tp for s in sizes])
    return [np.take(x, np.arange(lo, hi), axis=a + 1).reshape(fused.shape[:a] + (s,) + fused.shape[a + 1:])
            for lo, hi, s in zip(bounds[:-1], bounds[1:], sizes)]
