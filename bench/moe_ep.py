"""MoE decode step under tensor parallelism: each expert's F axis split over the devices ("tp", TP of
experts, the default) vs whole experts per device ("ep", `--enable-expert-parallel`), against tp=1, in
one run on forced CPU devices.

    python bench/moe_ep.py                                  # bench/moe.py's small Mixtral shape, batch 1 and 16,
                                                            # tp=1, tp=2 tp/ep, tp=4 tp/ep on 4 forced devices
    python bench/moe_ep.py --preset qwen3-30b-a3b --layers 2 --modes 1 4-tp 4-ep --batches 1 16 64

The step is bench/moe.py's (forward + logits of one decode step, every sequence one new token over a
64-token context, jitted; best of --rounds medians of --iters steps), built with a TPLayout at tp > 1.
The expert path is the CPU default (JAXLLM_MOE=auto unless set): while T*k < X, gather (tp=1, TP)
or, under EP, loop (each device runs only its experts some token was routed to); else dense (under EP
over the local experts). `expert_mib_dev`: the expert weight bytes one device reads per step (tp=1:
min(T*k, X) experts; TP: the same over tp; EP: at most min(T*k, X/tp) whole experts (loop: its routed
ones, data-dependent), X/tp when dense: with few tokens a device reads whole experts where TP reads
slices, at large batches the same bytes in fewer, larger matmuls). The forced CPU devices share this machine's cores: tp > 1 cannot beat tp=1 here; the
numbers compare the two layouts' per-device work, not multi-device speed.
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def time_step(c, params: dict, dtype, batch: int, tp: int, ep: bool, iters: int, rounds: int) -> float:
    """ms per decode step (median of `iters`, best of `rounds`) at tensor-parallel size `tp`."""
    from bench.moe import BLOCK, decode_inputs, time_decode
    from jaxllm.models.llama import build_model
    from jaxllm.parallel import TPLayout, make_mesh
    from pallas_kernels import KVCache

    layout = TPLayout.plan(c, tp, make_mesh(tp), expert_parallel=ep) if tp > 1 else None
    model = build_model(c, dict(params), dtype, layout=layout)  # a copy: build_model empties its dict
    mc = model.config
    tokens, positions, meta, nblocks = decode_inputs(c, batch)
    cache = KVCache.zeros(mc.num_layers, nblocks, BLOCK, mc.num_kv_heads, mc.head_dim, dtype,
                          sharding=layout.cache_sharding() if layout else None)
    return time_decode(model, cache, (tokens, positions, meta), iters, rounds)


def main(argv=None) -> int:
    from bench.moe import add_shape_args, configs  # no jax at bench.moe's import: XLA_FLAGS is set below

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(ap)
    ap.add_argument("--modes", nargs="+", default=["1", "2-tp", "2-ep", "4-tp", "4-ep"],
                    help="'1' or '<tp>-tp' (experts' F split) / '<tp>-ep' (whole experts per device)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--devices", type=int, default=4, help="forced CPU devices (if XLA_FLAGS does not set them)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    modes = []
    for m in args.modes:
        tp, _, kind = m.partition("-")
        if not tp.isdigit() or kind not in (("",) if tp == "1" else ("tp", "ep")):
            ap.error(f"--modes: {m!r} is invalid: must be '1', '<tp>-tp' or '<tp>-ep'")
        modes.append((int(tp), kind == "ep"))
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.devices}").strip()
    import jax.numpy as jnp

    from bench.common import log_machine
    from checkpoints.dummy import dummy_params
    from jaxllm.models.moe import moe_impl

    machine = log_machine()
    dtype = jnp.dtype(args.dtype)
    c, _ = configs(args)
    X, k, F, E = c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size, c.hidden_size
    print(f"MoE: {c.architecture}, {c.num_layers} layers, E={E}, {X} experts top-{k}, F={F}; {args.dtype}; "
          f"JAXLLM_MOE={os.environ.get('JAXLLM_MOE', 'auto')}", flush=True)
    params = dummy_params(c, dtype)  # drawn once (each draw compiles), placed per layout
    rows = []
    for tp, ep in modes:
        for b in args.batches:
            local = X // tp if ep else X
            path = moe_impl(None, b * k, X, ep)
            # per device and layer, whole or sliced; loop: at most (its routed experts, data-dependent)
            experts = min(b * k, local) if path in ("gather", "loop") else local
            frac = 1 if ep or tp == 1 else 1 / tp
            mib = experts * frac * 3 * E * F * dtype.itemsize * c.num_layers / 2**20
            ms = time_step(c, params, dtype, b, tp, ep, args.iters, args.rounds)
            mode = "1" if tp == 1 else f"{tp}-{'ep' if ep else 'tp'}"
            rows.append(dict(mode=mode, tp=tp, expert_parallel=ep, batch=b, experts_path=path, step_ms=round(ms, 2),
                             expert_mib_dev=round(mib, 1)))
            print(f"{mode:5s} batch {b:3d}: {ms:8.2f} ms/step  experts {path:6s}  "
                  f"expert weights read per device {'<=' if path == 'loop' else '  '}{mib:7.1f} MiB", flush=True)
    by = {(r["mode"], r["batch"]): r["step_ms"] for r in rows}
    for b in args.batches:
        for tp in sorted({t for t, _ in modes if t > 1}):
            if (f"{tp}-ep", b) in by and (f"{tp}-tp", b) in by:
                print(f"batch {b}: tp={tp} ep / tp = {by[(f'{tp}-ep', b)] / by[(f'{tp}-tp', b)]:.2f}x")
    if args.json:
        import dataclasses

        from bench.common import write_json

        write_json(args.json, dict(machine=machine, config=dataclasses.asdict(c), dtype=args.dtype, rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
