"""LoRASlots: the runner's device-resident adapter slots and their in-place update.

Layout (per held projection of the model, `LORA_TARGETS`; S = max_loras, R = max_lora_rank, P = the
number of checkpoint projections fused into it: 3 for wqkv, 2 for w_gate_up, 1 for wo / w_down):

    a [L, S, in..., P·R]     the parts' A side by side on the rank axis (part p: columns pR..pR+r)
    b: P arrays [L, S, R, out_p...]   each part's own B (q, k, v; gate, up), unfused

(the "unroll" layer loop holds one [S, ...] array per layer instead, like its weights; the layer
axis leads so the "scan" loop scans the slots with the weights). One code path for the four
projections (`delta.lora_delta`): u = x·a once, then one u_p·b_p per part, and for a fused projection
`fusion.join_fused` (the inverse of the decoder's `split_fused`) puts the part deltas in the fused
output's shard-major order, each device concatenating its own slices.

Tensor parallelism by logical axes (`lora_axes`): a takes the held weight's input axes, each b its
unfused checkpoint projection's output axes (PARAM_AXES). Column-parallel wqkv / w_gate_up: a
replicated, b_q on "heads", b_k/b_v on "kv_heads", b_gate/b_up on "mlp": every part delta is born
on the device that holds those output columns and the join moves nothing. Row-parallel wo / w_down:
a sharded on the input axis, b replicated; XLA sums the partial u = x·a ([T, S, R]) in the same
all-reduce op as the base projection's partial output (tests/parallel/test_tp_engine.py checks the
HLO: the decode step's collectives are those of the step without LoRA).

Rejected first version (commit 6d5707b): one fused, block-diagonal b [L, S, P·R, out...] made with
the base weight's own `fusion.fuse`; simpler (no join) but its zero blocks made b of wqkv 3x and of
w_gate_up 2x the needed size, bytes read and FLOPs every step: 111 MiB of slots for SmolLM2-135M
with 4 slots of rank 16 against 74 MiB now (bench/RESULTS.md).

Slot s (1..S) lives at index s - 1; slot 0 (the base model) has no storage (delta.py). Adapters
arrive from `jaxllm/lora/peft.py` in checkpoint layout; `slot_arrays` pads the rank, repeats kv
heads (tensor parallelism with tp > kv heads) on the host; `set` writes them with one
jitted, donated update (compiled at warm-up, any slot: the slot is an argument). `prepare` does the
checks and the cast to the slots' dtype ahead of time (numpy only, thread-safe: the engine's adapter
loader runs it on its own thread) but keeps the adapter at its own rank: the host cache holds
`max_cpu_loras` of them, and a rank-8 adapter padded to max_lora_rank=64 would cost 8x its bytes
there (bench/lora_host_bytes.py). `set` pads it (fresh zeros, the adapter's columns copied in)
just before the device write, on the engine thread.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.lora.config import LoRAConfig
from jaxllm.lora.delta import LoRAPair
from jaxllm.lora.peft import LoRAAdapter, module_shapes
from jaxllm.models.fusion import FUSED, KV_PARAMS
from jaxllm.models.llama import MODEL_AXES, PARAM_AXES

# held short name -> the checkpoint projections fused into it, in order
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "wqkv": FUSED["layers.wqkv"][0], "wo": ("layers.wo",),
    "w_gate_up": FUSED["layers.w_gate_up"][0], "w_down": ("layers.w_down",),
}


@dataclasses.dataclass(frozen=True)
class SlotAdapter:
    """An adapter checked against the slots and cast to their dtype (``LoRASlots.prepare``), still
    at its own rank: ``modules`` {checkpoint name: (A [L, in..., r], B [L, r, out...])} numpy, as the
    LoRAAdapter's it came from (name / rank / path too). The host cache keeps these: a rank-8 adapter
    costs rank 8, not ``max_lora_rank``; ``LoRASlots.set`` pads it into the slot layout."""
    name: str
    rank: int
    modules: dict
    path: str = ""

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.modules.values())


def lora_axes(weight_axes: tuple[str, ...], num_in: int, stacked: bool) -> tuple[tuple, tuple]:
    """Logical axes of (a, b) from the base weight's ("layers", in..., out...)."""
    lead = ("layers", "lora_slots") if stacked else ("lora_slots",)
    ins, outs = weight_axes[1:1 + num_in], weight_axes[1 + num_in:]
    return lead + ins + ("lora_rank",), lead + ("lora_rank",) + outs


class LoRASlots:
    def __init__(self, config: LoRAConfig, model):
        """`model`: the LlamaForCausalLM the slots serve (its config, dtype, layer loop, layout)."""
        if jax.process_count() > 1:  # set_lora would have to run on every process (StepChannel)
            raise ValueError(f"enable_lora is not supported on {jax.process_count()} processes (multi-host) yet")
        self.config = config
        self.num_slots, self.rank = config.max_loras, config.max_lora_rank
        self.layout = layout = getattr(model, "layout", None)
        self.kv_repeat = 1 if layout is None else layout.kv_repeat
        mc = model.config
        self.num_layers = mc.num_layers
        # the config adapters are checked against: the checkpoint's (kv heads before repetition)
        self.adapter_config = dataclasses.replace(mc, num_kv_heads=mc.num_kv_heads // self.kv_repeat)
        self.ckpt_shapes = module_shapes(self.adapter_config)  # checkpoint name -> (in, out) per layer
        self.dtype = model.dtype
        self.stacked = model.layer_loop == "scan"
        R = self.rank
        held_out = module_shapes(mc)  # the model's: kv heads as repeated
        self.shapes, self.axes = {}, {}  # name -> (a, (b per part)) shapes / axes, without L and S
        for name, parts in LORA_TARGETS.items():
            ins = held_out[parts[0]][0]
            P = len(parts)
            self.shapes[name] = (ins + (P * R,), tuple((R,) + held_out[p][1] for p in parts))
            self.axes[name] = (lora_axes(MODEL_AXES[f"layers.{name}"], len(ins), self.stacked)[0],
                               tuple(lora_axes(PARAM_AXES[p], len(ins), self.stacked)[1] for p in parts))
        self.weights = self._zeros()
        self.nbytes = sum(x.nbytes for x in jax.tree.leaves(self.weights))
        self._zero_update = None  # numpy zeros of one slot, made on the first unload

        def update(weights, index, new):
            """weights with slot `index` (0-based) replaced by `new` ({name: LoRAPair [L, ...]})."""
            def put(w, x, axis):
                return jax.lax.dynamic_update_index_in_dim(w, x.astype(w.dtype), index, axis)

            if self.stacked:
                return {n: LoRAPair(put(p.a, new[n].a, 1), tuple(put(b, nb, 1) for b, nb in zip(p.b, new[n].b)))
                        for n, p in weights.items()}
            return [{n: LoRAPair(put(p.a, new[n].a[i], 0), tuple(put(b, nb[i], 0) for b, nb in zip(p.b, new[n].b)))
                     for n, p in layer.items()} for i, layer in enumerate(weights)]

        kw = {}
        if layout is not None:
            w_sh = jax.tree.map(lambda x: x.sharding, self.weights)
            def per_layer(axes, shape):  # the stacked update's slot-less axes
                return layout.sharding(("layers",) + axes[-len(shape):])

            new_sh = {n: LoRAPair(per_layer(self.axes[n][0], self.shapes[n][0]),
                                  tuple(per_layer(ax, sh) for ax, sh in zip(self.axes[n][1], self.shapes[n][1])))
                      for n in LORA_TARGETS}
            kw = dict(in_shardings=(w_sh, layout.replicated, new_sh), out_shardings=w_sh)
        self._update = jax.jit(update, donate_argnums=(0,), **kw)
        self._exe = None

    def _zeros(self):
        L, S = self.num_layers, self.num_slots
        lay = self.layout

        def zeros(shape, axes):
            if lay is None:
                return jnp.zeros(shape, self.dtype)
            return jax.jit(lambda: jnp.zeros(shape, self.dtype), out_shardings=lay.sharding(axes))()

        def pair(name, lead):
            (sa, sbs), (xa, xbs) = self.shapes[name], self.axes[name]
            return LoRAPair(zeros(lead + sa, xa), tuple(zeros(lead + sb, xb) for sb, xb in zip(sbs, xbs)))

        if self.stacked:
            return {n: pair(n, (L, S)) for n in LORA_TARGETS}
        return [{n: pair(n, (S,)) for n in LORA_TARGETS} for _ in range(L)]

    # ----- host side: an adapter in the slot layout -------------------------------------------
    def check(self, slot, adapter: LoRAAdapter | None) -> None:
        if isinstance(slot, bool) or not isinstance(slot, (int, np.integer)) or not 1 <= slot <= self.num_slots:
            raise ValueError(f"slot={slot!r} is invalid: must be an integer in 1..max_loras={self.num_slots}")
        if adapter is None:
            return
        if adapter.rank > self.rank:
            raise ValueError(f"adapter {adapter.name!r}: rank={adapter.rank} exceeds max_lora_rank={self.rank}")
        L = self.num_layers
        for param, (a, b) in adapter.modules.items():
            if param not in self.ckpt_shapes:
                raise ValueError(f"adapter {adapter.name!r}: module {param} is not a LoRA target of this model")
            ins, outs = self.ckpt_shapes[param]
            want = ((L,) + ins + (adapter.rank,), (L, adapter.rank) + outs)
            if (tuple(a.shape), tuple(b.shape)) != want:
                raise ValueError(f"adapter {adapter.name!r}: {param} A/B shapes {tuple(a.shape)}/{tuple(b.shape)} "
                                 f"do not match this model's {want[0]}/{want[1]} (an adapter of another model?)")

    def prepare(self, adapter: LoRAAdapter) -> SlotAdapter:
        """``adapter`` checked and cast to the slots' dtype at its own rank, ready for ``set`` (numpy
        only; any thread)."""
        self.check(1, adapter)
        dt = np.dtype(self.dtype)
        modules = {param: (a.astype(dt, copy=False), b.astype(dt, copy=False))
                   for param, (a, b) in adapter.modules.items()}
        return SlotAdapter(adapter.name, adapter.rank, modules, adapter.path)

    def slot_arrays(self, adapter: LoRAAdapter | SlotAdapter | None) -> dict[str, LoRAPair]:
        """{name: LoRAPair(a [L, in..., P·R], b per part [L, R, out_p...])} numpy in the slot layout
        and dtype: the adapter's rank-r columns, zeros past them (None: all zeros)."""
        L, R, dt = self.num_layers, self.rank, np.dtype(self.dtype)
        out = {}
        for name, parts in LORA_TARGETS.items():
            P = len(parts)
            ins = self.ckpt_shapes[parts[0]][0]
            a = np.zeros((L,) + ins + (P * R,), dt)  # [L, in..., P*R]
            bs = []
            for p, param in enumerate(parts):
                b = np.zeros((L, R) + self.ckpt_shapes[param][1], dt)  # [L, R, out_p...]
                if adapter is not None and param in adapter.modules:
                    pa, pb = adapter.modules[param]
                    r = pa.shape[-1]
                    a[..., p * R:p * R + r] = pa  # ranks r..R stay zero (an f32 adapter is cast here)
                    b[:, :r] = pb
                if self.kv_repeat > 1 and param in KV_PARAMS:
                    b = np.repeat(b, self.kv_repeat, axis=-2)  # the model's repeated kv heads
                bs.append(b)
            out[name] = LoRAPair(a, tuple(bs))
        return out

    # ----- device side ---------------------------------------------------------------------------
    def lower(self):
        """The update's lowering (the runner compiles it at warm-up)."""
        return self._update.lower(self.weights, np.int32(0), self.slot_arrays(None))

    def set(self, slot: int, adapter: LoRAAdapter | SlotAdapter | None, executable=None) -> None:
        """Writes `adapter` (None: zeros; a SlotAdapter: as prepared) into `slot` in place with the
        compiled update (`executable`, the runner's from warm-up; None: the jitted function)."""
        if isinstance(adapter, SlotAdapter):  # checked and cast by prepare (the loader thread)
            self.check(slot, None)
            new = self.slot_arrays(adapter)
        elif adapter is None:
            self.check(slot, None)
            if self._zero_update is None:
                self._zero_update = self.slot_arrays(None)
            new = self._zero_update
        else:
            self.check(slot, adapter)
            new = self.slot_arrays(adapter)
        self.weights = (executable or self._update)(self.weights, np.int32(slot - 1), new)


def check_seq_slots(seqs, slots: "LoRASlots | None", task: str) -> None:
    """ValueError unless every ScheduledSeq's lora_slot is 0 (the base) or, on a generate runner
    with LoRA, 1..max_loras (embed steps run the base model only)."""
    limit = 0 if slots is None or task == "embed" else slots.num_slots
    for s in seqs:
        if not (isinstance(s.lora_slot, int) and 0 <= s.lora_slot <= limit):
            why = ("embed steps run the base model" if task == "embed" else
                   "LoRA is off (lora_config=None)" if slots is None else f"max_loras={limit}")
            raise ValueError(f"lora_slot={s.lora_slot!r} of request {s.request_id} is invalid: "
                             f"must be in 0..{limit} ({why})")
