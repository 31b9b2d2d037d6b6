"""An independent reference for LoRA slot writes: the numpy padding the engine thread used to do
(main 3af1d53's `LoRASlots.slot_arrays`, written out again here), random adapters built in memory,
and the slots' contents read back per slot as numpy.

`padded_slot(...)`: {name: (a [L, in..., P·R], [b_p [L, R, out_p...]])}: each part's A in columns
pR..pR+r of a, its B in rows 0..r of b_p, zeros elsewhere, B's kv heads repeated `kv_repeat` times
(np.repeat on the heads axis, as the model repeats them under tensor parallelism)."""
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


def padded_slot(adapter: LoRAAdapter | None, config, max_rank: int, kv_repeat: int, dtype) -> dict:
    """The slot contents `adapter` must leave (None: all zeros), in `dtype` (numpy)."""
    L, R, dt = config.num_layers, max_rank, np.dtype(dtype)
    shapes = module_shapes(config)
    out = {}
    for name, parts in TARGETS.items():
        ins = shapes[parts[0]][0]
        a = np.zeros((L,) + ins + (len(parts) * R,), dt)
        bs = []
        for p, param in enumerate(parts):
            b = np.zeros((L, R) + shapes[param][1], dt)
            if adapter is not None and param in adapter.modules:
                pa, pb = adapter.modules[param]
                r = pa.shape[-1]
                a[..., p * R:p * R + r] = pa.astype(dt)
                b[:, :r] = pb.astype(dt)
            if kv_repeat > 1 and param in KV:
                b = np.repeat(b, kv_repeat, axis=-2)
            bs.append(b)
        out[name] = (a, bs)
    return out


def read_slot(slots, slot: int) -> dict:
    """Slot `slot`'s (1-based) contents of a LoRASlots as numpy, `padded_slot`'s structure (both loops)."""
    i = slot - 1
    if slots.stacked:
        return {n: (np.asarray(p.a[:, i]), [np.asarray(b[:, i]) for b in p.b]) for n, p in slots.weights.items()}
    layers = slots.weights
    return {n: (np.stack([np.asarray(lay[n].a[i]) for lay in layers]),
                [np.stack([np.asarray(lay[n].b[k][i]) for lay in layers]) for k in range(len(layers[0][n].b))])
            for n in layers[0]}


def assert_slot_equal(got: dict, want: dict, where: str = "") -> None:
    assert got.keys() == want.keys()
    for n in want:
        (ga, gbs), (wa, wbs) = got[n], want[n]
        assert ga.dtype == wa.dtype and ga.shape == wa.shape, (where, n, ga.dtype, ga.shape, wa.shape)
        np.testing.assert_array_equal(ga, wa, err_msg=f"{where} {n}.a")
        assert len(gbs) == len(wbs)
        for k, (gb, wb) in enumerate(zip(gbs, wbs)):
            assert gb.dtype == wb.dtype and gb.shape == wb.shape, (where, n, k, gb.shape, wb.shape)
            np.testing.assert_array_equal(gb, wb, err_msg=f"{where} {n}.b[{k}]")
