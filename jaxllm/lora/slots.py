"""LoRASlots: the runner's device-resident adapter slots and their in-place update.

Layout (per held projection of the model, `LORA_TARGETS`; S = max_loras, R = max_lora_rank, P = the
number of checkpoint projections fused into it: 3 for wqkv, 2 for w_gate_up, 1 for wo / w_down):

    a [L, in..., S, P·R]    the parts' A side by side on the rank axis (part p: columns pR..pR+r)
    b [L, S, P·R, out...]   block-diagonal: rows pR..pR+r hold part p's B in part p's columns of the
                            fused output (the held weight's shard-major order, fusion.py), zeros elsewhere

(the "unroll" layer loop holds one array per layer instead, like its weights; the layer axis leads
so the "scan" loop scans the slots with the weights). One code path for the four projections
(`delta.lora_delta`): u = x·a ([T, in] x [in, S·P·R], a plain gemm: the slot axis after the input
axes spares XLA a transposed copy of a), then u·b ([T, S·P·R] x [S·P·R, out]) straight into the
fused output: two matmuls per projection, whatever P.

Tensor parallelism by logical axes (`lora_axes`): a takes the held weight's input axes, b its output
axes (MODEL_AXES: "qkv_heads" / "mlp2" for the fused ones). Column-parallel wqkv / w_gate_up: a
replicated, b sharded like the base weight's columns, whose shard-major order the row blocks follow:
the delta is born on the device that holds those output columns. Row-parallel wo / w_down: a
sharded on the input axis, b replicated; XLA sums the partial u = x·a ([T, S·R]) in the same
all-reduce op as the base projection's partial output (tests/parallel/test_tp_lora.py checks the
HLO: the decode step's collectives are those of the step without LoRA).

Bytes: b of wqkv is 3x and of w_gate_up 2x what one B per part takes (the zero blocks are read every
LoRA step). Llama-2-13B shape, max_loras 4, rank 16, bf16: b 545.0 MiB instead of 260.0 (+285 MiB,
1.2% of the 23.6 GiB of layer weights), a 217.5 MiB, slots 762.5 MiB instead of 477.5; SmolLM2-135M
f32: 111.1 instead of 74.5 MiB. History: the first version (commit 6d5707b) had this b; 69d3ccc
replaced it with one B per part and `fusion.join_fused` (fewer bytes; on CPU then a 64-sequence step
at 1.11x LoRA off instead of 1.19-1.27x); on the H200 each part's expand matmul and the join were
kernel launches (11 small dots per layer instead of 8, +24.7% per 13B decode step with LoRA on),
so b is block-diagonal again, now with a's slot axis moved and both matmuls plain gemms, which took
the transposed copies of a, u and b out of the step. Measured back to back on CPU (bench/RESULTS.md,
"LoRA: one expand matmul per projection"): the 64-sequence step 1.12-1.19x LoRA off vs 1.08-1.17x
for one B per part, within the noise; the wqkv delta alone ~1.2-1.4x slower (P x the expand FLOPs).

Slot s (1..S) lives at index s - 1; slot 0 (the base model) has no storage (delta.py). Adapters
arrive from `jaxllm/lora/peft.py` in checkpoint layout. `prepare` does the checks and the cast to the
slots' dtype ahead of time (numpy only, thread-safe: the engine's adapter loader runs it on its own
thread) but keeps the adapter at its own rank: the host cache holds `max_cpu_loras` of them, and a
rank-8 adapter padded to max_lora_rank=64 would cost 8x its bytes there (bench/lora_host_bytes.py).

A slot write (`set`, on the engine thread) sends the adapter at its rank bucket (`rank_buckets`: the
powers of two from 8 below max_lora_rank, then max_lora_rank) with the checkpoint's kv heads
(`write_arrays`: the adapter's own arrays when its rank is a bucket, no host copy), and one jitted,
donated update per bucket (all compiled at warm-up; the slot is an argument) zeroes the slot and
`dynamic_update_slice`s each part's A columns and B block in (B's fused axis viewed as [tp, n/tp]:
each device writes its shard of the part's columns; the off-diagonal blocks stay zero from the
start), repeating kv heads on the device. Under tensor
parallelism what is sent lands sharded like the slots (each device its own shard; unrepeated kv
heads whole) and the update moves nothing between devices. Measured on SmolLM2-135M, rank 8 into
max_lora_rank 64 (bench/RESULTS.md): 9.3 MiB sent instead of 74.5 MiB (f32), no host padding.
Rejected: padding on the device with `jnp.pad` + concatenate and then one slot-sized update (the
first version here): on the CPU backend its update ran 58 ms against 8 ms for the zeroed slot and
the column writes (rank 8, f32); one program for every rank (rank-r sends need a program per
shape); compiling a bucket on first use (a compile after warm-up: adapters arrive while serving).
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
from jaxllm.models.llama_params import MODEL_AXES, PARAM_AXES

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
    costs rank 8, not ``max_lora_rank``; ``LoRASlots.set`` sends it at its rank bucket and the device
    pads it into the slot layout."""
    name: str
    rank: int
    modules: dict
    path: str = ""

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.modules.values())


def lora_axes(weight_axes: tuple[str, ...], num_in: int, stacked: bool) -> tuple[tuple, tuple]:
    """Logical axes of (a [(L,) in..., S, P·R], b [(L,) S, P·R, out...]) from the held weight's
    ("layers", in..., out...): a takes its input axes, b its (fused) output axes."""
    lead = ("layers",) if stacked else ()
    ins, outs = weight_axes[1:1 + num_in], weight_axes[1 + num_in:]
    return lead + ins + ("lora_slots", "lora_rank"), lead + ("lora_slots", "lora_rank") + outs


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
        R, S = self.rank, self.num_slots
        held = module_shapes(mc)  # the model's: kv heads as repeated
        self.tp = 1 if layout is None else layout.tp  # the fused outputs' shard-major order
        self.shapes, self.axes = {}, {}  # name -> (a, b) shapes / logical axes (without L)
        for name, parts in LORA_TARGETS.items():
            ins, outs = held[parts[0]][0], [held[p][1] for p in parts]
            if len(parts) > 1:  # the fused output: the parts' outputs joined on the fused axis
                f = len(outs[0]) + FUSED[f"layers.{name}"][1]
                outs = [outs[0][:f] + (sum(o[f] for o in outs),) + outs[0][f + 1:]]
            PR = len(parts) * R
            self.shapes[name] = (ins + (S, PR), (S, PR) + outs[0])
            self.axes[name] = lora_axes(MODEL_AXES[f"layers.{name}"], len(ins), self.stacked)
        self.weights = self._zeros()
        self.nbytes = sum(x.nbytes for x in jax.tree.leaves(self.weights))
        self.rank_buckets = rank_buckets(R)  # a slot write is compiled for each (warm-up): its rank → the next
        self._zero_write = None  # the unload's write (zeros at the smallest bucket), made on the first unload
        self.last_write_nbytes = 0  # bytes the last `set` sent to the device (bench/lora_host_bytes.py)

        def repeat_kv(param, x):  # B [.., K, D] -> [.., K·kv_repeat, D]: the model's repeated kv heads
            return jnp.repeat(x, self.kv_repeat, axis=-2) if self.kv_repeat > 1 and param in KV_PARAMS else x

        def write(w, index, xs, slot_axis, rank_axis):
            """w (a [(L,) in..., S, P·R] or b [(L,) S, P·R, out...]) with slot `index` zeroed and the
            parts xs [.., rb, ..] (w without the slot axis, rb on the rank axis) written side by side on
            `rank_axis` (part k at k·R): in place, what lies past rb left zero (no zeroing when rb = R:
            the parts cover the slot). A fused projection's b: `write_fused`."""
            rb = xs[0].shape[rank_axis - 1]
            if rb < R:
                zeros = jnp.zeros(w.shape[:slot_axis] + w.shape[slot_axis + 1:], w.dtype)  # one slot
                w = jax.lax.dynamic_update_index_in_dim(w, zeros, index, slot_axis)
            for k, x in enumerate(xs):
                starts = [0] * w.ndim
                starts[slot_axis], starts[rank_axis] = index, k * R
                w = jax.lax.dynamic_update_slice(w, jnp.expand_dims(x.astype(w.dtype), slot_axis), starts)
            return w

        def write_fused(w, index, bs, s, axis):
            """b [(L,) S, P·R, out...] with slot `index` zeroed (rb < R) and each part's B bs[k]
            [(L,) rb, out_k...] (kv heads repeated) written into rows kR.. and part k's own columns of
            the fused axis (`axis`, from the end). The fused axis is viewed as [tp, n/tp] as in
            `fusion.fuse`'s shard-major order, so each device writes only its shard of every part. The
            other parts' columns of a row block are never written: they stay the zeros of `_zeros`."""
            rb = bs[0].shape[s]
            if rb < R:
                w = jax.lax.dynamic_update_index_in_dim(w, jnp.zeros(w.shape[:s] + w.shape[s + 1:], w.dtype), index, s)
            f, tp = w.ndim + axis, self.tp
            shape = w.shape
            w = w.reshape(shape[:f] + (tp, shape[f] // tp) + shape[f + 1:])  # [.., tp, n/tp, ..]
            offset = 0
            for k, x in enumerate(bs):
                xf = x.ndim + axis
                x = x.reshape(x.shape[:xf] + (tp, x.shape[xf] // tp) + x.shape[xf + 1:])  # [.., tp, n_k/tp, ..]
                starts = [0] * w.ndim
                starts[s], starts[s + 1], starts[f + 1] = index, k * R, offset
                w = jax.lax.dynamic_update_slice(w, jnp.expand_dims(x.astype(w.dtype), s), starts)
                offset += x.shape[xf + 1]
            return w.reshape(shape)

        def update(weights, index, sent):
            """weights with slot `index` (0-based) replaced by `sent` ({name: (A parts, B parts)} at one
            rank bucket: `write_arrays`), padded to max_lora_rank and kv-repeated here, on the device."""
            def pair(p, n, layer=None):  # one held projection's slots, of every layer (None) or one
                a_parts, b_parts = sent[n]
                if layer is not None:
                    a_parts, b_parts = [x[layer] for x in a_parts], [x[layer] for x in b_parts]
                s = 0 if layer is not None else 1  # b's slot axis
                bs = [repeat_kv(q, x) for q, x in zip(LORA_TARGETS[n], b_parts)]
                b = (write(p.b, index, bs, s, s + 1) if len(bs) == 1 else
                     write_fused(p.b, index, bs, s, FUSED[f"layers.{n}"][1]))
                return LoRAPair(write(p.a, index, a_parts, p.a.ndim - 2, p.a.ndim - 1), b)

            if self.stacked:
                return {n: pair(p, n) for n, p in weights.items()}
            return [{n: pair(p, n, i) for n, p in layer.items()} for i, layer in enumerate(weights)]

        kw = {}
        if layout is not None:
            w_sh = jax.tree.map(lambda x: x.sharding, self.weights)
            # what is sent lands sharded like the slots (minus the slot axis): each device gets its own
            # shard; kv heads not yet repeated (fewer than the devices when kv_repeat > 1) go whole
            sent_sh = {n: tuple(tuple(layout.sharding(ax) for ax in side) for side in self._sent_axes(n))
                       for n in LORA_TARGETS}
            kw = dict(in_shardings=(w_sh, layout.replicated, sent_sh), out_shardings=w_sh)
        self._update = jax.jit(update, donate_argnums=(0,), **kw)

    def _sent_axes(self, name: str) -> tuple[tuple, tuple]:
        """Logical axes of what a slot write sends for `name`: (A per part ("layers", in..., "lora_rank"),
        B per part ("layers", "lora_rank", out...)); B's "kv_heads" unsharded while they are repeated."""
        parts = LORA_TARGETS[name]
        ins = len(self.ckpt_shapes[parts[0]][0])

        def unslotted(axes):
            return tuple(x for x in axes if x != "lora_slots")

        a = unslotted(lora_axes(MODEL_AXES[f"layers.{name}"], ins, True)[0])
        bs = []
        for p in parts:
            b = unslotted(lora_axes(PARAM_AXES[p], ins, True)[1])  # the unfused part's output axes
            if self.kv_repeat > 1 and p in KV_PARAMS:
                b = tuple(None if x == "kv_heads" else x for x in b)
            bs.append(b)
        return (a,) * len(parts), tuple(bs)

    def _zeros(self):
        lay = self.layout

        def zeros(shape, axes):
            if lay is None:
                return jnp.zeros(shape, self.dtype)
            return jax.jit(lambda: jnp.zeros(shape, self.dtype), out_shardings=lay.sharding(axes))()

        def pair(name, lead):
            (sa, sb), (xa, xb) = self.shapes[name], self.axes[name]
            return LoRAPair(zeros(lead + sa, xa), zeros(lead + sb, xb))

        if self.stacked:
            return {n: pair(n, (self.num_layers,)) for n in LORA_TARGETS}
        return [{n: pair(n, ()) for n in LORA_TARGETS} for _ in range(self.num_layers)]

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

    def bucket(self, rank: int) -> int:
        """The rank a rank-`rank` adapter is sent at: the smallest of `rank_buckets` >= it."""
        return next(b for b in self.rank_buckets if b >= rank)

    def write_arrays(self, adapter: SlotAdapter | None) -> tuple[int, dict]:
        """(rb, {name: (A per part [L, in..., rb], B per part [L, rb, out_p...])}): what a slot write
        sends, numpy in the slots' dtype at the adapter's rank bucket rb (`bucket`) with the checkpoint's
        kv heads. The adapter's own arrays when its rank is a bucket (no copy); else, and for a
        projection it does not have, zeros past its rank (None: zeros at the smallest bucket)."""
        L, dt = self.num_layers, np.dtype(self.dtype)
        rb = self.bucket(0 if adapter is None else adapter.rank)

        def at_rank(x, shape, axis):  # x [.., r, ..] (None: absent) -> [.., rb, ..] `shape`
            if x is not None and x.shape == shape:
                return x
            out = np.zeros(shape, dt)
            if x is not None:
                index = [slice(None)] * len(shape)
                index[axis] = slice(0, x.shape[axis])
                out[tuple(index)] = x
            return out

        sent = {}
        for name, parts in LORA_TARGETS.items():
            As, Bs = [], []
            for param in parts:
                ins, outs = self.ckpt_shapes[param]
                a, b = (None, None) if adapter is None else adapter.modules.get(param, (None, None))
                As.append(at_rank(a, (L,) + ins + (rb,), -1))  # [L, in..., rb]
                Bs.append(at_rank(b, (L, rb) + outs, 1))  # [L, rb, out_p...]
            sent[name] = (tuple(As), tuple(Bs))
        return rb, sent

    # ----- device side ---------------------------------------------------------------------------
    def lower(self, rank: int):
        """The update's lowering for sends at rank bucket `rank` (the runner compiles every one of
        `rank_buckets` at warm-up)."""
        if rank not in self.rank_buckets:
            raise ValueError(f"rank={rank} is not a slot-write rank bucket: must be one of {self.rank_buckets}")
        L, dt = self.num_layers, np.dtype(self.dtype)
        sent = {}
        for name, parts in LORA_TARGETS.items():
            ins = self.ckpt_shapes[parts[0]][0]
            sent[name] = (tuple(jax.ShapeDtypeStruct((L,) + ins + (rank,), dt) for _ in parts),
                          tuple(jax.ShapeDtypeStruct((L, rank) + self.ckpt_shapes[p][1], dt) for p in parts))
        return self._update.lower(self.weights, np.int32(0), sent)

    def set(self, slot: int, adapter: LoRAAdapter | SlotAdapter | None, executable=None) -> None:
        """Writes `adapter` (None: zeros; a SlotAdapter: as prepared) into `slot` in place: sends it at
        its rank bucket (`write_arrays`) to the compiled update of that bucket (`executable(rb)`, the
        runner's from warm-up; None: the jitted function), which pads it to max_lora_rank on the device."""
        if isinstance(adapter, SlotAdapter):  # checked and cast by prepare (the loader thread)
            self.check(slot, None)
        elif adapter is None:
            self.check(slot, None)
        else:
            self.check(slot, adapter)
            adapter = self.prepare(adapter)  # cast on the host: one program per bucket, the slots' dtype
        if adapter is None:
            if self._zero_write is None:
                self._zero_write = self.write_arrays(None)
            rb, sent = self._zero_write
        else:
            rb, sent = self.write_arrays(adapter)
        self.last_write_nbytes = sum(x.nbytes for x in jax.tree.leaves(sent))
        self.weights = (self._update if executable is None else executable(rb))(self.weights, np.int32(slot - 1), sent)


def rank_buckets(max_rank: int, smallest: int = 8) -> tuple[int, ...]:
    """The ranks a slot write is compiled for: the powers of two from `smallest` below `max_rank`, then
    `max_rank` (64: 8, 16, 32, 64; 8 or less: just it). An adapter is sent at the next one up."""
    out, b = [], smallest
    while b < max_rank:
        out.append(b)
        b *= 2
    return tuple(out) + (max_rank,)


def check_seq_slots(seqs, slots: "LoRASlots | None", task: str) -> None:
    """ValueError unless every ScheduledSeq's lora_slot is 0 (the base) or, on a generate runner
    with LoRA, 1..max_loras (embed steps run the base model only)."""
    pooling = task in ("embed", "classify")
    limit = 0 if slots is None or pooling else slots.num_slots
    for s in seqs:
        if not (isinstance(s.lora_slot, int) and 0 <= s.lora_slot <= limit):
            why = (f"{task} steps run the base model" if pooling else
                   "LoRA is off (lora_config=None)" if slots is None else f"max_loras={limit}")
            raise ValueError(f"lora_slot={s.lora_slot!r} of request {s.request_id} is invalid: "
                             f"must be in 0..{limit} ({why})")
