"""Summarise a jax.profiler trace of engine steps (from --profile DIR of jaxllm.generate or the benches).

    python bench/profile_report.py DIR [--json out.json] [--top 10]

Reads the newest ``DIR/plugins/profile/<run>/*.trace.json.gz`` (the Chrome-trace JSON that
jax.profiler writes next to the .xplane.pb; ``perfetto_trace.json.gz`` as a fallback), and when
present ``DIR/jaxllm_profile.json`` (steps measured by jaxllm.profiling.EngineProfiler, cost
analysis) and ``DIR/step.hlo.txt`` (the step's optimized HLO, to put each op in a category).
No TensorBoard / XProf needed.

Per step (the ``engine_step`` annotations): wall time of the step window, device busy time (the
union of XLA op intervals on every thread; ops running at once share the wall time equally) and
idle time (host work: scheduling, input building, dispatch, output processing). Busy time is split
into categories by each op's source (HLO metadata stack frames): attention
(pallas_kernels/attention), cache writes (kv_write), sampling (sampler + penalty state), matmuls
(dot ops elsewhere), other. The categories plus idle add up to the step window by construction;
the report checks them against the step time measured independently with perf_counter.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys

CATEGORIES = ("attention", "matmul", "sampling", "cache_write", "other")
CONTAINER_PREFIXES = ("while", "conditional", "call", "async")


# ----- loading ------------------------------------------------------------------------
def find_trace(path: str) -> str:
    if os.path.isfile(path):
        return path
    runs = sorted(glob.glob(os.path.join(path, "plugins", "profile", "*")), key=os.path.getmtime)
    if not runs:
        runs = [path]
    run = runs[-1]
    for pat in ("*.trace.json.gz", "perfetto_trace.json.gz", "*.trace.json", "*.json.gz"):
        hits = sorted(glob.glob(os.path.join(run, pat)))
        if hits:
            return hits[0]
    raise FileNotFoundError(f"{path}: no *.trace.json.gz under plugins/profile/<run>/ (was the trace written?)")


def load_trace(path: str) -> dict:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)


# ----- HLO metadata → categories --------------------------------------------------------
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_META = re.compile(r'metadata=\{([^}]*)\}')
_OPNAME = re.compile(r'op_name="([^"]*)"')
_FRAME = re.compile(r"stack_frame_id=(\d+)")
_OPCODE = re.compile(r"\s([a-z][\w\-]*)\(")


class HloIndex:
    """Instruction name → (opcode, op_name, [(file, function, line), ...] innermost first)."""

    def __init__(self, text: str):
        self.files: dict[int, str] = {}
        self.funcs: dict[int, str] = {}
        self.locs: dict[int, tuple[int, int, int]] = {}
        self.frames: dict[int, tuple[int, int]] = {}
        self.instrs: dict[str, tuple[str, str, int | None]] = {}
        section = None
        for line in text.splitlines():
            s = line.strip()
            if s in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
                section = s
                continue
            if section and s and s[0].isdigit():
                idx, rest = s.split(" ", 1)
                idx = int(idx)
                if section == "FileNames":
                    self.files[idx] = rest.strip('"')
                elif section == "FunctionNames":
                    self.funcs[idx] = rest.strip('"')
                elif section == "FileLocations":
                    f = int(re.search(r"file_name_id=(\d+)", rest).group(1))
                    fn = int(re.search(r"function_name_id=(\d+)", rest).group(1))
                    ln = int(re.search(r"\bline=(\d+)", rest).group(1))
                    self.locs[idx] = (f, fn, ln)
                elif section == "StackFrames":
                    loc = int(re.search(r"file_location_id=(\d+)", rest).group(1))
                    parent = int(re.search(r"parent_frame_id=(\d+)", rest).group(1))
                    self.frames[idx] = (loc, parent)
                continue
            section = None
            m = _INSTR.match(line)
            if not m or "metadata=" not in line and not re.search(r"\s(while|conditional|call)\(", line):
                if m:
                    self.instrs.setdefault(m.group(1), (_opcode(m.group(2)), "", None))
                continue
            name, rhs = m.group(1), m.group(2)
            meta = _META.search(rhs)
            op_name, frame = "", None
            if meta:
                om = _OPNAME.search(meta.group(1))
                fm = _FRAME.search(meta.group(1))
                op_name = om.group(1) if om else ""
                frame = int(fm.group(1)) if fm else None
            self.instrs[name] = (_opcode(rhs), op_name, frame)

    def stack(self, frame: int | None) -> list[tuple[str, str, int]]:
        out, seen = [], set()
        while frame and frame in self.frames and frame not in seen:
            seen.add(frame)
            loc, parent = self.frames[frame]
            if loc in self.locs:
                f, fn, ln = self.locs[loc]
                out.append((self.files.get(f, "?"), self.funcs.get(fn, "?"), ln))
            if parent == frame:
                break
            frame = parent
        return out

    def info(self, name: str):
        return self.instrs.get(name)


def _opcode(rhs: str) -> str:
    # "f32[8,16]{1,0} fusion(%a, %b), kind=..." → "fusion"; tuple types contain spaces, so take the
    # first lowercase word directly followed by "(" after the type.
    m = _OPCODE.search(" " + rhs)
    return m.group(1) if m else ""


def categorize(name: str, hlo: HloIndex | None) -> tuple[str, str, str]:
    """→ (category, op_name, source) for an HLO instruction name seen in the trace."""
    info = hlo.info(name) if hlo else None
    op_name, source, files, funcs = "", "", "", ""
    opcode = ""
    if info:
        opcode, op_name, frame = info
        st = hlo.stack(frame)
        files = " ".join(f for f, _, _ in st)
        funcs = " ".join(fn for _, fn, _ in st)
        if st:
            f, fn, ln = st[0]
            source = f"{os.path.basename(f)}:{ln} {fn}"
    text = f"{files} {funcs} {op_name}"
    if "kv_write" in files or "write_kv" in funcs:
        return "cache_write", op_name, source
    if "pallas_kernels/attention" in files or "attention" in funcs:
        return "attention", op_name, source
    if "sampler.py" in files or re.search(r"\bsample\b|apply_penalties|_filter_thresholds", funcs):
        return "sampling", op_name, source
    if re.search(r"model_runner\.py|step_programs\.py", files) and "llama.py" not in files \
            and "compute_logits" not in funcs:
        return "sampling", op_name, source  # penalty state (counts / prompt mask) updated in the step
    if "dot_general" in op_name or opcode in ("dot", "convolution") or name.startswith(("dot", "ynn_fusion",
                                                                                         "gemm", "cublas")):
        return "matmul", op_name, source
    if not info:  # no HLO: fall back to the op name alone
        low = name.lower()
        if "attention" in low:
            return "attention", op_name, source
        if "scatter" in low:
            return "cache_write", op_name, source
    del text
    return "other", op_name, source


def is_container(name: str, hlo: HloIndex | None) -> bool:
    info = hlo.info(name) if hlo else None
    if info and info[0]:
        return info[0] in ("while", "conditional", "call", "async-start", "async-done")
    return name.startswith(CONTAINER_PREFIXES)


# ----- analysis -----------------------------------------------------------------------
def analyze(trace: dict, hlo: HloIndex | None, measured: dict | None, top: int = 10) -> dict:
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    steps = sorted((e for e in events if e.get("name") == "engine_step"), key=lambda e: e["ts"])
    if not steps:  # a trace without our annotations: one window over every op
        ops_all = [e for e in events if "hlo_op" in e.get("args", {})]
        if not ops_all:
            raise ValueError("trace has no XLA op events (hlo_op) and no engine_step annotations")
        t0 = min(e["ts"] for e in ops_all)
        t1 = max(e["ts"] + e["dur"] for e in ops_all)
        steps = [{"ts": t0, "dur": t1 - t0, "args": {"step_num": "0"}}]
    ops = sorted((e for e in events if "hlo_op" in e.get("args", {})), key=lambda e: e["ts"])
    cat_cache: dict[str, tuple[str, str, str]] = {}
    cont_cache: dict[str, bool] = {}

    def cat_of(name):
        if name not in cat_cache:
            cat_cache[name] = categorize(name, hlo)
            cont_cache[name] = is_container(name, hlo)
        return cat_cache[name]

    per_step = []
    totals = collections.Counter()
    op_time = collections.Counter()
    op_count = collections.Counter()
    j = 0
    for k, st in enumerate(steps):
        w0, w1 = st["ts"], st["ts"] + st["dur"]
        while j < len(ops) and ops[j]["ts"] + ops[j]["dur"] <= w0:
            j += 1
        inside = []
        i = j
        while i < len(ops) and ops[i]["ts"] < w1:
            e = ops[i]
            a, b = max(e["ts"], w0), min(e["ts"] + e["dur"], w1)
            if b > a:
                inside.append((a, b, e["args"]["hlo_op"]))
            i += 1
        cats = collections.Counter()
        busy = _sweep(inside, cat_of, cont_cache, cats, op_time)
        for _, _, n in inside:
            op_count[n] += 1
        totals.update(cats)
        per_step.append({"step": int(st.get("args", {}).get("step_num", k)), "window_us": st["dur"],
                         "busy_us": busy, "idle_us": st["dur"] - busy, "categories_us": dict(cats)})
    n = len(per_step)
    window = sum(s["window_us"] for s in per_step) / n
    busy = sum(s["busy_us"] for s in per_step) / n
    cats = {c: totals.get(c, 0.0) / n for c in CATEGORIES}
    top_ops = []
    for name, t in op_time.most_common(top):
        c, op_name, src = cat_of(name)
        top_ops.append({"op": name, "category": c, "us_per_step": t / n, "calls_per_step": op_count[name] / n,
                        "share_of_busy": t / n / busy if busy else 0.0, "op_name": op_name, "source": src})
    report = {"num_steps": n, "window_us": window, "busy_us": busy, "idle_us": window - busy,
              "categories_us": cats, "top_ops": top_ops, "steps": per_step}
    if measured:
        m_steps = measured.get("steps") or []
        if m_steps:
            m_mean = sum(s["wall_s"] for s in m_steps) / len(m_steps) * 1e6
            report["measured_step_us"] = m_mean
            report["categories_plus_idle_vs_measured"] = (busy + (window - busy)) / m_mean
            report["categories_vs_measured"] = busy / m_mean
            report["kinds"] = dict(collections.Counter(s["kind"] for s in m_steps))
            report["buckets"] = sorted({tuple(s["bucket"]) for s in m_steps if s.get("bucket")})
        ca = measured.get("cost_analysis")
        if ca:
            secs = (report.get("measured_step_us") or window) / 1e6
            flops, nbytes = ca.get("flops", 0.0), ca.get("bytes accessed", 0.0)
            report["cost"] = {"bucket_tokens": measured.get("cost_bucket_tokens"), "flops": flops,
                              "bytes_accessed": nbytes, "step_s": secs, "achieved_gflops": flops / secs / 1e9,
                              "achieved_gbytes_per_s": nbytes / secs / 1e9,
                              "arithmetic_intensity": flops / nbytes if nbytes else None}
    return report


def _sweep(intervals, cat_of, cont_cache, cats: collections.Counter, op_time: collections.Counter) -> float:
    """Attribute wall time inside one step: at each instant the running leaf ops (not while /
    conditional containers) share it equally; time covered only by containers goes to their own
    category (loop control). Returns the busy time (union of all intervals)."""
    if not intervals:
        return 0.0
    points = sorted({p for a, b, _ in intervals for p in (a, b)})
    starts = collections.defaultdict(list)
    ends = collections.defaultdict(list)
    for idx, (a, b, name) in enumerate(intervals):
        cat_of(name)
        starts[a].append(idx)
        ends[b].append(idx)
    active: set[int] = set()
    busy = 0.0
    for p0, p1 in zip(points, points[1:]):
        for idx in ends.get(p0, ()):
            active.discard(idx)
        for idx in starts.get(p0, ()):
            active.add(idx)
        if not active:
            continue
        dt = p1 - p0
        busy += dt
        leaves = [i for i in active if not cont_cache[intervals[i][2]]]
        owners = leaves or list(active)
        share = dt / len(owners)
        for i in owners:
            name = intervals[i][2]
            cats[cat_of(name)[0]] += share
            op_time[name] += share
    return busy


# ----- printing -----------------------------------------------------------------------
def render(report: dict, measured: dict | None, trace_path: str) -> str:
    ms = lambda us: f"{us / 1e3:8.3f} ms"  # noqa: E731
    L = [f"trace: {trace_path}", f"steps analysed: {report['num_steps']}"
         + (f" (kinds {report['kinds']}, buckets {report['buckets']})" if report.get("kinds") else "")]
    w = report["window_us"]
    L.append("")
    L.append("per step (mean)                       time    share of step window")
    for c in CATEGORIES:
        v = report["categories_us"][c]
        L.append(f"  {c:<32}{ms(v)}   {100 * v / w:5.1f}%")
    L.append(f"  {'device busy (sum of categories)':<32}{ms(report['busy_us'])}   {100 * report['busy_us'] / w:5.1f}%")
    L.append(f"  {'device idle (host overhead)':<32}{ms(report['idle_us'])}   {100 * report['idle_us'] / w:5.1f}%")
    L.append(f"  {'step window (trace)':<32}{ms(w)}")
    if "measured_step_us" in report:
        m = report["measured_step_us"]
        L.append(f"  {'measured step (perf_counter)':<32}{ms(m)}")
        L.append(f"  categories + idle = {100 * report['categories_plus_idle_vs_measured']:.1f}% of the measured "
                 f"step; device ops alone = {100 * report['categories_vs_measured']:.1f}%")
    L.append("")
    L.append("busy vs idle per step:")
    L.append("  step   window ms   busy ms   idle ms   busy %")
    for s in report["steps"]:
        L.append(f"  {s['step']:>4}  {s['window_us'] / 1e3:10.3f}  {s['busy_us'] / 1e3:8.3f}  "
                 f"{s['idle_us'] / 1e3:8.3f}  {100 * s['busy_us'] / s['window_us']:6.1f}")
    L.append("")
    L.append(f"top {len(report['top_ops'])} ops (wall time per step, shared when concurrent):")
    for o in report["top_ops"]:
        L.append(f"  {o['us_per_step'] / 1e3:8.3f} ms {100 * o['share_of_busy']:5.1f}%  x{o['calls_per_step']:<5.0f} "
                 f"{o['category']:<11} {o['op']:<34} {o['source']}  [{o['op_name'][-60:]}]")
    c = report.get("cost")
    if c:
        L.append("")
        L.append(f"compiled step cost analysis (bucket of {c['bucket_tokens']} tokens): "
                 f"{c['flops'] / 1e9:.3f} GFLOP, {c['bytes_accessed'] / 1e9:.3f} GB accessed "
                 f"(intensity {c['arithmetic_intensity'] or 0:.2f} FLOP/B)")
        L.append(f"  at the measured step time {c['step_s'] * 1e3:.3f} ms: {c['achieved_gflops']:.2f} GFLOP/s, "
                 f"{c['achieved_gbytes_per_s']:.2f} GB/s (XLA's static estimate; while-loop bodies as XLA counts them)")
    elif measured and measured.get("cost_analysis_error"):
        L.append(f"cost analysis failed: {measured['cost_analysis_error']}")
    return "\n".join(L)


def report_dir(path: str, hlo_path: str | None = None, top: int = 10) -> tuple[dict, dict | None, str]:
    """A --profile DIR (or one trace file) summarised: (report, the measured steps of
    DIR/jaxllm_profile.json or None, the trace's path); the HLO from `hlo_path` (default DIR/step.hlo.txt)."""
    trace_path = find_trace(path)
    root = path if os.path.isdir(path) else os.path.dirname(path)
    measured = None
    mpath = os.path.join(root, "jaxllm_profile.json")
    if os.path.isfile(mpath):
        with open(mpath) as f:
            measured = json.load(f)
    hlo_path = hlo_path or os.path.join(root, "step.hlo.txt")
    hlo = None
    if os.path.isfile(hlo_path):
        with open(hlo_path) as f:
            hlo = HloIndex(f.read())
    return analyze(load_trace(trace_path), hlo, measured, top), measured, trace_path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", help="the --profile DIR (or a .trace.json.gz file)")
    ap.add_argument("--hlo", help="optimized HLO text (default DIR/step.hlo.txt)")
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--json", help="write the report as JSON")
    args = ap.parse_args(argv)
    report, measured, trace_path = report_dir(args.path, args.hlo, args.top)
    print(render(report, measured, trace_path))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
