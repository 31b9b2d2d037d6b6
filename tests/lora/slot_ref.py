"""An independent reference for LoRA slot writes: the numpy padding the engine thread used to do
(main 3af1d53's `LoRASlots.slot_arrays`, written out again here) and the block-diagonal B laid out in
the fused output's shard-major order by explicit column indices (not jaxllm.models.fusion), random
adapters built in memory, and the slots' contents read back per slot as numpy.

`padded_slot(...)`: {name: (a [L, in..., P·R], b [L, P·R, out...])}: each part's A in columns
pR..pR+r of a; its B in rows pR..pR+r of b, in its own columns of the fused output (wqkv: the heads
axis, w_gate_up: the columns; for `tp` devices shard d holds q, k, v's (gate, up's) d-th 1/tp in
turn), zeros elsewhere; B's kv heads repeated `kv_repeat` times (np.repeat on the heads axis, as the
model repeats them under tensor parallelism)."""
from __future__ import annotations

import numpy as np

from jaxllm.lora.peft import LoRAAdapter, module_shapes

TARGETS = {"wqkv": ("layers.wq", "layers.wk", "layers.wv"), "wo": ("layers.wo",),
           "w_gate_up": ("layers.w_gate", "layers.w_up"), "w_down": ("layers.w_down",)}
KV = ("layers.wk", "layers.wv")


def random_adapter(config, rank: int, seed: int, params=None, name: str = "a") -> LoRAAdapter:
    """A LoRAAdapter of `config` (the checkpoint's) with N(0, 1) f32 A and B for `params` (None: all)."""
    rng = np.random.default_rng(seed)
    L = config.num_layers
    shapes = module_shapes(config)
    modules = {}
    for p in shapes if params is None else params:
        ins, outs = shapes[p]
        modules[p] = (rng.standard_normal((L,) + ins + (rank,)).astype(np.float32),  # [L, in..., r]
                      rng.standard_normal((L, rank) + outs).astype(np.float32))  # [L, r, out...]
    return LoRAAdapter(name, rank, modules)


def part_columns(sizes: list[int], p: int, tp: int) -> np.ndarray:
    """Indices of part p's `sizes[p]` entries on a fused axis of sum(sizes), shard-major for `tp`
    devices: device d's block is [part 0's d-th 1/tp, part 1's d-th 1/tp, ...]."""
    total = sum(sizes)
    cols = []
    for d in range(tp):
        start = d * total // tp + sum(sizes[:p]) // tp
        cols.extend(range(start, start + sizes[p] // tp))
    return np.array(cols)


def padded_slot(adapter: LoRAAdapter | None, config, max_rank: int, kv_repeat: int, dtype, tp: int = 1) -> dict:
    """The slot contents `adapter` must leave (None: all zeros), in `dtype` (numpy)."""
    L, R, dt = config.num_layers, max_rank, np.dtype(dtype)
    shapes = module_shapes(config)
    out = {}
    for name, parts in TARGETS.items():
        ins = shapes[parts[0]][0]
        P = len(parts)
        a = np.zeros((L,) + ins + (P * R,), dt)
        outs = [(shapes[q][1][0] * (kv_repeat if q in KV else 1),) + shapes[q][1][1:] for q in parts]
        sizes = [o[0] for o in outs]  # on the fused axis: the first output axis (heads; columns)
        b = np.zeros((L, P * R, sum(sizes)) + outs[0][1:], dt)
        for p, param in enumerate(parts):
            if adapter is None or param not in adapter.modules:
                continue
            pa, pb = adapter.modules[param]
            r = pa.shape[-1]
            a[..., p * R:p * R + r] = pa.astype(dt)
            if kv_repeat > 1 and param in KV:
                pb = np.repeat(pb, kv_repeat, axis=-2)
            b[:, p * R:p * R + r, part_columns(sizes, p, tp)] = pb.astype(dt)
        out[name] = (a, b)
    return out


def read_slot(slots, slot: int) -> dict:
    """Slot `slot`'s (1-based) contents of a LoRASlots as numpy, `padded_slot`'s structure (both loops)."""
    i = slot - 1
    if slots.stacked:
        return {n: (np.asarray(p.a[..., i, :]), np.asarray(p.b[:, i])) for n, p in slots.weights.items()}
    layers = slots.weights
    return {n: (np.stack([np.asarray(lay[n].a[..., i, :]) for lay in layers]),
                np.stack([np.asarray(lay[n].b[i]) for lay in layers]))
            for n in layers[0]}


def assert_slot_equal(got: dict, want: dict, where: str = "") -> None:
    assert got.keys() == want.keys()
    for n in want:
        for side, g, w in zip("ab", got[n], want[n]):
            assert g.dtype == w.dtype and g.shape == w.shape, (where, n, side, g.dtype, g.shape, w.shape)
            np.testing.assert_array_equal(g, w, err_msg=f"{where} {n}.{side}")
