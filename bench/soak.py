"""Abort soak: thousands of requests at a real loopback gRPC server, half cancelled at random points,
then count what leaked.

    python bench/soak.py                                  # 10,000 requests (the full run)
    python bench/soak.py --requests 400 --concurrency 32  # the short version `make test` runs

The engine is the real ``LLMEngine`` (host scheduler, KV cache manager with prefix caching, block
pool, output processor, async scheduling) with the fake runner of tests/fakes, whose "model" is a
deterministic function of the context it reads back from its fake KV cache (so a wrong block
table or stale cached KV changes outputs), greedy or seeded by (seed, position). The KV cache is
small, so preemption happens too. Each request draws a prompt (text or token ids, 1..60 tokens),
max_tokens 1..64, n 1 or 2, greedy or seeded sampling (temperature, top_k, top_p, penalties); a
random half is cancelled: by a short deadline, by closing its channel after k responses, by
cancel() after k responses, before its first token, or after it finished. Everything runs
concurrently (at most --concurrency calls in flight).

After it: every KV block free, no request left in the scheduler, the engine, the AsyncEngine or the
servicer, the block pool's invariants hold, the server's RSS (after gc) within --rss-bound-mb of
its value after warm-up, and every uncancelled request's output (and every cancelled one that
completed anyway) equal to its reference from a separate engine run offline. Exit code 1 if not.
RSS is the whole process: the server and the soak's clients (which compare each output on
arrival and keep none), so the growth bounds the server's from above.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import cpu_model, git_rev, loadavg, log, write_json  # noqa: E402

MODES = ("deadline", "close_channel", "cancel_mid_stream", "before_first_token", "after_finish")
ALPHABET = "abcdefghij klmnopqrstuvwxyz,.!?"


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def make_engine(num_blocks: int, async_scheduling: bool = True):
    from jaxllm.config import EngineConfig
    from jaxllm.engine.engine import LLMEngine
    from tests.fakes.fake_runner import FakeRunner
    from tests.fakes.fake_tokenizer import FakeIncrementalDetokenizer, FakeTokenizer

    class SoakRunner(FakeRunner):  # the fake's per-step history, bounded for a long run
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.steps = collections.deque(maxlen=4)
            self.released = collections.deque(maxlen=4)

    tok = FakeTokenizer()
    config = EngineConfig(model="fake-runner", block_size=4, max_model_len=160,
                          max_num_batched_tokens=128, max_num_seqs=16,
                          async_scheduling=async_scheduling)
    runner = SoakRunner(num_blocks, 4, vocab_size=tok.vocab_size, eos_token_ids=tok.eos_token_ids)
    return LLMEngine(config, runner, tok, detokenizer_factory=FakeIncrementalDetokenizer)


def make_specs(num: int, seed: int, cancel_fraction: float, vocab: int) -> list[dict]:
    rng = random.Random(seed)
    specs = []
    for i in range(num):
        n_in = rng.randint(1, 60)
        if rng.random() < 0.5:
            prompt = {"text": "".join(rng.choice(ALPHABET) for _ in range(n_in))}
        else:
            prompt = {"token_ids": [rng.randrange(3, vocab) for _ in range(n_in)]}
        sampling = dict(max_tokens=rng.randint(1, 64), n=1 if rng.random() < 0.8 else 2)
        if rng.random() < 0.5:
            sampling["temperature"] = 0.0
        else:
            sampling.update(temperature=rng.uniform(0.3, 1.5), seed=rng.randrange(2**31))
            if rng.random() < 0.3:
                sampling["top_k"] = rng.randint(1, 40)
            if rng.random() < 0.3:
                sampling["top_p"] = rng.uniform(0.5, 1.0)
            if rng.random() < 0.2:
                sampling["presence_penalty"] = rng.uniform(-1, 1)
        if rng.random() < 0.1:
            sampling["ignore_eos"] = True
        mode = rng.choice(MODES) if rng.random() < cancel_fraction else None
        specs.append(dict(id=f"soak-{i}", prompt=prompt, sampling=sampling, mode=mode,
                          k=rng.randint(0, 4), deadline=rng.uniform(0.002, 0.08)))
    return specs


def references(specs: list[dict], num_blocks: int) -> dict[str, list[list[int]]]:
    """Token ids per sample of every request, from one offline run of an identical engine."""
    from jaxllm.sampling_params import SamplingParams

    eng = make_engine(num_blocks, async_scheduling=False)
    for s in specs:
        p = s["prompt"]
        prompt = p["text"] if "text" in p else {"prompt_token_ids": p["token_ids"]}
        eng.add_request(s["id"], prompt, SamplingParams(**s["sampling"]))
    out = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                out[o.request_id] = [c.token_ids for c in sorted(o.outputs, key=lambda c: c.index)]
    return out


def to_request(spec: dict):
    from serving.proto.jaxllm.v1 import generation_pb2 as pb

    req = pb.GenerateRequest(request_id=spec["id"], sampling=pb.SamplingParams(**spec["sampling"]))
    if "text" in spec["prompt"]:
        req.text = spec["prompt"]["text"]
    else:
        req.token_ids.ids.extend(spec["prompt"]["token_ids"])
    return req


def fold(responses) -> list[list[int]]:
    toks: dict[int, list[int]] = {}
    for r in responses:
        for d in r.outputs:
            toks.setdefault(d.index, []).extend(d.token_ids)
    return [toks[i] for i in sorted(toks)]


async def one(spec: dict, target: str, stubs: list, sem: asyncio.Semaphore, rec: dict) -> None:
    import grpc

    from serving.proto.jaxllm.v1 import generation_pb2_grpc as pb_grpc

    mode, k = spec["mode"], spec["k"]
    async with sem:
        own = None
        try:
            if mode == "close_channel":
                own = grpc.aio.insecure_channel(target)
                stub = pb_grpc.GenerationStub(own)
            else:
                stub = stubs[hash(spec["id"]) % len(stubs)]
            call = stub.Generate(to_request(spec),
                                 timeout=spec["deadline"] if mode == "deadline" else 300)
            got = []
            if mode == "before_first_token":
                call.cancel()
            elif mode in ("close_channel", "cancel_mid_stream"):
                while len(got) < k:
                    r = await call.read()
                    if r is grpc.aio.EOF:
                        break
                    got.append(r)
                if own is not None:
                    await own.close()
                    own = None
                else:
                    call.cancel()
            else:  # normal, deadline, after_finish: read to the end
                async for r in call:
                    got.append(r)
                if mode == "after_finish":
                    call.cancel()  # a no-op on a finished call
            try:
                code = await call.code()
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
        except grpc.aio.AioRpcError as e:
            code = e.code()
        finally:
            if own is not None:
                await own.close()
        done = bool(got) and got[-1].finished and code == grpc.StatusCode.OK
        rec["outcomes"][f"{mode or 'normal'}:{code.name}"] += 1
        if done:  # compared at once: the client keeps no outputs (RSS is the server's + this)
            rec["checked"] += 1
            if fold(got) != rec["refs"][spec["id"]]:
                rec["mismatched"].append(spec["id"])
        elif mode is None:
            rec["unfinished_normal"].append((spec["id"], code.name))


async def run(args) -> dict:
    import grpc

    from serving.config import ServerConfig
    from serving.proto.jaxllm.v1 import generation_pb2_grpc as pb_grpc
    from serving.server import ServingServer

    engine = make_engine(args.num_blocks)
    vocab = engine.vocab_size
    specs = make_specs(args.requests, args.seed, args.cancel_fraction, vocab)
    t0 = time.perf_counter()
    refs = references([s for s in specs], args.num_blocks)
    ref_s = time.perf_counter() - t0
    server = ServingServer(ServerConfig(port=0, max_queued_requests=args.requests + 64,
                                        health_probe_interval=1.0, stream_timeout=30.0),
                           engine=engine, idle_tick=0.01)
    port = await server.start()
    await server.wait_serving(30)
    target = f"127.0.0.1:{port}"
    channels = [grpc.aio.insecure_channel(target) for _ in range(args.channels)]
    stubs = [pb_grpc.GenerationStub(ch) for ch in channels]
    rec = _record(refs)
    sem = asyncio.Semaphore(args.concurrency)
    # warm-up: the same kind of traffic, then the RSS baseline
    warm = make_specs(args.warmup, args.seed + 1, 0.5, vocab)
    for s in warm:
        s["id"] = "warm-" + s["id"]
    warm_rec = _record(references(warm, args.num_blocks))
    await asyncio.gather(*(one(s, target, stubs, sem, warm_rec) for s in warm))
    if warm_rec["mismatched"]:
        raise SystemExit(f"warm-up outputs differ from their references: {warm_rec['mismatched'][:5]}")
    await _idle(server, engine, 30)
    gc.collect()
    rss_warm = rss_mb()
    t1 = time.perf_counter()
    await asyncio.gather(*(one(s, target, stubs, sem, rec) for s in specs))
    wall = time.perf_counter() - t1
    idle_s = await _idle(server, engine, 60)
    gc.collect()
    rss_after = rss_mb()
    stats = engine.get_stats()
    leaks = {
        "free_blocks": stats["num_free_blocks"], "total_blocks": stats["num_blocks"],
        "scheduler_requests": len(engine.scheduler.requests),
        "kv_req_blocks": len(engine.kv.req_blocks),
        "engine_parents": len(engine._parents), "engine_seqs": len(engine._seqs),
        "async_engine_streams": server.async_engine.num_active,
        "servicer_active": len(server.door.active),
    }
    engine.kv.pool.check_invariants()
    for ch in channels:
        await ch.close()
    await server.stop()
    cancelled = [s for s in specs if s["mode"] is not None]
    checked, bad = rec["checked"], rec["mismatched"]
    mismatched = len(bad)
    leaked_blocks = leaks["total_blocks"] - leaks["free_blocks"]
    leaked_requests = sum(v for k, v in leaks.items() if k not in ("free_blocks", "total_blocks"))
    res = {
        "engine": "LLMEngine + tests/fakes FakeRunner (async scheduling, prefix caching)",
        "requests": len(specs), "cancelled": len(cancelled),
        "cancel_modes": dict(collections.Counter(s["mode"] for s in cancelled)),
        "outcomes": dict(sorted(rec["outcomes"].items())),
        "completed": checked, "checked_outputs": checked,
        "mismatched_outputs": mismatched, "mismatched_ids": bad[:10],
        "unfinished_normal": rec["unfinished_normal"][:10],
        "leaked_blocks": leaked_blocks, "leaked_requests": leaked_requests, "leaks": leaks,
        "preemptions": stats.num_preemptions,
        "rss_after_warmup_mb": round(rss_warm, 1), "rss_after_mb": round(rss_after, 1),
        "rss_growth_mb": round(rss_after - rss_warm, 1), "rss_bound_mb": args.rss_bound_mb,
        "wall_s": round(wall, 1), "reference_s": round(ref_s, 1), "idle_wait_s": round(idle_s, 2),
        "requests_per_s": round(len(specs) / wall, 1),
    }
    res["ok"] = (leaked_blocks == 0 and leaked_requests == 0 and mismatched == 0
                 and not rec["unfinished_normal"] and res["rss_growth_mb"] <= args.rss_bound_mb)
    return res


def _record(refs: dict) -> dict:
    return {"outcomes": collections.Counter(), "refs": refs, "checked": 0, "mismatched": [],
            "unfinished_normal": []}


async def _idle(server, engine, timeout: float) -> float:
    """Wait until no request is left anywhere (aborts land before the engine's next step)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if (not engine.has_unfinished_requests() and server.async_engine.num_active == 0
                and not server.door.active and server.async_engine.num_pending_adds == 0):
            await asyncio.sleep(0.05)  # one more loop turn: queued aborts/releases applied
            if not engine.has_unfinished_requests():
                break
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--cancel-fraction", type=float, default=0.5)
    ap.add_argument("--concurrency", type=int, default=64, help="calls in flight at most")
    ap.add_argument("--channels", type=int, default=4, help="shared channels for the calls "
                    "(close_channel requests open their own)")
    ap.add_argument("--num-blocks", type=int, default=128, help="KV blocks of 4 tokens (small: preemption)")
    ap.add_argument("--warmup", type=int, default=200, help="requests before the RSS baseline")
    ap.add_argument("--rss-bound-mb", type=float, default=32.0,
                    help="largest allowed RSS growth from after warm-up to after the run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output-json")
    args = ap.parse_args(argv)
    import logging
    logging.basicConfig(level=logging.ERROR)
    res = asyncio.run(run(args))
    res["machine"] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_model(),
                      "cores": os.cpu_count(), "loadavg_1_5_15": loadavg(), "commit": git_rev()}
    res["command"] = "python bench/soak.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for k in ("requests", "cancelled", "cancel_modes", "completed", "checked_outputs",
              "mismatched_outputs", "leaked_blocks", "leaked_requests", "preemptions",
              "rss_after_warmup_mb", "rss_after_mb", "rss_growth_mb", "wall_s", "requests_per_s"):
        log(f"soak: {k} = {res[k]}")
    log(f"soak: outcomes = {res['outcomes']}")
    if not res["ok"]:
        log(f"soak: FAILED: leaks={res['leaks']} mismatched={res['mismatched_ids']} "
            f"unfinished={res['unfinished_normal']}")
    if args.output_json:
        write_json(args.output_json, res)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
